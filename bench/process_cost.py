"""What a process start costs in a rig kernel against this machine's own kernel, side by side
in one run: the unit in which the rig measures dmmig's fixed costs (issue 14 part 4).

A `dmmig copy` starts Python twice (dmmig here, its agent there) and some twenty short
processes (dmsetup, era_invalidate, losetup, qemu-nbd, nbd-client, ssh); nbdcopy, the copy
benches' anchor, is one C process whose time is its data. A user-mode-linux kernel emulates
each process's system calls and page faults through ptrace, so it inflates the first far more
than the second. Each row is the median wall time of N runs of the same command, in one rig
kernel and then on this machine's kernel (no dm or nbd here, so only commands that do not
need them: dmsetup's `--version` is its library, not the driver), and their ratio.

    .venv/bin/python -m bench.process_cost [N]   (default 5)
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
ROWS = [
    ("true (fork + exec)", ["true"]),
    ("dmsetup --version", ["dmsetup", "--version"]),
    ("nice -n 19 true", ["nice", "-n", "19", "true"]),
    ("era_invalidate --help", ["era_invalidate", "--help"]),
    ("python -c pass", [PY, "-c", "pass"]),
    ("python: dmmig's CLI imported (agent, status, hotplug)", [PY, "-P", "-c", "import dmmig.entry.cli"]),
    ("python: and `dmmig copy`'s flow (paramiko)", [PY, "-P", "-c", "import dmmig.entry.cli, dmmig.flows.copying"]),
]

# timed inside the kernel that runs ARGV, so that the rig's console round trip is not counted
TIMER = r"""
import json, subprocess, sys, time
out = []
for _ in range(int(sys.argv[1])):
    t0 = time.monotonic()
    subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    out.append(time.monotonic() - t0)
print(json.dumps(out))
"""


def here(n: int, argv: list[str]) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run(argv, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.monotonic() - t0)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with UmlHost("bench") as h:
        print(f"rig boot: {h.boot_seconds:.1f}s; median of {n} runs each")
        print(f"  {'command':55s} {'rig kernel':>11s} {'this kernel':>12s} {'ratio':>7s}")
        for title, argv in ROWS:
            rig = json.loads(h.py(TIMER, str(n), *argv, cwd=str(ROOT)).out)
            own = here(n, argv)
            r, o = statistics.median(rig), statistics.median(own)
            print(f"  {title:55s} {r * 1000:9.0f} ms {o * 1000:10.1f} ms {r / o:6.0f}x", flush=True)


if __name__ == "__main__":
    main()
