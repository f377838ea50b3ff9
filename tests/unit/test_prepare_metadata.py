"""`prepare --metadata DEV` zeroes DEV's first 4 KiB: the checks before that, without root
(the device is a file in tmp_path with made-up device numbers; blkid answers through the fake
runner). The kernel rig has the real thing (tests/kernel/test_refusals.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dmmig.adapters.blockdev import BlockDev
from dmmig.adapters.dm.dmsetup import DmInfo, DmSetup
from dmmig.core import journal
from dmmig.core.stack import Stack
from dmmig.errors import BadInput
from tests.unit.fakes import FakeRunner

TOP = DmInfo("dmmig-d1", 253, 4, "L--w", 0, 1, 0, "DMMIG-top-d1")


def check(tmp_path: Path, dev: BlockDev, blkid: tuple[int, str, str] = (2, "", "")) -> FakeRunner:
    r = FakeRunner([(["blkid"], blkid)])
    stack = Stack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")))
    entry = journal.Entry("d1", "/dev/loop1", "7:1")
    stack.check_metadata_device("d1", entry, TOP, dev)
    return r


@pytest.fixture
def meta(tmp_path: Path) -> BlockDev:
    f = tmp_path / "meta"
    f.write_bytes(b"\0" * 8192)
    return BlockDev(str(f), 7, 250)


def test_an_empty_device_passes_after_a_low_level_probe(tmp_path: Path, meta: BlockDev) -> None:
    r = check(tmp_path, meta)
    assert r.argvs == [["blkid", "-p", "-o", "export", meta.path]]


@pytest.mark.parametrize("out,what", [("DEVNAME=/dev/x\nUUID=1\nTYPE=ext4\nUSAGE=filesystem\n", "holds ext4"),
                                      ("DEVNAME=/dev/x\nTYPE=LVM2_member\n", "holds LVM2_member"),
                                      ("DEVNAME=/dev/x\nPTUUID=a\nPTTYPE=gpt\n", "holds a gpt partition table"),
                                      ("DEVNAME=/dev/x\nTYPE=swap\n", "holds swap")])
def test_a_device_with_a_signature_is_refused(tmp_path: Path, meta: BlockDev, out: str, what: str) -> None:
    with pytest.raises(BadInput, match=what) as e:
        check(tmp_path, meta, (0, out, ""))
    assert e.value.hint == f"if its content is not needed: wipefs -a {meta.path}"


def test_an_ambivalent_probe_is_refused(tmp_path: Path, meta: BlockDev) -> None:
    with pytest.raises(BadInput, match="blkid -p exited with 8"):
        check(tmp_path, meta, (8, "", "ambivalent result (probably more filesystems on the device)"))


@pytest.mark.parametrize("devno,what", [((253, 4), "d1's own top device dmmig-d1"), ((7, 1), "d1's origin /dev/loop1")])
def test_the_disks_own_devices_are_refused(tmp_path: Path, meta: BlockDev, devno: tuple[int, int], what: str) -> None:
    with pytest.raises(BadInput, match=what):
        check(tmp_path, BlockDev(meta.path, *devno))
