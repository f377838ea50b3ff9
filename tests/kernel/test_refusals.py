"""Bad input is refused before anything changes, with a message naming the problem."""
from __future__ import annotations

import pytest

from tests.rig.uml import UmlHost

pytestmark = pytest.mark.kernel


def world(rig: UmlHost) -> tuple[str, str, str]:
    """Everything a refused command must not have touched."""
    return (rig.run(["dmsetup", "table"]).out, rig.run(["losetup", "-a"]).out,
            rig.sh("ls -la /run/dmmig 2>/dev/null; cat /run/dmmig/*.json 2>/dev/null; true").out)


def refused(rig: UmlHost, args: list[str], code: int, *needles: str, env: dict[str, str] | None = None) -> str:
    before = world(rig)
    r = rig.dmmig(*args, check=False, env=env)
    assert r.rc == code, (r.rc, r.out, r.err)
    for n in needles:
        assert n in r.err, (n, r.err)
    assert "Traceback" not in r.err
    assert world(rig) == before, "a refused command changed something"
    return r.err


@pytest.mark.parametrize("bad", ["a/b", "a b", "..", "x..y", "a;rm", "$(id)", "`id`", "a|b", "a&b", "-x", ""])
def test_bad_names(rig: UmlHost, disks, bad: str) -> None:
    origin = disks(8)
    refused(rig, ["wrap", "--", bad, origin], 3, "invalid disk name")


def test_origin_missing_or_not_block(rig: UmlHost, name: str) -> None:
    refused(rig, ["wrap", name, "/dev/nonexistent-disk"], 3, "/dev/nonexistent-disk", "no such file")
    refused(rig, ["wrap", name, "/etc/hostname"], 3, "/etc/hostname", "not a block device")


def test_origin_held_by_another_dm_device(rig: UmlHost, disks, name: str) -> None:
    origin = disks(8)
    rig.run(["dmsetup", "create", f"{name}-other", "--table", f"0 16384 linear {origin} 0"])
    try:
        refused(rig, ["wrap", name, origin], 3, "already held by", f"{name}-other")
    finally:
        rig.run(["dmsetup", "remove", f"{name}-other"])


def test_prepare_twice_and_unknown_names(rig: UmlHost, disks, name: str) -> None:
    refused(rig, ["abort", name], 3, "unknown disk", name)
    refused(rig, ["unwrap", name], 3, "unknown disk", name)
    refused(rig, ["prepare", name], 3, "unknown disk", name)
    refused(rig, ["dirty", name], 3, "unknown disk", name)
    origin = disks(16)
    rig.dmmig("wrap", name, origin)
    refused(rig, ["dirty", name], 6, "not prepared")
    rig.dmmig("prepare", name)
    refused(rig, ["prepare", name], 6, "already prepared")
    refused(rig, ["unwrap", name], 6, "in progress")
    rig.dmmig("abort", name)
    rig.dmmig("unwrap", name)


@pytest.mark.parametrize("size,why", [("6K", "not a multiple of 4 KiB"), ("1000", "not a multiple of 4 KiB"),
                                      ("12K", "not a power of two"), ("junk", "invalid size")])
def test_bad_block_size(rig: UmlHost, disks, name: str, size: str, why: str) -> None:
    origin = disks(16)
    rig.dmmig("wrap", name, origin)
    try:
        refused(rig, ["prepare", name, "--block-size", size], 3, why)
    finally:
        rig.dmmig("unwrap", name)


def test_metadata_device_too_small(rig: UmlHost, disks, name: str) -> None:
    origin = disks(256)
    meta = disks(1)
    rig.dmmig("wrap", name, origin)
    try:
        refused(rig, ["prepare", name, "--block-size", "4K", "--metadata", meta], 3, "too small", meta)
    finally:
        rig.dmmig("unwrap", name)


def test_unwrap_refuses_while_open(rig: UmlHost, disks, name: str) -> None:
    origin = disks(8)
    top = rig.dmmig("wrap", name, origin).out.strip()
    holder = rig.spawn(["sh", "-c", f"exec 3<{top}; sleep 30"])
    try:
        for _ in range(50):
            if rig.run(["dmsetup", "info", "-c", "--noheadings", "-o", "open", f"dmmig-{name}"]).out.strip() == "1":
                break
        refused(rig, ["unwrap", name], 7, "is open")
    finally:
        holder.signal(9)
        holder.wait()
    rig.dmmig("unwrap", name)


def test_missing_tool_is_named(rig: UmlHost, disks, name: str) -> None:
    origin = disks(8)
    rig.dmmig("wrap", name, origin)
    # a PATH with everything but era_invalidate
    rig.sh("mkdir -p /run/fakebin && for t in dmsetup losetup modprobe blockdev; do "
           "ln -sf $(command -v $t) /run/fakebin/$t; done")
    try:
        refused(rig, ["prepare", name], 4, "era_invalidate", "thin-provisioning-tools",
                env={"PATH": "/run/fakebin"})
    finally:
        rig.run(["rm", "-rf", "/run/fakebin"])
        rig.dmmig("unwrap", name)


def test_missing_kernel_target_is_named(rig: UmlHost, disks, name: str) -> None:
    origin = disks(8)
    rig.dmmig("wrap", name, origin)
    rig.run(["rmmod", "dm-era"])
    try:
        # modprobe finds no module tree at the default path in the rig, like a kernel without dm-era
        refused(rig, ["prepare", name], 4, "era")
    finally:
        rig.run(["modprobe", "--dirname=/run/mods", "dm-era"])
        rig.dmmig("unwrap", name)


HEAD_DIGEST = "import hashlib, sys; f = open(sys.argv[1], 'rb'); print(hashlib.sha256(f.read(1 << 20)).hexdigest())"


@pytest.mark.parametrize("what", ["ext4", "mounted", "own-top"])
def test_metadata_device_in_use_or_with_data_is_refused(rig: UmlHost, disks, name: str, what: str) -> None:
    """`prepare --metadata DEV` zeroes DEV's first 4 KiB: never of a device holding a file
    system (mounted or not) or one of the disk's own devices. The oracle: DEV's first MiB read
    back unchanged; a mounted file system (which writes on its own) still ext4 and clean."""
    origin = disks(16, fill_seed=3)
    top = rig.dmmig("wrap", name, origin).out.strip()
    mnt = f"/run/mnt-{name}"
    meta = top if what == "own-top" else disks(8)
    if what in ("ext4", "mounted"):
        rig.run(["mkfs.ext4", "-q", meta])
    if what == "mounted":
        rig.run(["mkdir", "-p", mnt])
        rig.run(["mount", "-t", "ext4", meta, mnt])
    try:
        before = rig.py(HEAD_DIGEST, meta).out
        needle = {"ext4": "ext4", "mounted": "in use", "own-top": f"dmmig-{name}"}[what]
        refused(rig, ["prepare", name, "--metadata", meta], 3, meta, needle)
        if what != "mounted":
            assert rig.py(HEAD_DIGEST, meta).out == before, "the refused prepare wrote to the device"
        else:
            assert rig.run(["blkid", "-p", "-o", "value", "-s", "TYPE", meta]).out.strip() == "ext4"
            rig.run(["umount", mnt])
            fsck = rig.run(["e2fsck", "-fn", meta], check=False)
            assert fsck.rc == 0, fsck.out + fsck.err
    finally:
        if what == "mounted":
            rig.run(["umount", mnt], check=False)
            rig.run(["rmdir", mnt], check=False)
        rig.dmmig("abort", name, check=False)
        rig.dmmig("unwrap", name)
