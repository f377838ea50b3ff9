"""Run a command and record its peak memory: the oracle for "dmmig's RSS stays bounded".

    rss.py LOG -- ARGV...

Runs ARGV as a child, waits for it with wait4 and appends one JSON line to LOG: argv, exit
status, seconds and maxrss_kib, the peak resident set of the child and of every process it
waited for (Linux folds a waited child's peak into its parent's: era_invalidate, dmsetup, ...).
Exits with the child's status. It lets go of its own stdin/stdout at once, so a child that
relays them (`dmmig agent relay`) sees the same end-of-file as without it. SIGTERM, SIGINT
and SIGHUP are passed on. It shares no code with dmmig.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> int:
    log, sep, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if sep != "--" or not argv:
        print("usage: rss.py LOG -- ARGV...", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, status, ru = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    rc = os.waitstatus_to_exitcode(status)
    line = json.dumps({"argv": argv, "rc": rc, "seconds": round(time.monotonic() - t0, 3),
                       "maxrss_kib": ru.ru_maxrss}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
