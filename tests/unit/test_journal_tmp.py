"""A dmmig killed inside a journal write leaves NAME.json.tmp.PID: abort removes it, never one
of a dmmig still running."""
from __future__ import annotations

import os
from pathlib import Path

from dmmig.core import journal


def test_only_the_half_written_journals_of_dead_processes_are_stale(tmp_path: Path) -> None:
    j = journal.Journal(str(tmp_path))
    dead, live = tmp_path / "vm1.json.tmp.999999999", tmp_path / f"vm1.json.tmp.{os.getpid()}"
    other = tmp_path / "vm10.json.tmp.999999999"
    for f in (dead, live, other, tmp_path / "vm1.json"):
        f.write_text("{")
    assert j.stale_tmp("vm1") == [str(dead)]
    assert journal.Journal(str(tmp_path / "none")).stale_tmp("vm1") == []
