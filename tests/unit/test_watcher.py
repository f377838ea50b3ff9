"""The leg watcher: found again by its own marker only."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dmmig.adapters.runner import SubprocessRunner
from dmmig.core import journal
from dmmig.core.mirror import MirrorSide
from dmmig.core.records import MirrorState
from dmmig.errors import Steps


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
