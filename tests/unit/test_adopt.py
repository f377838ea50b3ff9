"""Adopting an LV (core/stack.py adopt, issue 16 part 2) with an injected runner: reading and
writing its table verbatim, the refusals, the LVM guard, and giving the LV its table back (or
leaving a table LVM reloaded alone). The kernel proof is tests/kernel/test_adopt.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.dm.dmsetup import DmInfo, DmSetup
from dmmig.adapters.dm.targets import ParseError, Segments
from dmmig.core import journal
from dmmig.core.records import Adopted
from dmmig.core.stack import Stack, adoptable
from dmmig.errors import BadInput, StateError, Steps
from tests.unit.fakes import INFO, NOT_THERE, FakeRunner

UUID = "LVM-" + "a" * 32 + "b" * 32
TWO = "0 65536 linear 7:0 2048\n65536 65536 linear 7:0 75776\n"  # an LV lvextend made in two pieces
STRIPED = "0 131072 striped 2 128 7:0 2048 7:1 2048\n"


def info(name: str = "vg0-vm1", uuid: str = UUID, attr: str = "L--w") -> DmInfo:
    return DmInfo(name, 253, 0, attr, 1, 2, 0, uuid)


# ---- the table, verbatim --------------------------------------------------------------------

def test_a_table_of_several_segments_reads_and_renders_as_the_kernel_printed_it() -> None:
    t = Segments.parse(TWO)
    assert t.lines == ("0 65536 linear 7:0 2048", "65536 65536 linear 7:0 75776")
    assert t.length == 131072 and t.kinds == ["linear", "linear"]
    assert t.render() == TWO.strip()
    assert Segments.parse("  0 8  linear   7:0 0 \n") == Segments(("0 8 linear 7:0 0",))
    assert Segments.parse(STRIPED).kinds == ["striped"]


@pytest.mark.parametrize("text", ["", "0 8 linear 7:0 0\n16 8 linear 7:0 8\n", "8 8 linear 7:0 0",
                                  "0 x linear 7:0 0", "0 8", "0 0 linear 7:0 0"])
def test_a_table_with_gaps_or_garbage_is_refused(text: str) -> None:
    with pytest.raises(ParseError):
        Segments.parse(text)


# ---- what can be adopted ----------------------------------------------------------------------

def test_an_lvs_linear_or_striped_table_is_adopted() -> None:
    p = adoptable("d1", "/dev/vg0/vm1", "253:0", info(), TWO)
    assert (p.lv, p.devno, p.uuid, p.table.length) == ("vg0-vm1", "253:0", UUID, 131072)
    text = "\n".join(p.render())
    assert "create dmmig-d1-lv with vg0-vm1's table, verbatim" in text and "65536 65536 linear 7:0 75776" in text
    assert "hold LVM changes to vg0-vm1" in text and "--refresh" in text
    assert adoptable("d1", "/dev/vg0/vm1", "253:0", info(), STRIPED).table.kinds == ["striped"]


@pytest.mark.parametrize("dm,text,why", [
    (None, "", "is not a device-mapper device: a partition or a loop device cannot be adopted"),
    (info("mpatha", "mpath-3600"), TWO, "not an LVM logical volume"),
    (info("crypt", ""), TWO, "(uuid none), not an LVM logical volume"),
    (info("dmmig-x", "DMMIG-top-x"), TWO, "is dmmig's own device"),
    (info("vg0-vm1-real", UUID + "-real"), TWO, "one of LVM's internal layers"),
    (info(attr="L-sw"), TWO, "is suspended"),
    (info(attr="LI-w"), TWO, "holding an inactive table"),
    (info(attr="L--r"), TWO, "read-only"),
    (info(), "0 131072 snapshot-origin 253:5\n", "snapshot-origin segments: that target keeps state"),
    (info(), "0 131072 thin 253:7 1\n", "thin segments"),
    (info(), "0 65536 linear 7:0 0\n65536 65536 raid raid1 3 0 region_size 1024 2 - 7:0 - 7:1\n", "raid segments"),
    (info(), "0 65536 linear 7:0 0\n70000 8 linear 7:0 0\n", "cannot read the table"),
])
def test_what_is_not_an_lvs_plain_table_is_refused_saying_why(dm: DmInfo | None, text: str, why: str) -> None:
    with pytest.raises(BadInput) as e:
        adoptable("d1", "/dev/x", "253:0", dm, text)
    assert why in e.value.message, e.value.message


def test_the_lv_is_found_by_its_number_not_its_name() -> None:
    r = FakeRunner([(INFO + ["-j", "253", "-m", "0"], (0, f"vg0-vm1;253;0;L--w;1;2;0;{UUID}\n", "")),
                    (INFO + ["-j", "7", "-m", "1"], NOT_THERE),
                    (["dmsetup", "table", "-j", "253", "-m", "0"], (0, TWO, ""))])
    dm = DmSetup(r)
    assert dm.info_of("253:0") == info()
    assert dm.info_of("7:1") is None  # a loop device: no dm device has that number
    assert dm.table_text_of("253:0") == TWO.strip()
    dm.table_text_of("253:0", inactive=True)
    assert r.argvs[-1] == ["dmsetup", "table", "--inactive", "-j", "253", "-m", "0"]
    with pytest.raises(ValueError):
        dm.info_of("253:0; rm -rf /")


# ---- the guard and the way back -------------------------------------------------------------

TOP = "253:4"
OURS = "0 131072 linear 253:4 0"


class Host:
    """The LV vg0-vm1 (253:0) adopted as d1: dmmig-d1 (253:4) over dmmig-d1-lv (253:3). LIVE and
    INACTIVE: the LV's tables as dmsetup prints them."""

    def __init__(self, tmp_path: Path, live: str, inactive: str | None = None) -> None:
        self.live, self.inactive = live, inactive
        attr = "LI-w" if inactive else "L--w"
        self.r = FakeRunner([
            (INFO + ["-j", "253", "-m", "0"], (0, f"vg0-vm1;253;0;{attr};1;2;0;{UUID}\n", "")),
            (["dmsetup", "table", "--inactive", "-j", "253", "-m", "0"], lambda _: (0, self.inactive or "", "")),
            (["dmsetup", "table", "-j", "253", "-m", "0"], lambda _: (0, self.live, "")),
            (INFO + ["dmmig-d1"], (0, "dmmig-d1;253;4;L--w;1;1;0;DMMIG-top-d1\n", "")),
            (INFO + ["dmmig-d1-lv"], (0, "dmmig-d1-lv;253;3;L--w;1;2;0;DMMIG-lv-d1\n", "")),
        ])
        self.stack = Stack(self.r, DmSetup(self.r), journal.Journal(str(tmp_path / "state")))
        self.entry = journal.Entry("d1", "/dev/mapper/dmmig-d1-lv", "253:3", adopted=Adopted(
            lv="vg0-vm1", path="/dev/vg0/vm1", devno="253:0", uuid=UUID, table=TWO.strip(), top_devno=TOP))

    def changes(self) -> list[list[str]]:
        return [a for a in self.r.argvs if a[1] in ("load", "resume", "remove", "clear", "suspend", "create")]


def test_the_guard_passes_while_the_lv_is_linear_over_the_top(tmp_path: Path) -> None:
    h = Host(tmp_path, OURS + "\n")
    assert h.stack.lv_problem(h.entry) is None
    h.stack.check_lv(h.entry)
    assert h.stack.lv_problem(journal.Entry("d2", "/dev/loop1", "7:1")) is None  # not adopted: nothing to check


def test_the_guard_refuses_once_lvm_reloaded_the_lvs_table(tmp_path: Path) -> None:
    h = Host(tmp_path, TWO)  # lvchange --refresh: LVM's own table again, onto the PV
    with pytest.raises(StateError) as e:
        h.stack.check_lv(h.entry)
    assert "the table of vg0-vm1 is no longer dmmig's" in e.value.message
    assert "dmmig abort d1" in (e.value.hint or "") and "hold LVM changes" in (e.value.hint or "")


def test_release_swaps_the_lv_back_to_its_own_table_verbatim(tmp_path: Path) -> None:
    h = Host(tmp_path, OURS + "\n")
    step = Steps()
    h.stack.release(h.entry, step)
    assert step.errors == [] and "swap vg0-vm1 back to its own table" in step.done
    assert h.changes() == [["dmsetup", "load", "vg0-vm1", "--table", TWO.strip()],
                           ["dmsetup", "resume", "vg0-vm1"],
                           ["dmsetup", "remove", "--retry", "dmmig-d1"],
                           ["dmsetup", "remove", "--retry", "dmmig-d1-lv"]]


def test_release_leaves_a_table_lvm_loaded_alone_and_removes_only_its_own(tmp_path: Path) -> None:
    # lvextend while adopted: LVM's new table has a third segment; the LV must keep it
    grown = TWO + "131072 8192 linear 7:0 90112\n"
    h = Host(tmp_path, grown)
    step = Steps()
    h.stack.release(h.entry, step)
    assert step.errors == []
    assert any(d.startswith("left the table of vg0-vm1 as it is") for d in step.done), step.done
    assert h.changes() == [["dmsetup", "remove", "--retry", "dmmig-d1"],
                           ["dmsetup", "remove", "--retry", "dmmig-d1-lv"]]


@pytest.mark.parametrize("inactive,cleared", [(OURS, True), (TWO, True), ("0 8 error", False)])
def test_release_drops_only_an_inactive_table_of_dmmigs(tmp_path: Path, inactive: str, cleared: bool) -> None:
    """A dmmig killed between its load and its resume leaves an inactive table on the LV: dropped.
    One it did not load (LVM's, in the middle of a change) is not dmmig's to drop."""
    h = Host(tmp_path, TWO, inactive)
    step = Steps()
    h.stack.release(h.entry, step)
    assert (["dmsetup", "clear", "vg0-vm1"] in h.changes()) == cleared


def test_an_adopted_entry_reads_back_and_an_older_one_reads_as_not_adopted(tmp_path: Path) -> None:
    h = Host(tmp_path, OURS)
    j = h.stack.journal
    j.save(h.entry, journal.WRAPPED)
    data: dict[str, Any] = json.loads(Path(j.path("d1")).read_text())
    assert data["version"] == journal.JOURNAL_VERSION == 2 and data["adopted"]["lv"] == "vg0-vm1"
    e = j.load("d1")
    assert e is not None and e.adopted == h.entry.adopted and e.target == "/dev/vg0/vm1"
    del data["adopted"]
    data["version"] = 1
    Path(j.path("d1")).write_text(json.dumps(data))
    e = j.load("d1")
    assert e is not None and e.adopted is None and e.target == e.origin


def test_status_flags_an_lv_table_that_is_no_longer_dmmigs(tmp_path: Path) -> None:
    from dmmig.adapters.nbdkernel import NbdKernel
    from dmmig.flows.status import disk_status, render
    from tests.unit.fakes import fake_nbd_devices

    def host(live: str) -> Host:
        h = Host(tmp_path / str(len(live)), live)
        h.r.rules[:0] = [(["dmsetup", "table", "dmmig-d1"], (0, "0 131072 linear 253:3 0\n", "")),
                         (["dmsetup", "table", "dmmig-d1-lv"], (0, TWO, "")),
                         (INFO + ["dmmig-d1-era"], NOT_THERE)]
        h.stack.mirror.nbd = NbdKernel(h.r, sys_block=fake_nbd_devices(tmp_path, 0))
        h.stack.journal.save(h.entry, journal.WRAPPED)
        return h
    ok = disk_status(host(OURS).stack, "d1")
    assert ok["problems"] == [] and ok["adopted"]["ours"] is True
    assert "adopted: /dev/vg0/vm1 (vg0-vm1, 253:0), table dmmig's: linear over the top" in render(ok)
    assert "dmmig-d1-lv (253:3" in render(ok)
    bad = disk_status(host(TWO).stack, "d1")
    assert bad["adopted"]["ours"] is False
    assert [p for p in bad["problems"] if "the table of vg0-vm1 is no longer dmmig's" in p and "dmmig abort d1" in p]


def test_a_name_dmmig_knows_is_not_adopted_again(tmp_path: Path) -> None:
    h = Host(tmp_path, OURS)
    h.stack.journal.save(journal.Entry("d1", "/dev/loop1", "7:1"), journal.WRAPPED)  # a wrapped disk d1
    with pytest.raises(BadInput) as e:
        h.stack.adopt("d1", "/dev/vg0/vm1")
    assert "d1 is already a dmmig disk (phase wrapped" in e.value.message
    assert h.changes() == []
