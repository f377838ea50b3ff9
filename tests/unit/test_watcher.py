"""The leg watcher: started before the cutover's swap, found again by its own marker only."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dmmig.adapters.dm.dmsetup import DmInfo
from dmmig.adapters.dm.targets import CoreLog, Mirror, MirrorStatus, Table
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core import journal, watch
from dmmig.core.mirror import MirrorSide
from dmmig.core.records import MirrorState
from dmmig.entry import watch as watch_entry
from dmmig.errors import CommandError, Steps
from dmmig.flows import cutover
from dmmig.names import Files
from dmmig.progress import Progress


def _exec_d(p: subprocess.Popen[bytes], word: str) -> None:
    deadline = time.monotonic() + 10  # until it has exec'd: before, its command line is pytest's
    while word not in Path(f"/proc/{p.pid}/cmdline").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_disks_teardown_leaves_the_watcher_of_a_disk_whose_name_it_begins(tmp_path: Path) -> None:
    """Two migrations at once, d1 and d10: d1's marker was a prefix of d10's watcher's command
    line, so d1's cutover (its leftover check) or abort stopped d10's watcher, and a failure of
    d10's leg went untimed."""
    state = str(tmp_path)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "--state-dir", state, "watch"]
    d10 = subprocess.Popen([*sleeper, "d10", "--after-stdin"])
    d1_old = subprocess.Popen([*sleeper, "d1"])  # as an older dmmig started it: the name ends the line
    try:
        _exec_d(d10, "d10")
        _exec_d(d1_old, "d1")
        side = MirrorSide(SubprocessRunner(), state)
        assert side.leftovers("d1")  # its own, in the old form
        steps = Steps()
        side.teardown("d1", journal.Entry("d1", "/dev/loop1", "7:1", phase=journal.MIRRORING,
                                          mirror=MirrorState()), steps)
        assert d1_old.wait(10) is not None
        assert d10.poll() is None, "d1's teardown stopped d10's watcher"
        assert not side.leftovers("d1")
        assert side.leftovers("d10")
        assert steps.errors == []
    finally:
        for p in (d10, d1_old):
            p.kill()
            p.wait()


def test_the_watcher_started_before_the_swap_looks_only_once_its_gate_closes(tmp_path: Path) -> None:
    """cutover starts it during the set-up (its Python start off the resync) and closes the pipe
    after the swap; until then it must not look (it would find no mirror and exit)."""
    state = str(tmp_path)
    side = MirrorSide(SubprocessRunner(), state)
    entry = journal.Entry("d1", "/dev/loop1", "7:1", phase=journal.CUTTING_OVER, mirror=MirrorState())
    gate = side.start_watcher(entry, lambda: None)
    pid = entry.mirror.watcher
    assert pid
    try:
        time.sleep(3)  # far longer than its start on this machine
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the watcher looked before its gate closed"
        assert side.leftovers("d1")
    finally:
        os.close(gate)
    deadline = time.monotonic() + 30
    while (got := os.waitpid(pid, os.WNOHANG)) == (0, 0):  # no mirror here (no dm at all): it looks, and ends
        assert time.monotonic() < deadline, "the watcher did not look once its gate closed"
        time.sleep(0.05)
    with open(Files(state, "d1").mirror("watch.log")) as f:
        logged = f.read()
    # 0: watch() found no mirror and returned (2 would be its entry refusing the words it got)
    assert os.waitstatus_to_exitcode(got[1]) == 0, logged


def test_the_watchers_own_entry_takes_only_the_words_cutover_gives_it() -> None:
    assert watch_entry.main(["--state-dir", "/x", "watch", "d1"]) == 2
    assert watch_entry.main(["--state-dir", "/x", "watch", "d1", "--after-stdin", "more"]) == 2


class _Dm:
    """What the watcher and the resync's wait ask of DmSetup, scripted: each wake returns the
    next counter; the status lines come in turn. Counts the processes each kind would be."""

    def __init__(self, wakes: list[int | None], statuses: list[str], events: int = 3) -> None:
        self.wakes, self.statuses, self.events = wakes, statuses, events
        self.asked: list[str] = []

    def info(self, name: str) -> DmInfo | None:
        self.asked.append("info")
        return DmInfo(name, 254, 0, "L--w", 1, 1, self.events, "")

    def table(self, name: str) -> Table:
        self.asked.append("table")
        return Table(Mirror(2048, CoreLog(128, "nosync"), ("254:1", "43:0"), handle_errors=True))

    def mirror_status(self, name: str) -> MirrorStatus:
        self.asked.append("status")
        return MirrorStatus.parse_lines(self.statuses.pop(0))

    def wait_event(self, name: str, event_nr: int, timeout: float) -> int | None:
        self.asked.append(f"wait {event_nr}")
        if not self.wakes:
            raise CommandError(["dmsetup", "wait"], 1, "", "No such device")
        got = self.wakes.pop(0)
        if got is not None:
            self.events = got
        return got


HEALTHY = "0 2048 mirror 2 254:1 43:0 16/16 1 AA 1 core"
FAILED = "0 2048 mirror 2 254:1 43:0 16/16 1 AD 1 core"


def test_the_watcher_pays_a_status_per_wake_and_records_the_counter_of_the_failure(tmp_path: Path) -> None:
    """Every part of the resync raises an event when in sync, and the watcher runs on the CPU
    the resync needs: it asked info, table and status at each wake; now only status."""
    dm = _Dm(wakes=[4, 5, None], statuses=[HEALTHY, HEALTHY, FAILED, FAILED])
    gated: list[bool] = []

    def gone_after_the_last_wake(name: str) -> DmInfo | None:  # the mirror removed (finish)
        dm.asked.append("info")
        return None if len(dm.asked) > 9 else DmInfo(name, 254, 0, "L--w", 1, 1, dm.events, "")
    dm.info = gone_after_the_last_wake  # type: ignore[method-assign]
    assert watch.watch(dm, str(tmp_path), "d1", "dmmig-d1", lambda: gated.append(True)) == 0  # type: ignore[arg-type]
    assert gated == [True]
    assert dm.asked[:6] == ["info", "table", "status", "wait 3", "status", "wait 4"]
    rec = watch.read_health(str(tmp_path), "d1")
    assert rec is not None and rec.events == 5 and rec.failed_legs == [1]


def test_the_resync_wait_takes_the_counter_from_each_wake() -> None:
    dm = _Dm(wakes=[4, 5], statuses=[HEALTHY.replace("16/16", "2/16"), HEALTHY.replace("16/16", "9/16"), HEALTHY])
    stack: Any = SimpleNamespace(dm=dm)
    events, first_out = cutover._wait_sync(stack, "dmmig-d1", 16, 60, Progress(), "d1")
    assert (events, first_out) == (5, 14)
    # one info to start from and one to see that no event followed the last one: none per wake
    assert dm.asked == ["info", "status", "wait 3", "status", "wait 4", "status", "info"]
