"""The cutover's tail: the kernel's final resync against dmmig's own copier, on the same link,
the same export, the same scattered delta, side by side in one rig run.

Two UML kernels on a veth pair. For each transport (ssh: the leg through dmmig's OpenSSH
tunnel, the copier through the agent's relay; nbd: TLS straight to the export) and each link
(as is, then 2 ms more each way by netem): a SIZE MiB disk of random data is copied; then,
for each number of mirror parts (`cutover --resync-parts`; 1 is the one dm-mirror target of
before issue 14), every other 64 KiB era block is written (a scattered delta of SIZE/2 MiB),
a `dmmig copy` round moves it (the anchor: its bytes over its data phase), the same blocks are
written again and `dmmig cutover` hands them to the kernel (its bytes over its resync time).
DELTA=cluster:N writes N MiB in one piece instead, a third into the disk (a guest rewriting one
file: the case where the delta sits in few of the mirror's parts).
WRITER=1: the oracle's O_DIRECT writer (4 KiB writes to random blocks of 32 MiB from a third
into the disk: inside the delta) runs across each cutover, then as long again on the mirror in
sync (the anchor: what a replicated write costs without the resync); each row adds both worst
writes and their ratio. The writer's blocks are part of the delta the cutover hands over.

    [PARTS=1,4,16] [DELAYS=0,2ms] [TREES=DIR,...] [DELTA=scatter|cluster:MIB] [WRITER=1]
    .venv/bin/python -m bench.resync_speed [SIZE_MIB [TRANSPORT ...]]   (default: 128 ssh nbd)

TREES: directories each holding a dmmig/ package (under /var/tmp, e.g. `git archive COMMIT dmmig |
tar -x -C DIR`), run in turn for each transport on each link, side by side in one run (default:
this checkout).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from bench import libraries
from bench.copy_wall import wrapper
from bench.cutover_pause import stop, writer
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
PY = str(ROOT / ".venv" / "bin" / "python")
# 0: dmmig's default for the transport (no --resync-parts)
PARTS = tuple(int(x) for x in os.environ.get("PARTS", "1,4,16").split(","))
BLOCK = 64 << 10
DELTA = os.environ.get("DELTA", "scatter")
WRITER = os.environ.get("WRITER") == "1"
# random data (the copier skips zeros, the kernel does not): every other block of the disk, or
# CLUSTER bytes in one piece a third into it
WRITE = r"""
import mmap, os, sys
dev, size, cluster = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = mmap.mmap(-1, 65536)
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
first = size // 3 // 65536 * 65536
for off in range(first, first + cluster, 65536) if cluster else range(0, size, 2 * 65536):
    buf[:] = os.urandom(65536)
    os.pwrite(fd, buf, off)
os.close(fd)
"""


def summary(out: str) -> dict:
    return next(json.loads(ln) for ln in reversed(out.splitlines()) if '"summary"' in ln)


def writer_blocks(size: int) -> str:
    """The writer's 4 KiB blocks: 32 MiB from a third into a SIZE MiB disk."""
    first = size * 256 // 3
    return f"{first}:{first + min(8192, size * 256 - first)}"


def run(a: UmlHost, b: UmlHost, size: int, transport: str,
        dmmig: str = DMMIG) -> list[tuple[int, float, float, int, int | None, float | None, float | None]]:
    """[(parts, copier MB/s, kernel MB/s, regions, most regions in one part, the writer's worst
    write across the cutover and on the mirror in sync (ms; WRITER))] for one transport on the
    current link, with the dmmig at DMMIG on both hosts (an older one does not say the fifth)."""
    a.sh(f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={size} status=none && losetup /dev/loop0 /dev/shm/src")
    b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    top = "/dev/mapper/dmmig-rs"
    cluster = str(int(DELTA.split(":")[1]) << 20) if DELTA.startswith("cluster:") else "0"
    copy = ["copy", "rs", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", dmmig, *SSH_OPTS, "--json",
            "--max-rounds", "1", "--transport", transport, *(["--nbd-address", B_IP] if transport == "nbd" else [])]
    out = []
    try:
        a.run([dmmig, "wrap", "rs", "/dev/loop0"])
        a.run([dmmig, "prepare", "rs", "--block-size", "64K"])
        a.run([dmmig, *copy])
        for parts in PARTS:
            a.py(WRITE, top, str(size << 20), cluster)
            c = summary(a.run([dmmig, *copy]).out)   # from mirroring, the copy drops the mirror first
            copier = c["throughput_bytes_per_s"] / 1e6
            a.py(WRITE, top, str(size << 20), cluster)
            job = writer(a, f"{a.shared}/rs-{parts}.rec", writer_blocks(size), top) if WRITER else None
            t0 = time.monotonic()
            cut = summary(a.run([dmmig, "cutover", "rs", "--json",
                                 *(["--resync-parts", str(parts)] if parts else [])]).out)
            across = in_sync = None
            if job is not None:
                took = time.monotonic() - t0
                across = stop(job)["max_latency_ms"]
                job = writer(a, f"{a.shared}/rs-{parts}-sync.rec", writer_blocks(size), top)
                time.sleep(took)
                in_sync = stop(job)["max_latency_ms"]
            out.append((cut.get("parts", parts), copier, cut["resync_bytes"] / 1e6 / cut["resync_seconds"],
                        cut["resync_regions"], cut.get("resync_regions_most_in_a_part"), across, in_sync))
        a.run([dmmig, "finish", "rs"])
        return out
    finally:
        a.sh(f"{dmmig} abort rs; {dmmig} unwrap rs; true", check=False)
        a.sh("losetup -d /dev/loop0; rm -f /dev/shm/src", check=False)
        b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst", check=False)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    transports = sys.argv[2:] or ["ssh", "nbd"]
    trees = {t: wrapper(os.path.abspath(t)) for t in os.environ.get("TREES", "").split(",") if t} or {"": DMMIG}
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        for h in (a, b):
            h.run(["modprobe", "--dirname=/run/mods", "sch_netem"])
        what = (f"{DELTA.split(':')[1]} MiB in one piece" if DELTA.startswith("cluster:")
                else f"every other 64 KiB block ({size // 2} MiB)")
        print(f"disk {size} MiB, delta {what}; two UML kernels on a veth pair; "
              f"{libraries()}")
        for delay in [None if d == "0" else d for d in os.environ.get("DELAYS", "0,2ms").split(",")]:
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "add", "dev", "vec0", "root", "netem", "delay", delay])
            rtt = a.sh(f"ping -c 5 -i 0.2 -q {B_IP} | tail -1").out.strip()
            print(f"link: {'+' + delay + ' each way' if delay else 'as is'} ({rtt})")
            for transport in transports:
                for tree, dmmig in trees.items():
                    for parts, copier, kernel, regions, most, across, in_sync in run(a, b, size, transport, dmmig):
                        w = (f"; writer's worst write {across:.0f} ms across the cutover, {in_sync:.0f} ms on the "
                             f"mirror in sync (anchor) = {across / max(in_sync, 5.0):.1f}x" if across is not None
                             and in_sync is not None else "")
                        print(f"  {tree + ': ' if tree else ''}--transport {transport:3s} --resync-parts {parts:2d}: "
                              f"copier {copier:6.2f} MB/s (anchor), kernel resync {kernel:6.2f} MB/s over {regions} "
                              f"regions (most in one part: {'?' if most is None else most}) "
                              f"= {kernel / copier:.2f}x the copier{w}", flush=True)
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "del", "dev", "vec0", "root"])
    finally:
        p.stop()


if __name__ == "__main__":
    main()
