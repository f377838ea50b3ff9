"""What the guest feels of the cutover: an O_DIRECT writer's worst write across `dmmig cutover`
against its worst write across plain live table swaps of the same top device (the anchor),
side by side in one rig run, for each disk size given.

Two UML kernels on a veth pair; the source disk is a sparse file on the guest's tmpfs (only
the first 96 MiB hold data), the destination the same; --transport ssh. For each size: wrap,
prepare, copy; the oracle writer (tests/tools/oracle.py, 4 KiB O_DIRECT writes to random
blocks of the first 96 MiB) runs across 10 plain swaps (DmSetup.swap: load + suspend +
resume of the same table), then another across the cutover (other blocks), then a third as long
on the mirror in sync (a second anchor: what a replicated write costs without the cutover); then
the oracle checks both disks against the three writers' records.

Besides the worst write across each run, it prints the worst of the writes a swap held (those
that overlap a swap's resume: the plain swaps', and the cutover's as its --debug log and its
`pauses` place them), and the cutover's worst before its first swap (the set-up: other processes
in this one-CPU kernel, e.g. the tunnel's SSH login) and after it (every write also goes to the
NBD leg, behind the resync's copies).

    [CUT_ARGS="--resync-parts 4"] [BASE=DIR] [REPEAT=N] .venv/bin/python -m bench.cutover_pause [SIZE ...]
    (default: 128M; e.g. 128M 2T)

BASE=DIR (a tree holding an older dmmig/ package, e.g. `git archive COMMIT dmmig | tar -x -C DIR`):
each size also runs with that dmmig's cutover (everything else as this tree's), right after this
one's; REPEAT=N (default 1) runs the pair N times per size, alternating.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

from bench.copy_wall import wrapper
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
CUT_ARGS = os.environ.get("CUT_ARGS", "").split()  # e.g. "--resync-parts 4"
BASE = os.environ.get("BASE")
REPEAT = int(os.environ.get("REPEAT", "1"))
SWAPS = r"""
import json, sys, time
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.dm.dmsetup import DmSetup
dm = DmSetup(SubprocessRunner())
t = dm.table(sys.argv[1])
out = []
for i in range(10):
    t0, w0 = time.monotonic(), time.time()
    dm.swap(sys.argv[1], t)
    out.append((w0, (time.monotonic() - t0) * 1000))
    time.sleep(0.3)
print(json.dumps(out))
"""
SWAP_RUN = "run: ['dmsetup', 'resume'"  # DmSetup.swap's resume, in a --debug log


def logged_at(line: str) -> float | None:
    """The wall time of a --debug log line (logging's asctime, this machine's zone)."""
    try:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def worst_in(rec: str, spans: list[tuple[float, float]]) -> float:
    """The writer's worst write (ms) among those that overlap one of SPANS (wall start, end):
    the writes the swap held. Writes under 5 ms are not recorded: 5 is the floor."""
    with open(rec) as f:
        slow = json.load(f)["slow_at"]
    held = [ms for end, ms in slow if any(end - ms / 1000 < e and end > s for s, e in spans)]
    return max(held, default=5.0)


def worst_between(rec: str, lo: float, hi: float) -> float:
    with open(rec) as f:
        slow = json.load(f)["slow_at"]
    return max((ms for end, ms in slow if lo <= end - ms / 1000 < hi), default=5.0)


def writer(a: UmlHost, rec: str, blocks: str, dev: str = "/dev/mapper/dmmig-cp") -> object:
    """The oracle's writer on BLOCKS (4 KiB, A:B) of DEV, started and writing."""
    job = a.spawn([PY, ORACLE, "write", dev, "--seed", "5", "--record", rec, "--blocks", blocks])
    for _ in range(100):
        if a.run(["test", "-e", rec + ".started"], check=False).rc == 0:
            break
        time.sleep(0.1)
    time.sleep(1)
    return job


def stop(job: object) -> dict:
    job.signal(15)  # type: ignore[attr-defined]
    return json.loads(job.wait().out)  # type: ignore[attr-defined]


def one(a: UmlHost, b: UmlHost, size: str, label: str = "", exe: str | None = None) -> None:
    """EXE: the dmmig that cuts over (None: this tree's)."""
    # the first 96 MiB hold the oracle's seq-0 content (its fill, through a loop device that
    # ends there), so that its check knows every block of them; the rest is a hole
    a.sh(f"truncate -s {size} /dev/shm/src && l=$(losetup -f --show --sizelimit 96M /dev/shm/src) && "
         f"{PY} {ORACLE} fill $l --seed 5 && losetup -d $l && losetup /dev/loop0 /dev/shm/src")
    b.sh(f"truncate -s {size} /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    rec1, rec2, rec3 = f"{a.shared}/cp-swap.rec", f"{a.shared}/cp-cut.rec", f"{a.shared}/cp-mirror.rec"
    try:
        a.dmmig("wrap", "cp", "/dev/loop0")
        a.dmmig("prepare", "cp")
        t0 = time.monotonic()
        a.dmmig("copy", "cp", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG, *SSH_OPTS,
                timeout=7200)
        copy_s = time.monotonic() - t0
        w = writer(a, rec1, "0:8192")  # the two writers' records cover disjoint blocks
        swap_at = json.loads(a.py(SWAPS, "dmmig-cp", cwd=str(ROOT)).out)
        swaps = [ms for _, ms in swap_at]
        sw = stop(w)
        anchor_held = worst_in(rec1, [(w0, w0 + ms / 1000) for w0, ms in swap_at])
        w = writer(a, rec2, "8192:16384")
        t0, w0 = time.monotonic(), time.time()
        res = a.run([exe or DMMIG, "--debug", "cutover", "cp", "--json", *CUT_ARGS])
        out = res.out
        cut_s = time.monotonic() - t0
        time.sleep(1)
        cw = stop(w)
        # the second anchor: the same writer as long again on the mirror in sync (every write on
        # both legs, the NBD leg through the tunnel): what replication itself costs a write
        w = writer(a, rec3, "16384:24576")
        time.sleep(cut_s + 1)
        mw = stop(w)
        cut = next(json.loads(ln) for ln in reversed(out.splitlines()) if '"summary"' in ln)
        # the cutover's swaps as the writer saw them: each resume's start (its --debug log) and
        # the pause dmmig timed; the writes that overlap them are the ones a swap held
        starts = [t for t in (logged_at(ln) for ln in res.err.splitlines() if SWAP_RUN in ln) if t]
        spans = [(t, t + p) for t, p in zip(starts, cut.get("pauses", []))]
        cut_held = worst_in(rec2, spans) if spans else float("nan")
        setup_worst = worst_between(rec2, w0, spans[0][0]) if spans else float("nan")
        after_worst = worst_between(rec2, spans[0][1], time.time()) if spans else float("nan")
        bad = []
        for dev, h in (("/dev/loop0", a), ("/dev/loop0", b)):
            r = h.run([PY, ORACLE, "check", dev, "--seed", "5", "--blocks", "0:24576", "--record", rec1,
                       "--record", rec2, "--record", rec3], check=False)
            if r.rc != 0:
                bad.append(f"{h.name}: {r.out[-300:]}")
        print(f"{size}{label}: load {os.getloadavg()[0]:.1f}; copy {copy_s:.1f} s; cutover {cut_s:.1f} s, its windows "
              f"{'+'.join(f'{p * 1000:.0f}' for p in cut.get('pauses', [cut['suspended_seconds']]))} ms")
        print(f"  plain swap (anchor): call max {max(swaps):.0f} ms; writer worst {sw['max_latency_ms']:.0f} ms, "
              f"{sw['writes_over_5ms']} of {sw['writes']} writes over 5 ms")
        print(f"  cutover:             writer worst {cw['max_latency_ms']:.0f} ms, {cw['writes_over_5ms']} of "
              f"{cw['writes']} writes over 5 ms = {cw['max_latency_ms'] / max(sw['max_latency_ms'], 1):.2f}x the swap's"
              + ("; ORACLE: " + " | ".join(bad) if bad else "; oracle: every write on both disks"), flush=True)
        print(f"  the writes a swap held (overlapping its resume): plain swaps' worst {anchor_held:.0f} ms, the "
              f"cutover's swaps' worst {cut_held:.0f} ms = {cut_held / anchor_held:.2f}x; the cutover's worst "
              f"before its swap (set-up) {setup_worst:.0f} ms, after it (mirroring, resync) {after_worst:.0f} ms",
              flush=True)
        print(f"  mirror in sync, as long: writer worst {mw['max_latency_ms']:.0f} ms, {mw['writes_over_5ms']} of "
              f"{mw['writes']} writes over 5 ms; the cutover's worst = "
              f"{cw['max_latency_ms'] / max(mw['max_latency_ms'], 1):.2f}x this", flush=True)
        if "seconds" in cut:
            print("  cutover by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in cut["seconds"].items()))
        a.dmmig("finish", "cp")
    finally:
        a.sh(f"{DMMIG} abort cp; {DMMIG} unwrap cp; true", check=False)
        a.sh(f"losetup -d /dev/loop0; rm -f /dev/shm/src {rec1}* {rec2}* {rec3}*", check=False)
        b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst", check=False)


def main() -> None:
    sizes = sys.argv[1:] or ["128M"]
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        variants = [("", None)] + ([(" (base)", wrapper(os.path.abspath(BASE)))] if BASE else [])
        for size in sizes:
            for _ in range(REPEAT):
                for label, exe in variants:
                    one(a, b, size, label, exe)
    finally:
        p.stop()


if __name__ == "__main__":
    main()
