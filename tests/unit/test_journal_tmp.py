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


def test_saves_from_two_threads_never_collide(tmp_path: Path) -> None:
    # the cutover's leg thread journals the tunnel's pid and the NBD device while the main thread
    # journals the log devices: both write NAME.json.tmp.PID, so without the journal's lock one
    # thread's rename took the other's file (FileNotFoundError) or the JSON came out mixed
    import json
    import threading

    j = journal.Journal(str(tmp_path))
    entry = journal.Entry("vm1", "/dev/loop0", "7:0")
    errors: list[BaseException] = []

    def saver(n: int) -> None:
        try:
            for i in range(300):
                if n:
                    entry.mirror.log_devs.append(f"/dev/loop{i}")
                else:
                    entry.mirror.nbd = f"/dev/nbd{i}"
                j.save(entry)
        except BaseException as e:  # noqa: BLE001 - the test's verdict
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    saved = json.loads((tmp_path / "vm1.json").read_text())
    assert saved["mirror"]["nbd"] == "/dev/nbd299" and len(saved["mirror"]["log_devs"]) == 300
    assert [f.name for f in tmp_path.iterdir()] == ["vm1.json"]
