"""Issue 3 on two kernels: the copy phase over SSH (and direct NBD) to a real sshd."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ORACLE, python
from tests.kernel.steps import DMMIG, copy_args, digest, start_writer, stop_writer, world
from tests.rig.output import summary
from tests.rig.pair import B_IP
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20


def test_copy_under_writer_then_final_round_is_exact(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=11), db(64)
    top = a.dmmig("wrap", name, origin).out.strip()
    a.dmmig("prepare", name)
    rec = f"{a.shared}/{name}.rec"  # on hostfs: the checker on b reads the writer's record
    w = start_writer(a, top, rec, seed=11, rate="2000", blocks="0:4096")  # the first 16 MiB
    s1 = summary(a.dmmig(*copy_args(name, dest, "--converge", "256K", "--max-rounds", "4")).out)
    assert s1["read"] >= 64 * MiB and s1["rounds"], s1
    stop_writer(a, w)
    s2 = summary(a.dmmig("copy", name, "--json").out)   # destination from the journal
    # deltas, not full copies: only the writer's 16 MiB can be dirty
    assert 0 < s2["rounds"][0]["dirty_bytes"] <= 16 * MiB and s2["read"] <= 16 * MiB, s2
    chk = b.run([python(), ORACLE, "check", dest, "--seed", "11", "--record", rec], check=False)
    assert chk.rc == 0, chk.out
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("abort", name)
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0, "abort left the export running"
    a.dmmig("unwrap", name)
    a.run(["rm", "-f", rec, rec + ".started"])


def test_resume_after_sigkill_and_after_ssh_cut_sends_only_what_is_missing(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    size = 96
    origin, dest = da(size, fill_seed=5), db(size)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    src_digest = digest(a, origin)
    # 1) dmmig SIGKILLed mid-base-copy. 2 MB/s: the copy journals its offset every 2 s, so
    # every 4 MiB, and the base copy of 96 MiB lasts ~50 s, far longer than the rig takes to
    # see a checkpoint and cut (at 16 MB/s the cut once came after the base copy had ended)
    job = a.spawn([DMMIG, *copy_args(name, dest, "--bwlimit", "2M")])
    wait_base_beyond(a, name, 0)
    job.signal(9)
    job.wait()
    st = json.loads(a.dmmig("status", name, "--json").out)
    assert st["journal"]["phase"] == "copying"
    done1 = st["journal"]["copy"]["base_offset"]
    assert 0 < done1 < size * MiB, done1
    # 2) the SSH connection cut mid-copy: kill sshd's session process on the destination
    job = a.spawn([DMMIG, *copy_args(name, dest, "--bwlimit", "2M")])
    wait_base_beyond(a, name, done1)
    assert b.run(["pkill", "-9", "-f", "^sshd: root@"], check=False).rc == 0, "no SSH session to cut"
    r = job.wait()
    assert r.rc == 8, (r.rc, r.err)   # a remote failure, reported as such
    assert "Exception in thread" not in r.err and "internal error" not in r.err, r.err
    st = json.loads(a.dmmig("status", name, "--json").out)
    done2 = st["journal"]["copy"]["base_offset"]
    assert done1 <= done2 < size * MiB
    # 3) resume completes; it sends the rest, not everything again
    s = summary(a.dmmig(*copy_args(name, dest)).out)
    assert s["rounds"][-1]["dirty_bytes"] == 0
    # base resumed at the journaled offset; nothing was written meanwhile, so rounds send ~nothing
    assert s["read"] <= size * MiB - done2 + 2 * MiB, (s, done2)
    assert digest(b, dest) == src_digest
    a.dmmig("abort", name)
    assert digest(a, origin) == src_digest
    a.dmmig("unwrap", name)


def wait_base_beyond(a: UmlHost, name: str, offset: int) -> None:
    for _ in range(120):
        st = json.loads(a.dmmig("status", name, "--json").out)["journal"]
        if st["phase"] == "copying" and st["copy"].get("base_offset", 0) > offset:
            assert not st["copy"].get("base_done"), "the base copy ended before the test interrupted it"
            return
        time.sleep(0.25)
    raise AssertionError("the base copy made no progress")


def test_half_zero_disk_sends_only_the_data_half(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64), db(64)
    a.run(["dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=32", "oflag=direct"])
    b.run(["dd", "if=/dev/urandom", f"of={dest}", "bs=1M", "count=64", "oflag=direct"])  # stale data there
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    s = summary(a.dmmig(*copy_args(name, dest)).out)
    # the agent's own session carried NBD (its relay)
    assert s["nbd"] == {"path": "ssh agent relay", "connections": 1}, s
    assert s["sent"] <= 32 * MiB + 64 * 1024, s
    assert s["zeroed"] >= 32 * MiB - 64 * 1024, s  # the zero half is zeroed without payload
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("abort", name)
    # a created (sparse, known-zero) destination: zero blocks are skipped entirely
    a.dmmig("prepare", name)
    s = summary(a.dmmig(*copy_args(name, "/dev/shm/created.img", "--create")).out)
    assert s["skipped"] >= 32 * MiB - 64 * 1024 and s["zeroed"] == 0, s
    assert digest(a, origin) == digest(b, "/dev/shm/created.img")
    a.dmmig("abort", name)
    assert b.run(["test", "-e", "/dev/shm/created.img"], check=False).rc != 0, "abort kept the created disk"
    a.dmmig("unwrap", name)


def test_direct_nbd_transport(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=2), db(32)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    s = summary(a.dmmig(*copy_args(name, dest, "--transport", "nbd", "--nbd-address", B_IP)).out)
    assert s["nbd"] == {"path": "tcp+tls", "connections": 1}, s
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("abort", name)
    a.dmmig("unwrap", name)


def test_refusals_before_any_change(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, small, dest = da(32), db(16), db(32)

    def refused(args: list[str], code: int, *needles: str) -> None:
        before = world(a, b)
        t0 = time.monotonic()
        r = a.dmmig(*args, check=False, timeout=60)
        assert r.rc == code, (r.rc, r.err)
        for n in needles:
            assert n in r.err, (n, r.err)
        assert time.monotonic() - t0 < 40, "took too long to refuse"
        assert world(a, b) == before

    refused(copy_args(name, dest), 3, "unknown disk")
    a.dmmig("wrap", name, origin)
    refused(copy_args(name, dest), 6, "not prepared")
    a.dmmig("prepare", name)
    refused(copy_args(name, small), 3, "smaller")
    b.run(["dmsetup", "create", f"{name}-holder", "--table", f"0 65536 linear {dest} 0"])
    try:
        refused(copy_args(name, dest), 7, "in use")
    finally:
        b.run(["dmsetup", "remove", f"{name}-holder"])
    a.run(["sh", "-c", "cat > /run/ssh/empty_known_hosts"], input=b"")
    args = copy_args(name, dest)
    args[args.index("/run/ssh/known_hosts")] = "/run/ssh/empty_known_hosts"
    refused(args, 8, "unknown", "refusing")
    a.sh("rm -f /run/ssh/other_key*; ssh-keygen -q -t ed25519 -N '' -f /run/ssh/other_key")
    args = copy_args(name, dest)
    args[args.index("/run/ssh/id_ed25519")] = "/run/ssh/other_key"
    refused(args, 8, "authentication")
    args = copy_args(name, dest)
    args[2] = "root@192.168.200.77"
    refused(args, 8, "192.168.200.77")
    a.run(["rm", "-f", "/run/ssh/other_key", "/run/ssh/other_key.pub", "/run/ssh/empty_known_hosts"])
    a.dmmig("abort", name)
    a.dmmig("unwrap", name)


def test_abort_with_the_destination_unreachable_says_exactly_what_is_left(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=2), db(16)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    pid = b.run(["pgrep", "qemu-nbd"]).out.split()[0]
    b.run(["ip", "link", "set", "vec0", "down"])
    try:
        t = time.monotonic()
        r = a.dmmig("abort", name, check=False)
        took = time.monotonic() - t
    finally:
        b.run(["ip", "link", "set", "vec0", "up"])
    assert r.rc == 8 and took < 60, (r.rc, took, r.err)   # no hang, a remote failure
    assert "left behind" in r.err and f"kill {pid}" in r.err, r.err
    st = json.loads(a.dmmig("status", name, "--json").out)  # the source side is clean anyway
    assert st["journal"]["phase"] == "wrapped" and list(st["devices"]) == [f"dmmig-{name}"], st
    b.sh(r.err.split("There, run: ", 1)[1].strip())  # the printed instructions are exact
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0
    a.dmmig("unwrap", name)


def test_copy_refuses_what_the_cutover_would_miss(pair, pdisks, name: str) -> None:
    """Tools and targets the cutover needs, on both hosts, are checked before the base copy.
    Before, a missing nbd-client, dm-mirror or ssh on the source was found by the cutover,
    after the whole copy; a missing qemu-nbd on the destination after prepare_disk (which may
    already have created the disk there)."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(16), db(16)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)

    def refused(args: list[str], *needles: str, env: dict[str, str] | None = None) -> None:
        before = world(a, b)
        r = a.dmmig(*args, check=False, timeout=120, env=env)
        assert r.rc == 4, (r.rc, r.err)  # a missing dependency
        for n in needles:
            assert n in r.err, (n, r.err)
        assert world(a, b) == before, "a refused copy changed something"

    # a PATH with everything the copy and the cutover run, but one
    tools = ["dmsetup", "losetup", "era_invalidate", "nbd-client", "ssh", "modprobe", "blockdev", "udevadm"]
    try:
        for missing in ("nbd-client", "ssh", "era_invalidate"):
            a.sh("rm -rf /run/fakebin && mkdir -p /run/fakebin && "
                 f"for t in {' '.join(t for t in tools if t != missing)};"
                 " do ln -sf $(command -v $t) /run/fakebin/$t; done")
            refused(copy_args(name, dest), f"missing tool(s): {missing} (Debian package", env={"PATH": "/run/fakebin"})
    finally:
        a.run(["rm", "-rf", "/run/fakebin"])
    a.run(["rmmod", "dm-mirror"])
    try:
        refused(copy_args(name, dest), "target(s) missing from the kernel: mirror")
    finally:
        a.run(["modprobe", "--dirname=/run/mods", "dm-mirror"])
    # the destination without qemu-nbd: a file that is not executable over it, in b's kernel only
    b.sh("touch /run/no-qemu-nbd && mount --bind /run/no-qemu-nbd /usr/bin/qemu-nbd")
    try:
        refused(copy_args(name, "/dev/shm/created-by-copy.img", "--create"),
                f"on {B_IP}: missing tool(s): qemu-nbd (Debian package qemu-utils)")
        assert b.run(["test", "-e", "/dev/shm/created-by-copy.img"], check=False).rc != 0
    finally:
        b.sh("umount /usr/bin/qemu-nbd; rm -f /run/no-qemu-nbd")
    a.dmmig("abort", name)
    a.dmmig("unwrap", name)
