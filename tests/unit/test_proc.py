"""proc: dmmig's daemons found again by a word of their command line."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dmmig.adapters import proc


def test_one_scan_finds_every_marker_and_no_zombie() -> None:
    # the set-up's leftover check asks for the watcher's and three tunnel markers at once:
    # one scan of /proc (each is ~0.1 s in a rig kernel), as exact as four
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    a = subprocess.Popen([*sleeper, "/run/dmmig-test/a.tunnel.log"])
    b = subprocess.Popen([*sleeper, "/run/dmmig-test/b.watch"])
    dead = subprocess.Popen([sys.executable, "-c", "pass", "/run/dmmig-test/c.watch"])  # left unreaped
    try:
        deadline = time.monotonic() + 10
        for p, marker in ((a, "a.tunnel.log"), (b, "b.watch")):  # exec'd: before, the command line is pytest's
            while marker not in Path(f"/proc/{p.pid}/cmdline").read_text() and time.monotonic() < deadline:
                time.sleep(0.01)
        while time.monotonic() < deadline:
            with open(f"/proc/{dead.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert sorted(proc.find("/run/dmmig-test/a.tunnel.log", "/run/dmmig-test/b.watch",
                                "/run/dmmig-test/c.watch")) == sorted([a.pid, b.pid])
        assert proc.find("/run/dmmig-test/b.watch") == [b.pid]
        assert proc.find("/run/dmmig-test/none") == []
        assert proc.alive(a.pid, "a.tunnel.log") and not proc.alive(a.pid, "b.watch")
        assert not proc.alive(dead.pid, "c.watch") and not proc.alive(None, "x")
    finally:
        for p in (a, b, dead):
            p.kill()
            p.wait()


# The leader thread leaves (pthread_exit) while a second thread sleeps on: the state a
# qemu-nbd can be in while SIGKILL takes its threads down one by one, one of them in a write
LEADER_FIRST = r"""
import ctypes, sys, threading, time
threading.Thread(target=time.sleep, args=(float(sys.argv[1]),)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_has_not_exited_while_a_thread_of_it_runs_though_its_command_line_is_gone() -> None:
    p = subprocess.Popen([sys.executable, "-c", LEADER_FIRST, "3"])
    try:
        started = proc.start_time(p.pid)
        assert started is not None
        deadline = time.monotonic() + 10
        while Path(f"/proc/{p.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        # what Export.alive reads is empty now: the old fence took this for gone
        assert Path(f"/proc/{p.pid}/cmdline").read_bytes() == b""
        assert not proc.exited(p.pid, started)
        deadline = time.monotonic() + 10
        while not proc.exited(p.pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.exited(p.pid, started)  # a zombie now, its last thread gone
    finally:
        p.kill()
        p.wait()
    assert proc.exited(p.pid, started)  # reaped
