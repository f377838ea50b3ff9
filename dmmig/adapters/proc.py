"""The daemons dmmig leaves running while a disk is mirrored (SSH tunnel, leg watcher),
found again by pid plus a word of their command line: a pid alone may have been reused."""
from __future__ import annotations

import os
import signal
import time


def alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    return _running_with(pid, (marker,))


def _running_with(pid: int, markers: tuple[str, ...]) -> bool:
    """PID runs (not a zombie) with one of MARKERS in its command line. The stat file is read
    only on a match: in a user-mode-linux rig kernel each open costs ~0.3 ms, and a scan of
    /proc opens one file per process this way instead of two."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        if not any(m in cmd for m in markers):
            return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def start_time(pid: int) -> str | None:
    """PID's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names
    one process, never the next one the kernel gives that pid. None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def exited(pid: int, started: str) -> bool:
    """Every thread of the process PID, started at STARTED, has left the kernel: reaped (its
    pid gone or another process's), or a zombie leader whose last other thread has exited.
    Not its command line: that empties as soon as the leader thread exits, while another
    thread of it may still be inside a write."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return True
    if fields[19] != started:
        return True
    return fields[0] in ("Z", "X") and int(fields[17]) <= 1


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


def find(*markers: str) -> list[int]:
    """Pids whose command line contains one of MARKERS (daemons whose pids were never
    journaled), in one scan of /proc: ~0.1 s each in a rig kernel."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me and _running_with(int(p), markers)]


def yield_cpu(pid: int) -> None:
    """PID to the lowest CPU priority (nice 19): a daemon whose start should take only CPU
    nobody else wants (the leg watcher, started during the cutover's set-up). It may raise
    its own back (root may: CAP_SYS_NICE). A pid already gone is no error."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except ProcessLookupError:
        pass


def reclaim_cpu() -> None:
    """This process back to the normal CPU priority (nice 0) after yield_cpu, if allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        pass
