"""The suspend guard: a dm device this process suspended is resumed if the process dies first.

dmmig suspends the top device (the one blkback serves) for short windows: each copy round's
metadata snapshot, the cutover, the handover gate. A dmmig SIGKILLed inside one would leave
the guest's disk frozen until an operator ran `dmmig abort`. So the first suspend starts a
small companion process (`python -m dmmig.adapters.dm.guard STATE`) that reads "S NAME" / "R NAME"
lines on a pipe from this process; when the pipe ends (this process exited or was killed) it
drops any inactive table of every device still marked suspended (a cutover that did not
finish: its mirror is not wanted), resumes it, and says so in STATE/NAME.guard.log, which
`dmmig status` shows and `dmmig abort` removes. One guard serves every device of the process.
"""
from __future__ import annotations

import os
import sys
import threading

from dmmig.adapters.runner import Runner
from dmmig.names import Files


def log_path(state: str, name: str) -> str:
    return Files(state, name).guard_log


class SuspendGuard:
    def __init__(self, runner: Runner, state: str) -> None:
        self.r = runner
        self.state = state
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """The companion process, if not running yet (the first suspend starts it otherwise)."""
        with self._lock:
            self._start()

    def suspending(self, name: str) -> None:
        """Before the suspend: from now on, this process dying means resume NAME."""
        self._send(f"S {name}\n")

    def resumed(self, name: str) -> None:
        self._send(f"R {name}\n")

    def _start(self) -> int:
        if self._fd is None:
            self._pid, self._fd = self.r.spawn_piped([sys.executable, "-m", "dmmig.adapters.dm.guard", self.state],
                                                     logfile=os.devnull)
        return self._fd

    def _send(self, line: str) -> None:
        with self._lock:
            os.write(self._start(), line.encode())


def main(state: str) -> int:
    """The guard process: stdin is the pipe; it ends when the dmmig that started us exits."""
    suspended: set[str] = set()
    for line in sys.stdin:
        op, _, name = line.strip().partition(" ")
        if op == "S":
            suspended.add(name)
        elif op == "R":
            suspended.discard(name)
    if not suspended:
        return 0  # the usual end: everything was resumed
    import time

    from dmmig.adapters.dm.dmsetup import DmSetup
    from dmmig.adapters.runner import SubprocessRunner
    dm = DmSetup(SubprocessRunner(default_timeout=30))
    rc = 0
    for name in sorted(suspended):
        try:
            info = dm.info(name)
            if info is None or not info.suspended:
                continue
            if info.has_inactive:
                dm.clear_inactive(name)
            dm.resume(name)
            what = "the dmmig that suspended it died; the guard resumed it"
        except Exception as e:  # noqa: BLE001 - try every device, report each
            what, rc = f"the dmmig that suspended it died; the guard could not resume it: {e}", 1
        with open(log_path(state, name), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {what}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
