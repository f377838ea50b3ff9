"""What a rig kernel logged during a test: a BUG, a WARNING, an Oops fails the test, with the
log lines. Read from the guest's /dev/kmsg (every record, whatever the console's loglevel),
after the sequence number the test started at."""
from __future__ import annotations

import json
import re

from tests.rig.uml import UmlHost

# kmsg(SINCE): the last record's sequence number and the lines of the records after SINCE
# (None: none). Part of the leak fixture's snapshot script (tests/rig/leaks.py): no extra
# process start in the guest per test (each costs ~0.5 s in the rig)
KMSG = r"""
def kmsg(since):
    import os
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    last, lines = -1, []
    try:
        while True:
            try:
                rec = os.read(fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten while we read: go on with the next
                continue
            head, _, msg = rec.decode(errors="replace").partition(";")
            seq = int(head.split(",")[1])
            last = max(last, seq)
            if since is not None and seq > since:
                lines.append(msg.split("\n")[0])  # a record's continuation lines are key=value pairs
    finally:
        os.close(fd)
    return {"last": last, "lines": lines}
"""

# the first line of each kind of kernel complaint (printk formats of Linux 6.1)
ALARM = re.compile(r"^(?:BUG[: ]|WARNING:|UBSAN:|KASAN:|kernel BUG at |Oops|general protection fault|"
                   r"Kernel panic|------------\[ cut here \]------------|list_(?:add|del) corruption|"
                   r"refcount_t: )")
CONTEXT_LINES = 40  # the call trace after the first line


def since(host: UmlHost, seq: int) -> list[str]:
    """HOST's kernel log lines after record SEQ (on its own, outside the leak snapshot)."""
    code = KMSG + "import json, sys\nprint(json.dumps(kmsg(int(sys.argv[1]))))"
    return list(json.loads(host.py(code, str(seq)).out)["lines"])


def report(host: str, lines: list[str]) -> list[str]:
    """What a failed test shows: HOST's complaints in LINES, or [] if none."""
    found = problems(lines)
    return [f"--- kernel {host} logged:\n" + "\n".join(found)] if found else []


def problems(lines: list[str]) -> list[str]:
    """Each BUG, WARNING or Oops in LINES with the lines after it (its call trace); [] if none."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if ALARM.match(lines[i]):
            out += lines[i:i + CONTEXT_LINES]
            i += CONTEXT_LINES
        else:
            i += 1
    return out
