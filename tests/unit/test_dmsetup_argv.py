"""DmSetup and EraTools with an injected fake runner: the exact argv dmmig sends, and how it
reads the answers (info lines as real dmsetup prints them)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.dm.dmsetup import INFO_FIELDS, DmInfo, DmSetup
from dmmig.adapters.dm.targets import CoreLog, Era, Linear, Mirror, Table
from dmmig.adapters.era import BlockRange, EraTools
from dmmig.adapters.runner import Result
from dmmig.core import journal
from dmmig.core.stack import Stack
from dmmig.errors import CommandError, DmmigError, MissingDependency
from tests.unit.fakes import INFO, NOT_THERE, FakeRunner

KERNEL = json.loads((Path(__file__).parent / "fixtures" / "kernel_output.json").read_text())

Reply = tuple[int, str, str]  # returncode, stdout, stderr


class NodeWaits:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, name: str, *, present: bool) -> None:
        self.calls.append((name, present))


def make(rules: list[tuple[list[str], Any]] | None = None) -> tuple[DmSetup, FakeRunner, NodeWaits]:
    r, w = FakeRunner(rules), NodeWaits()
    return DmSetup(r, wait_node=w), r, w


LIN = Table(Linear(2048, "7:0"))
MIR = Table(Mirror(2048, CoreLog(128, "nosync"), ("254:0", "43:0"), handle_errors=True))


# ---- changes ------------------------------------------------------------------------------

def test_create() -> None:
    dm, r, w = make()
    dm.create("dmmig-x", LIN)
    assert r.argvs == [["dmsetup", "create", "dmmig-x", "--table", "0 2048 linear 7:0 0"]]
    assert w.calls == [("dmmig-x", True)]


def test_create_with_uuid() -> None:
    dm, r, _ = make()
    dm.create("dmmig-x", MIR, uuid="DMMIG-x")
    assert r.argvs == [["dmsetup", "create", "dmmig-x", "-u", "DMMIG-x", "--table",
                        "0 2048 mirror core 2 128 nosync 2 254:0 0 43:0 0 1 handle_errors"]]


def test_create_without_wait_node() -> None:
    r = FakeRunner()
    DmSetup(r).create("a", LIN)  # no udev waiter: just the command
    assert r.argvs == [["dmsetup", "create", "a", "--table", "0 2048 linear 7:0 0"]]


def test_create_failure_raises_and_does_not_wait() -> None:
    dm, r, w = make([(["dmsetup", "create"], (1, "", "device-mapper: reload ioctl failed: Invalid argument"))])
    with pytest.raises(CommandError, match="Invalid argument") as e:
        dm.create("a", LIN)
    assert e.value.returncode == 1 and e.value.argv[:3] == ["dmsetup", "create", "a"]
    assert w.calls == []


def test_load_and_clear() -> None:
    dm, r, w = make()
    dm.load("a", Table(Era(2048, "7:1", "254:0", 128)))
    dm.clear_inactive("a")
    assert r.argvs == [["dmsetup", "load", "a", "--table", "0 2048 era 7:1 254:0 128"],
                       ["dmsetup", "clear", "a"]]
    assert w.calls == []


@pytest.mark.parametrize("noflush, flag", [(False, []), (True, ["--noflush"])])
def test_suspend_resume(noflush: bool, flag: list[str]) -> None:
    dm, r, w = make()
    dm.suspend("a", noflush=noflush)
    dm.resume("a", noflush=noflush)
    assert r.argvs == [["dmsetup", "suspend", *flag, "a"], ["dmsetup", "resume", *flag, "a"]]
    assert [c["timeout"] for c in r.calls] == [120, 120]
    assert w.calls == [("a", True)]  # resume makes the /dev/mapper node appear


def test_the_guard_hears_of_a_suspend_before_it_and_of_a_resume_after_it() -> None:
    order: list[str] = []

    class Guard:
        def start(self) -> None:
            order.append("guard started")

        def suspending(self, name: str) -> None:
            order.append(f"guard S {name}")

        def resumed(self, name: str) -> None:
            order.append(f"guard R {name}")

    r = FakeRunner([(["dmsetup"], lambda argv: (order.append(" ".join(argv[:2])), (0, "", ""))[1])])
    dm = DmSetup(r, guard=Guard())
    dm.suspend("a")
    dm.resume("a")
    assert order == ["guard S a", "dmsetup suspend", "dmsetup resume", "guard R a"]


def test_message() -> None:
    dm, r, _ = make([(["dmsetup", "message"], (0, "ok\n", ""))])
    assert dm.message("era-a", "take_metadata_snap") == "ok\n"
    assert r.argvs == [["dmsetup", "message", "era-a", "0", "take_metadata_snap"]]


@pytest.mark.parametrize("retry, flag", [(True, ["--retry"]), (False, [])])
def test_remove(retry: bool, flag: list[str]) -> None:
    dm, r, w = make()
    dm.remove("a", retry=retry)
    assert r.argvs == [["dmsetup", "remove", *flag, "a"]]
    assert r.calls[0]["timeout"] == 60
    assert w.calls == [("a", False)]


# `dmsetup -v wait mm 0` in the rig's kernel, on a mirror that had raised its in-sync event
WAIT_V = """Name:              mm
State:             ACTIVE
Read Ahead:        256
Tables present:    LIVE
Open count:        0
Event number:      1
Major, minor:      254, 0
Number of targets: 1

"""


def test_wait_event_returns_the_counter_dmsetup_printed() -> None:
    dm, r, _ = make([(["dmsetup", "-v", "wait"], (0, WAIT_V, ""))])
    assert dm.wait_event("a", 0, timeout=5) == 1
    assert r.calls == [{"argv": ["dmsetup", "-v", "wait", "--noflush", "a", "0"], "check": True, "timeout": 5,
                        "input": None}]
    # a dmsetup that printed nothing: the counter from info; None once the device is gone
    dm, r, _ = make([(INFO, (0, "a;254;3;L--w;1;1;9;\n", ""))])
    assert dm.wait_event("a", 7, timeout=5) == 9
    assert r.argvs[1] == INFO + ["a"]
    dm, r, _ = make([(INFO, NOT_THERE)])
    assert dm.wait_event("a", 7, timeout=5) is None


@pytest.mark.parametrize("noflush, flag", [(False, []), (True, ["--noflush"])])
def test_swap_loads_then_resumes_once(noflush: bool, flag: list[str]) -> None:
    # resume with an inactive table: the kernel suspends, swaps and resumes in one ioctl
    dm, r, w = make()
    secs = dm.swap("top", MIR, noflush=noflush)
    assert r.argvs == [["dmsetup", "load", "top", "--table", MIR.render()],
                       ["dmsetup", "resume", *flag, "top"]]
    assert r.calls[1]["timeout"] == 120
    assert secs >= 0 and w.calls == [("top", True)]


def test_swap_without_udev_sync() -> None:
    # the cutover's swaps: dmsetup returns once the kernel resumed; the node stays as it was
    dm, r, w = make()
    dm.swap("top", MIR, udev_sync=False)
    assert r.argvs == [["dmsetup", "load", "top", "--table", MIR.render()],
                       ["dmsetup", "resume", "--noudevsync", "top"]]
    assert w.calls == []


def test_swap_clears_inactive_when_resume_fails() -> None:
    dm, r, w = make([(["dmsetup", "resume"], (1, "", "device-mapper: resume ioctl failed")),
                     (["dmsetup", "clear"], (1, "", "clear failed too"))])
    with pytest.raises(CommandError, match="resume ioctl failed"):
        dm.swap("top", LIN, noflush=True)
    assert r.argvs == [["dmsetup", "load", "top", "--table", LIN.render()],
                       ["dmsetup", "resume", "--noflush", "top"],
                       ["dmsetup", "clear", "top"]]
    assert r.calls[2]["check"] is False  # a failing clear must not hide the resume's error
    assert w.calls == []


def test_swap_load_failure_touches_nothing_else() -> None:
    dm, r, _ = make([(["dmsetup", "load"], (1, "", "reload ioctl failed"))])
    with pytest.raises(CommandError):
        dm.swap("top", LIN)
    assert r.argvs == [["dmsetup", "load", "top", "--table", LIN.render()]]


# ---- queries ------------------------------------------------------------------------------

def test_info_fields_constant() -> None:
    assert INFO_FIELDS == "name,major,minor,attr,open,segments,events,uuid"


def test_info_parses_real_line() -> None:
    line = KERNEL["linear"]["info"]  # as dmsetup 1.02.185 printed it in the rig
    dm, r, _ = make([(INFO, (0, line, ""))])
    info = dm.info("t1")
    assert r.calls == [{"argv": INFO + ["t1"], "check": False, "timeout": None, "input": None}]
    assert info is not None
    name, major, minor = line.split(";")[:3]
    assert info == DmInfo(name, int(major), int(minor), "L--w", 0, 1, 0, "")
    assert info.devno == f"{major}:{minor}"
    assert info.live and not info.suspended and not info.has_inactive


def test_info_suspended_real_line() -> None:
    dm, _, _ = make([(INFO, (0, KERNEL["linear"]["info_suspended"], ""))])
    info = dm.info("t1")
    assert info is not None and info.suspended and info.attr == "L-sw"


def test_info_with_inactive_table_open_and_uuid() -> None:
    dm, _, _ = make([(INFO, (0, "dmmig-a;254;3;LIsw;2;1;5;DMMIG-a-3f2c\n", ""))])
    info = dm.info("dmmig-a")
    assert info == DmInfo("dmmig-a", 254, 3, "LIsw", 2, 1, 5, "DMMIG-a-3f2c")
    assert info.has_inactive and info.suspended and info.live and info.devno == "254:3"


def test_info_missing_device_is_none() -> None:
    dm, _, _ = make([(INFO, (1, "", "Device does not exist.\nCommand failed.\n"))])
    assert dm.info("nope") is None


def test_info_other_failure_raises() -> None:
    dm, _, _ = make([(INFO, (1, "", "/dev/mapper/control: open failed: Permission denied\n"))])
    with pytest.raises(CommandError, match="Permission denied"):
        dm.info("a")


def test_info_reads_the_suspended_flag_and_uuid() -> None:
    dm, r, _ = make([(INFO + ["a"], (0, "a;254;0;L--w;1;1;0;\n", "")),
                     (INFO + ["b"], (0, "b;254;1;L-sw;0;1;3;DMMIG-b\n", ""))])
    infos = [dm.info("a"), dm.info("b")]
    assert r.argvs == [INFO + ["a"], INFO + ["b"]]
    assert [(i.name, i.devno, i.suspended, i.uuid) for i in infos if i] == \
        [("a", "254:0", False, ""), ("b", "254:1", True, "DMMIG-b")]


def test_table_and_inactive_table() -> None:
    text = KERNEL["mirror_failed_flakey"]["table"]
    dm, r, _ = make([(["dmsetup", "table"], (0, text, ""))])
    t = dm.table("m")
    assert isinstance(t.target, Mirror) and t.target.handle_errors
    dm.table("m", inactive=True)
    assert dm.table_text("m") == text.strip()
    assert r.argvs == [["dmsetup", "table", "m"], ["dmsetup", "table", "--inactive", "m"],
                       ["dmsetup", "table", "m"]]


def test_status_uses_noflush_and_timeout() -> None:
    line = KERNEL["mirror_failed_error"]["status"]
    dm, r, _ = make([(["dmsetup", "status"], (0, line, ""))])
    assert dm.status_line("m") == line.strip()
    dm.status_line("m", noflush=False)
    assert r.argvs == [["dmsetup", "status", "--noflush", "m"], ["dmsetup", "status", "m"]]
    assert [c["timeout"] for c in r.calls] == [30, 30]
    st = dm.mirror_status("m")
    assert st.failed_legs == [1] and not st.healthy


def test_era_status() -> None:
    dm, _, _ = make([(["dmsetup", "status"], (0, KERNEL["era"]["status_snap"], ""))])
    st = dm.era_status("e")
    assert st.snapshot_block is not None and st.current_era == KERNEL["era"]["first_era"] + 1


TARGETS = ("dust             v1.0.0\nflakey           v1.5.0\nmirror           v1.14.0\n"
           "era              v1.0.0\nlinear           v1.4.0\nerror            v1.5.0\n")


def test_targets() -> None:
    dm, r, _ = make([(["dmsetup", "targets"], (0, TARGETS, ""))])
    t = dm.targets()
    assert t["era"] == "v1.0.0" and t["mirror"] == "v1.14.0" and len(t) == 6
    assert r.argvs == [["dmsetup", "targets"]]


def test_require_targets_present() -> None:
    dm, r, _ = make([(["dmsetup", "targets"], (0, TARGETS, ""))])
    dm.require_targets("era", "mirror", "linear")
    assert not any(a[0] == "modprobe" for a in r.argvs)


def test_require_targets_modprobes_then_finds() -> None:
    without = "linear           v1.4.0\n"
    dm, r, _ = make([(["dmsetup", "targets"], [(0, without, ""), (0, TARGETS, "")])])
    dm.require_targets("era", "mirror")
    assert r.argvs == [["dmsetup", "targets"], ["modprobe", "dm-era"], ["modprobe", "dm-mirror"],
                       ["dmsetup", "targets"]]
    assert [c["check"] for c in r.calls if c["argv"][0] == "modprobe"] == [False, False]


def test_require_targets_missing() -> None:
    dm, _, _ = make([(["dmsetup", "targets"], (0, "linear v1.4.0\n", "")),
                     (["modprobe"], (1, "", "modprobe: FATAL: Module dm-era not found"))])
    with pytest.raises(MissingDependency, match="era"):
        dm.require_targets("era", "linear")


# ---- EraTools -------------------------------------------------------------------------------

def era_rules(statuses: list[str], xml: str = "<blocks/>") -> list[tuple[list[str], Any]]:
    return [(["dmsetup", "status"], [(0, s, "") for s in statuses]),
            (["era_invalidate"], (0, xml, ""))]


def test_checkpoint() -> None:
    r = FakeRunner(era_rules(["0 2048 era 8 9/1024 4 -\n"]))
    tools = EraTools(r, DmSetup(r))
    assert tools.checkpoint("era-a") == 4
    assert r.argvs == [["dmsetup", "message", "era-a", "0", "checkpoint"],
                       ["dmsetup", "status", "--noflush", "era-a"]]


def test_written_since_argv_and_parse() -> None:
    xml = KERNEL["era"]["invalidate_since_first"]
    r = FakeRunner(era_rules([], xml))
    tools = EraTools(r, DmSetup(r))
    assert tools.written_since("/dev/loop3", 2) == [BlockRange(3, 4), BlockRange(200, 201)]
    assert r.calls == [{"argv": ["era_invalidate", "--metadata-snapshot", "--written-since", "2", "/dev/loop3"],
                        "check": True, "timeout": 300, "input": None}]


def test_written_since_failure_has_hint() -> None:
    r = FakeRunner([(["era_invalidate"], (1, "", "no metadata snapshot taken.\n"))])
    tools = EraTools(r, DmSetup(r))
    with pytest.raises(CommandError) as e:
        tools.written_since("/dev/loop3", 0)
    assert e.value.hint and "snapshot" in e.value.hint


def test_written_since_garbage_output() -> None:
    r = FakeRunner([(["era_invalidate"], (0, "not xml", ""))])
    with pytest.raises(DmmigError, match="cannot parse era_invalidate output"):
        EraTools(r, DmSetup(r)).written_since("/dev/loop3", 0)


def test_dirty_takes_queries_and_drops_the_snapshot() -> None:
    r = FakeRunner(era_rules(["0 2048 era 8 12/1024 4 28\n"],
                             '<blocks><range begin="0" end = "2"/><block block="2"/></blocks>'))
    tools = EraTools(r, DmSetup(r))
    ranges, now = tools.dirty("era-a", "/dev/loop3", 3)
    assert ranges == [BlockRange(0, 3)] and now == 4
    assert r.argvs == [  # no status before the take: a process start less per query
        ["dmsetup", "message", "era-a", "0", "take_metadata_snap"],
        ["dmsetup", "status", "--noflush", "era-a"],
        ["era_invalidate", "--metadata-snapshot", "--written-since", "3", "/dev/loop3"],
        ["dmsetup", "message", "era-a", "0", "drop_metadata_snap"],
    ]


def test_snapshot_drops_a_stale_one_first() -> None:
    # dm-era refuses a second snapshot ("metadata snapshot already exists"): one a crashed
    # dmmig left is dropped and the take retried
    takes = [(1, "", "device-mapper: message ioctl on era-a failed: Invalid argument"), (0, "", "")]
    r = FakeRunner([(["dmsetup", "message", "era-a", "0", "take_metadata_snap"], takes),
                    *era_rules(["0 2048 era 8 12/1024 4 28\n", "0 2048 era 8 12/1024 5 31\n"])])
    tools = EraTools(r, DmSetup(r))
    with tools.snapshot("era-a") as now:
        assert now == 5
    msgs = [a[4] for a in r.argvs if a[:2] == ["dmsetup", "message"]]
    assert msgs == ["take_metadata_snap", "drop_metadata_snap", "take_metadata_snap", "drop_metadata_snap"]


def test_snapshot_refused_without_a_stale_one_is_an_error() -> None:
    r = FakeRunner([(["dmsetup", "message", "era-a", "0", "take_metadata_snap"], (1, "", "boom")),
                    *era_rules(["0 2048 era 8 12/1024 4 -\n"])])
    with pytest.raises(CommandError):
        with EraTools(r, DmSetup(r)).snapshot("era-a"):
            pass
    assert [a[4] for a in r.argvs if a[:2] == ["dmsetup", "message"]] == ["take_metadata_snap"]


def test_snapshot_dropped_even_when_query_fails() -> None:
    r = FakeRunner([(["dmsetup", "status"], [(0, "0 2048 era 8 12/1024 4 28\n", "")]),
                    (["era_invalidate"], (1, "", "boom"))])
    tools = EraTools(r, DmSetup(r))
    with pytest.raises(CommandError):
        tools.dirty("era-a", "/dev/loop3", 0)
    assert r.argvs[-1] == ["dmsetup", "message", "era-a", "0", "drop_metadata_snap"]


def test_fake_runner_matches_protocol() -> None:
    # the fake's signature is the Runner protocol's: argv, check, timeout, input
    r: Callable[..., Result] = FakeRunner().run
    assert r(["true"], check=True, timeout=None, input=None).returncode == 0


def test_a_background_query_runs_niced_and_a_foreground_one_does_not(tmp_path: Path) -> None:
    # the cutover's second query and a copy round's run beside the guest's I/O and the resync
    # (never in a window): at the lowest CPU priority. The gate's catch-up and the cutover's
    # first query stand on the critical path: not niced
    r = FakeRunner(era_rules(["0 2048 era 8 12/1024 4 28\n"] * 2, "<blocks/>"))
    tools = EraTools(r, DmSetup(r))
    for background in (True, False):
        (tmp_path / "dirty").write_text("<blocks/>")  # what era_invalidate -o writes
        d, _ = tools.dirty_ranges("era-a", "/dev/loop3", 3, str(tmp_path / "dirty"), background=background)
        d.close()
    queries = [a for a in r.argvs if "era_invalidate" in a]
    assert queries == [["nice", "-n", "19", "era_invalidate", "--metadata-snapshot", "--written-since", "3", "-o",
                        str(tmp_path / "dirty"), "/dev/loop3"],
                       ["era_invalidate", "--metadata-snapshot", "--written-since", "3", "-o",
                        str(tmp_path / "dirty"), "/dev/loop3"]]


def round_query(tmp_path: Path, rules: list[tuple[list[str], Any]]) -> tuple[FakeRunner, int]:
    """A copy round's drained query of prepared disk d (era device 253:3), on RULES."""
    r = FakeRunner([(["dmsetup", "info"], (0, "dmmig-d-era;253;3;L--w;1;1;0;DMMIG-era-d\n", "")), *rules])
    stack = Stack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")))
    e = journal.Entry("d", "/dev/loop1", "7:1")
    e.metadata, e.block_sectors = "/dev/loop3", 128
    stack.journal.save(e, journal.COPYING)
    (tmp_path / "state" / "d.dirty.xml").write_text("<blocks/>")
    d, now, _ = stack.drained_dirty_ranges("d", 2)
    d.close()
    return r, now


def test_a_copy_rounds_query_is_niced(tmp_path: Path) -> None:
    r, now = round_query(tmp_path, era_rules(["0 2048 era 8 12/1024 4 -\n"] * 3, "<blocks/>"))
    assert now == 4
    assert [a[:4] for a in r.argvs if "era_invalidate" in a] == [["nice", "-n", "19", "era_invalidate"]]
    # the query ran between the snapshot's take and drop, after the top's resume; one info (the
    # era device's number with the check that it exists), no status before the suspend, and a
    # resume that does not wait for udev: each a process start per round
    dm = [a[1:] for a in r.argvs if a[0] == "dmsetup"]
    assert dm == [["info", "-c", "--noheadings", "--separator", ";", "-o",
                   "name,major,minor,attr,open,segments,events,uuid", "dmmig-d-era"],
                  ["suspend", "dmmig-d"], ["message", "dmmig-d-era", "0", "take_metadata_snap"],
                  ["resume", "--noudevsync", "dmmig-d"], ["status", "--noflush", "dmmig-d-era"],
                  ["message", "dmmig-d-era", "0", "drop_metadata_snap"]], dm


def test_a_copy_rounds_query_drops_a_snapshot_a_killed_dmmig_left_and_retakes_it(tmp_path: Path) -> None:
    # era refuses a second snapshot: the one left is dropped and the take retried inside the
    # suspension, and the top is resumed once
    takes = [(1, "", "device-mapper: message ioctl on dmmig-d-era failed: Invalid argument"), (0, "", "")]
    r, now = round_query(tmp_path, [(["dmsetup", "message", "dmmig-d-era", "0", "take_metadata_snap"], takes),
                                    *era_rules(["0 2048 era 8 12/1024 4 31\n", "0 2048 era 8 12/1024 5 33\n"])])
    assert now == 5
    dm = [a[1] if a[1] != "message" else a[4] for a in r.argvs if a[0] == "dmsetup" and a[1] != "info"]
    assert dm == ["suspend", "take_metadata_snap", "status", "drop_metadata_snap", "take_metadata_snap",
                  "resume", "status", "drop_metadata_snap"], dm


def test_a_held_query_leaves_its_snapshot_for_the_caller_and_a_failed_one_drops_it(tmp_path: Path) -> None:
    # the cutover's first query: its snapshot is dropped after the swap (a dmsetup process off
    # the critical path), so the query returns with it held; a query that fails must not leave it
    r = FakeRunner(era_rules(["0 2048 era 8 12/1024 4 28\n"] * 2, "<blocks/>"))
    tools = EraTools(r, DmSetup(r))
    (tmp_path / "dirty").write_text("<blocks/>")
    d, now = tools.dirty_ranges("era-a", "/dev/loop3", 3, str(tmp_path / "dirty"), hold=True)
    d.close()
    msgs = [a[4] for a in r.argvs if a[:2] == ["dmsetup", "message"]]
    assert now == 4 and msgs == ["take_metadata_snap"] and "era_invalidate" in r.argvs[-1]
    tools.release("era-a")
    assert r.argvs[-1] == ["dmsetup", "message", "era-a", "0", "drop_metadata_snap"]

    r = FakeRunner([(["dmsetup", "status"], [(0, "0 2048 era 8 12/1024 4 28\n", "")]),
                    (["era_invalidate"], (1, "", "boom"))])
    with pytest.raises(CommandError):
        EraTools(r, DmSetup(r)).dirty_ranges("era-a", "/dev/loop3", 0, str(tmp_path / "dirty"), hold=True)
    assert r.argvs[-1] == ["dmsetup", "message", "era-a", "0", "drop_metadata_snap"]


def test_a_devices_number_without_its_node_comes_from_dmsetup_info() -> None:
    """devno reads the node and sysfs (no process); a node that is not there (this machine has
    no device-mapper) falls back to dmsetup info, which also says when there is no device."""
    dm, r, _ = make([(INFO + ["dmmig-x-era"], (0, "dmmig-x-era;254;3;L--w;1;1;0;\n", ""))])
    assert dm.devno("dmmig-x-era") == "254:3"
    assert r.argvs == [INFO + ["dmmig-x-era"]]
    dm, r, _ = make([(INFO, NOT_THERE)])
    assert dm.devno("dmmig-gone-era") is None
