"""Where `dmmig cutover`'s wall time goes besides the kernel's resync: the set-up (tunnel,
agent calls, NBD attach, log devices, table swaps, era queries) by phase, on the issue's
scattered delta (every other 64 KiB era block of a 96 MiB disk, 48 MiB), side by side with
anchors measured in the same run: one process start in the guest (`true`), one `dmmig`
start (`dmmig --help`), and the `dmmig copy` round that moved the same delta.

Two UML kernels on a veth pair, --transport ssh (and nbd with TLS if asked).

    [REPEAT=2] [BASE=DIR] .venv/bin/python -m bench.cutover_setup [SIZE_MIB [TRANSPORT ...]]   (default: 96 ssh)

BASE=DIR (a tree holding an older dmmig/ package, e.g. `git archive COMMIT dmmig | tar -x -C DIR`):
each repeat runs that dmmig's cutover too, right after this one's, on the same disk and delta.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from bench import libraries
from bench.copy_wall import wrapper
from bench.resync_speed import WRITE, summary
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
REPEAT = int(os.environ.get("REPEAT", "2"))
CUT_ARGS = os.environ.get("CUT_ARGS", "").split()
TRACE = os.environ.get("TRACE") == "1"
BASE = os.environ.get("BASE")
# TRACE=1: the cutover runs with every command it starts timed (the runner wrapped), printed
# after the phases: which process starts the set-up waits for
TRACED = r"""
import atexit, sys, time
from dmmig.adapters import runner
t0, calls, run = time.monotonic(), [], runner.SubprocessRunner.run
def timed(self, argv, **kw):
    s = time.monotonic()
    try:
        return run(self, argv, **kw)
    finally:
        calls.append((s - t0, time.monotonic() - s, " ".join(argv[:4])[:70]))
runner.SubprocessRunner.run = timed
import dmmig
atexit.register(lambda: print(f"TRACE ({dmmig.__file__}) " + "; ".join(f"{a:.2f}+{d:.2f} {c}" for a, d, c in calls),
                              file=sys.stderr))
from dmmig.entry.cli import main
sys.argv[0] = "dmmig"
sys.exit(main())
"""


def timed(fn: object) -> float:
    t0 = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - t0


def run(a: UmlHost, b: UmlHost, size: int, transport: str) -> None:
    a.sh(f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={size} status=none && losetup /dev/loop0 /dev/shm/src")
    b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    top = "/dev/mapper/dmmig-su"
    copy = ["copy", "su", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG, *SSH_OPTS, "--json",
            "--max-rounds", "1", "--transport", transport, *(["--nbd-address", B_IP] if transport == "nbd" else [])]
    try:
        a.dmmig("wrap", "su", "/dev/loop0")
        a.dmmig("prepare", "su", "--block-size", "64K")
        a.dmmig(*copy)
        proc = min(timed(lambda: a.run(["true"])) for _ in range(5))
        start = min(timed(lambda: a.dmmig("--help")) for _ in range(3))
        print(f"--transport {transport}: anchors: a process start {proc * 1000:.0f} ms, a dmmig start "
              f"{start * 1000:.0f} ms (both through the rig's runner)")
        variants = [("", None)] + ([(" (base)", wrapper(os.path.abspath(BASE)))] if BASE else [])
        for i, (label, exe) in ((i, v) for i in range(REPEAT) for v in variants):
            a.py(WRITE, top, str(size << 20), "0")
            t0 = time.monotonic()
            c = summary(a.dmmig(*copy).out)  # from mirroring, the copy drops the mirror first
            copy_s = time.monotonic() - t0
            a.py(WRITE, top, str(size << 20), "0")
            t0 = time.monotonic()
            if exe is not None:
                r = a.run([exe, "cutover", "su", "--json", *CUT_ARGS])
            elif TRACE:
                r = a.py(TRACED, "cutover", "su", "--json", *CUT_ARGS)
            else:
                r = a.dmmig("cutover", "su", "--json", *CUT_ARGS)
            wall = time.monotonic() - t0
            cut = summary(r.out)
            secs = cut["seconds"]
            # set-up: the wall time but the kernel's resync (from the first swap to in sync; the
            # second era query and swap run inside it); and counting those steps as set-up too
            setup = wall - cut["resync_seconds"]
            strict = wall - secs.get("resync", 0.0)
            print(f"  run {i + 1}{label}: copy round of the delta {copy_s:.2f} s wall ({c['read'] / 1e6:.0f} MB); "
                  f"cutover "
                  f"{wall:.2f} s wall, resync {cut['resync_seconds']:.2f} s, set-up {setup:.2f} s = "
                  f"{setup / start:.1f} dmmig starts = {setup / copy_s:.2f}x the copy round (wall but the resync "
                  f"wait alone: {strict:.2f} s); parts {cut['parts']}, windows "
                  f"{'+'.join(f'{p * 1000:.0f}' for p in cut['pauses'])} ms", flush=True)
            print("    by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items() if k != "resync")
                  + f", outside the phases (python start, checks, exit) {wall - sum(secs.values()):.2f}"
                  + ("; in threads meanwhile: " + ", ".join(f"{k} {v:.2f}" for k, v in cut["overlapped"].items())
                     if cut.get("overlapped") else ""), flush=True)
            if TRACE and exe is None:
                trace = next(ln for ln in r.err.splitlines() if ln.startswith("TRACE "))
                print("    commands (start+seconds): " + trace[6:], flush=True)
        a.dmmig("finish", "su")
    finally:
        a.sh(f"{DMMIG} abort su; {DMMIG} unwrap su; true", check=False)
        a.sh("losetup -d /dev/loop0; rm -f /dev/shm/src", check=False)
        b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst", check=False)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 96
    transports = sys.argv[2:] or ["ssh"]
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        print(f"disk {size} MiB, delta every other 64 KiB block ({size // 2} MiB); two UML kernels on a veth pair; "
              f"load {os.getloadavg()[0]:.2f}; {libraries()}")
        for transport in transports:
            run(a, b, size, transport)
    finally:
        p.stop()


if __name__ == "__main__":
    main()
