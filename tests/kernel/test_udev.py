"""udev-rules/57-dmmig.rules under the rig's real systemd-udevd: scanners stay off dmmig's
inner devices (blkid never probes them, so LVM and friends never see the guest's data
there), and the top device gets /dev/dmmig/NAME. The control in each test is an ordinary
device with the same content, which blkid does probe: the test can fail."""
from __future__ import annotations

import os

import pytest

from tests.rig.uml import ROOT, UmlHost

pytestmark = pytest.mark.kernel
RULES = ROOT / "udev-rules" / "57-dmmig.rules"


@pytest.fixture(autouse=True)
def rules_installed(rig: UmlHost) -> None:
    # install.sh puts them in /etc/udev/rules.d; the rig's root is this machine's root
    installed = "/etc/udev/rules.d/57-dmmig.rules"
    if not os.path.exists(installed) or open(installed).read() != RULES.read_text():
        pytest.fail(f"{installed} is missing or differs from {RULES}: run ./install.sh")
    rig.run(["udevadm", "control", "--reload"])


def props(h: UmlHost, dev: str) -> dict[str, str]:
    h.run(["udevadm", "settle", "-t", "30"])
    out = h.run(["udevadm", "info", "--query=property", dev]).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_era_and_metadata_are_not_scanned_and_top_has_a_stable_name(rig: UmlHost, disks, name: str) -> None:
    origin = disks(16)
    rig.run(["mkfs.ext4", "-q", "-F", origin])  # a signature blkid would report
    # the change event udev's inotify watch makes when mkfs closes the device is lost if mkfs
    # ran before udevd set that watch up (the loop device is brand new): asked for explicitly
    rig.run(["udevadm", "trigger", "--action=change", "--settle", origin])
    assert props(rig, origin).get("ID_FS_TYPE") == "ext4"  # the control: the origin is probed
    rig.dmmig("wrap", name, origin)
    rig.dmmig("prepare", name)
    top = f"/dev/mapper/dmmig-{name}"
    link = rig.run(["readlink", "-f", f"/dev/dmmig/{name}"]).out.strip()
    assert link == rig.run(["readlink", "-f", top]).out.strip()
    era = props(rig, f"/dev/mapper/dmmig-{name}-era")
    assert era.get("DMMIG_INNER") == "1" and era.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1", era
    assert "ID_FS_TYPE" not in era, era
    assert "ID_FS_TYPE" not in props(rig, top)  # no blkid read of the guest's data at each swap
    meta = rig.run(["losetup", "-j", f"/run/dmmig/{name}.era-meta", "-O", "NAME", "-n"]).out.strip()
    mp = props(rig, meta)
    assert mp.get("DMMIG_INNER") == "1" and mp.get("SYSTEMD_READY") == "0", mp
    rig.dmmig("abort", name)
    rig.dmmig("unwrap", name)
    assert rig.run(["test", "-e", f"/dev/dmmig/{name}"], check=False).rc != 0


ATTACH = r"""
import sys
from dmmig.adapters.nbdkernel import NbdKernel
from dmmig.adapters.runner import SubprocessRunner
k = NbdKernel(SubprocessRunner())
print(k.attach_free("udev-test", "x", timeout=5, on_claim=lambda dev: None, host="127.0.0.1", port=int(sys.argv[1])))
"""


def test_the_nbd_leg_is_not_scanned(rig: UmlHost, disks) -> None:
    img = disks(16)
    rig.run(["mkfs.ext4", "-q", "-F", img])
    rig.run(["qemu-nbd", "--fork", "--pid-file=/run/udev-nbd.pid", "--persistent", "--format=raw",
             "--bind=127.0.0.1", "--port=10899", "--export-name=x", img])
    try:
        dev = rig.py(ATTACH, "10899").out.strip()  # dmmig's own attach marks it first
        try:
            p = props(rig, dev)
            assert p.get("DMMIG_INNER") == "1" and "ID_FS_TYPE" not in p, p
        finally:
            rig.py("from dmmig.adapters.nbdkernel import NbdKernel\n"
                   "from dmmig.adapters.runner import SubprocessRunner\n"
                   f"assert NbdKernel(SubprocessRunner()).release({dev!r}, 'udev-test')")
        # the control: the same export attached by hand is probed
        rig.run(["nbd-client", "-N", "x", "127.0.0.1", "10899", dev, "-t", "5"])
        try:
            assert props(rig, dev).get("ID_FS_TYPE") == "ext4"
        finally:
            rig.run(["nbd-client", "-d", dev])
    finally:
        rig.sh("kill $(cat /run/udev-nbd.pid); rm -f /run/udev-nbd.pid")
