"""I/O pauses the guest sees on the top device, under an O_DIRECT writer, side by side in one
rig kernel: 20 plain live table swaps (the anchor: load + one resume, DmSetup.swap), then 20
copy-round snapshots (Stack.drained_dirty: suspend the top so that no write is in flight,
take era's metadata snapshot, resume; then the era_invalidate query and the drop, outside the
window). For each: the window as dmmig times it, and the writer's worst write and the number of
its writes slower than 5 ms (its view of the same pauses).

    .venv/bin/python -m bench.swap_pause
"""
from __future__ import annotations

import json
import statistics
import time

from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
GUEST = r"""
import json, sys, time
from dmmig.core import journal
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.core.stack import Stack
r = SubprocessRunner(); dm = DmSetup(r)
stack = Stack(r, dm, journal.Journal(journal.state_dir(None)))
top, what = sys.argv[1], sys.argv[2]
t = dm.table(top)
out = []
for i in range(20):
    t0 = time.monotonic()
    if what == "swap":
        dm.swap(top, t)
    else:
        stack.drained_dirty(top[len("dmmig-"):], 1)
    out.append((time.monotonic() - t0) * 1000)
    time.sleep(0.2)
print(json.dumps(out))
"""


def main() -> None:
    with UmlHost("bench") as h:
        print(f"rig boot: {h.boot_seconds:.1f}s")
        h.sh("truncate -s 64M /dev/shm/d && losetup /dev/loop0 /dev/shm/d")
        h.dmmig("wrap", "b", "/dev/loop0")
        h.dmmig("prepare", "b")
        for what, title in (("swap", "plain table swap (anchor)"), ("round", "copy round's drained snapshot")):
            w = h.spawn([PY, ORACLE, "write", "/dev/mapper/dmmig-b", "--record", f"/dev/shm/rec-{what}"])
            time.sleep(1)
            ms = json.loads(h.py(GUEST, "dmmig-b", what, cwd=str(ROOT)).out)
            w.signal(15)
            wr = json.loads(w.wait().out)
            print(f"{title}: call median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms; writer: worst "
                  f"{wr['max_latency_ms']:.0f} ms, {wr['writes_over_5ms']} of {wr['writes']} writes over 5 ms")
        h.dmmig("abort", "b")
        h.dmmig("unwrap", "b")


if __name__ == "__main__":
    main()
