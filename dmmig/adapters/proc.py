"""The daemons dmmig leaves running while a disk is mirrored (SSH tunnel, leg watcher),
found again by pid plus a word of their command line: a pid alone may have been reused."""
from __future__ import annotations

import os
import signal
import time


def alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return marker in cmd


def stop(pid: int | None, marker: str, timeout: float = 5) -> bool:
    """SIGTERM, then SIGKILL; True if it was running."""
    if not alive(pid, marker):
        return False
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid, marker) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
        while alive(pid, marker) and time.monotonic() < deadline + timeout:
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)
    return True


def exit_status(pid: int) -> int | None:
    """Exit code of our own dead child (None if not ours or already collected)."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if got else None


def _reap(pid: int) -> None:
    try:  # our own child (spawned by this very process): collect it, or it stays a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def parent_runs(pid: int, marker: str) -> bool:
    """PID's parent's command line contains MARKER (a daemon whose dmmig still runs); False
    once that dmmig died and the daemon was handed to init or a subreaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return alive(ppid, marker)


def find(marker: str) -> list[int]:
    """Pids whose command line contains MARKER (a daemon whose pid was never journaled)."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid() and alive(int(p), marker):
            out.append(int(p))
    return out
