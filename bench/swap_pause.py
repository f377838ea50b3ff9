"""I/O pause of one live table swap on the top device, under an O_DIRECT writer.

Boots a rig kernel, wraps+prepares a 64 MiB disk, runs the oracle writer on the top device
and swaps the top table 20 times (dmsetup load/suspend/resume via dmmig's own DmSetup.swap);
prints the median and max suspend->resume time and the writer's worst write latency
against its median (the writer's view of the same pause).

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
from dmmig.runner import SubprocessRunner
from dmmig.dm.dmsetup import DmSetup
r = SubprocessRunner(); dm = DmSetup(r)
top = sys.argv[1]
t = dm.table(top)
out = []
for i in range(20):
    out.append(dm.swap(top, t) * 1000)
    time.sleep(0.2)
print(json.dumps(out))
"""


def main() -> None:
    with UmlHost("bench") as h:
        print(f"rig boot: {h.boot_seconds:.1f}s")
        h.sh("truncate -s 64M /dev/shm/d && losetup /dev/loop0 /dev/shm/d")
        h.dmmig("wrap", "b", "/dev/loop0")
        h.dmmig("prepare", "b")
        w = h.spawn([PY, ORACLE, "write", "/dev/mapper/dmmig-b", "--record", "/dev/shm/rec"])
        time.sleep(1)
        # baseline without swaps
        ms = json.loads(h.py(GUEST, "dmmig-b", cwd=str(ROOT)).out)
        w.signal(15)
        print("writer:", w.wait().out.strip())
        print(f"swap pause over 20 swaps under the writer: median {statistics.median(ms):.1f} ms, "
              f"min {min(ms):.1f} ms, max {max(ms):.1f} ms")
        h.dmmig("abort", "b")
        h.dmmig("unwrap", "b")


if __name__ == "__main__":
    main()
