"""Peak RSS of every dmmig process, per step, at 128 MiB and at 2 TiB side by side in one rig
run (the same two kernels, one after the other), with each step's wall time: the whole flow of
tests/tools/big_flow.py (wrap, prepare, copy with rounds under three oracle writers, cutover,
verify of the written areas, finish) on a sparse disk whose only data are three 8 MiB areas.
RSS: rss.py's wait4 peak of each dmmig command on the source (its waited children included:
era_invalidate, dmsetup) and of each agent dmmig ran on the destination. The anchor is the
128 MiB run: the ratio says how much a step grows with the disk.

    .venv/bin/python -m bench.big_disk
"""
from __future__ import annotations

import json
import tempfile
import time

from tests.rig.pair import Pair
from tests.tools.big_flow import Flow

MiB, TiB = 1 << 20, 1 << 40


def main() -> None:
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-big-"))
    runs: dict[str, Flow] = {}
    try:
        a, b = p.start()
        print(f"rig: a {a.boot_seconds:.1f}s, b {b.boot_seconds:.1f}s; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        for label, size in (("128 MiB", 128 * MiB), ("2 TiB", 2 * TiB)):
            f = Flow(a, b, f"big{size.bit_length()}", size)
            f.setup()
            try:
                f.run()
            finally:
                f.teardown()
            runs[label] = f
    finally:
        p.stop()
    small, big = runs["128 MiB"], runs["2 TiB"]
    print(f"{'step':10} {'RSS a 128M':>10} {'RSS a 2T':>9} {'ratio':>6} {'RSS b 128M':>10} {'RSS b 2T':>9} "
          f"{'time 128M':>9} {'time 2T':>8}")
    for step, s in small.steps.items():
        t = big.steps[step]
        ratio = t["rss_mib_a"] / s["rss_mib_a"] if s["rss_mib_a"] else float("nan")
        print(f"{step:10} {s['rss_mib_a']:9.1f}M {t['rss_mib_a']:8.1f}M {ratio:6.2f} {s['rss_mib_b']:9.1f}M "
              f"{t['rss_mib_b']:8.1f}M {s['seconds']:8.1f}s {t['seconds']:7.1f}s")
    for label, f in runs.items():
        print(f"{label}: {json.dumps(f.facts)}")
        if f.problems:
            print(f"{label}: BOUNDS BROKEN: {f.problems}")


if __name__ == "__main__":
    main()
