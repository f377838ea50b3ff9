"""An independent writer and checker: the oracle for "no acknowledged write is lost".

It shares no code with dmmig. The writer writes 4 KiB blocks with O_DIRECT (each one
acknowledged before the next), every block's content derived from (seed, block, seq), or all
zeros (--zeros P: that fraction of the writes, as a guest that discards or zeroes would), and
records the last acknowledged seq of every block and whether it was a zero write. The checker
reads a device back and compares every block with what the record says it must hold.

    oracle.py fill   DEV --seed S                  # every block gets seq 0
    oracle.py write  DEV --seed S --record R [--count N] [--blocks A:B] [--rate R]
                     [--zeros P] [--sequential]
                     (runs until SIGTERM or N writes; exits 1 if any write failed;
                     --sequential: blocks A, A+1, ... in turn instead of at random)
    oracle.py check  DEV --seed S --record R [--record R2 ...] [--blocks A:B]   # exits 1 on any mismatch
    oracle.py digest DEV                                          # sha256 of the whole device
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import signal
import struct
import sys
import time

BS = 4096
MAGIC = b"ORACLE01"


def content(seed: int, block: int, seq: int) -> bytes:
    head = MAGIC + struct.pack("<QQQ", seed, block, seq)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return (head + fill * 64)[:BS]


def dev_blocks(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END) // BS


def cmd_fill(a: argparse.Namespace) -> int:
    fd = os.open(a.dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BS * 256)
    n = dev_blocks(fd)
    b = 0
    while b < n:
        k = min(256, n - b)
        for i in range(k):
            buf[i * BS:(i + 1) * BS] = content(a.seed, b + i, 0)
        os.pwrite(fd, memoryview(buf)[:k * BS], b * BS)
        b += k
    os.fsync(fd)
    os.close(fd)
    return 0


def cmd_write(a: argparse.Namespace) -> int:
    fd = os.open(a.dev, os.O_WRONLY | os.O_DIRECT)
    n = dev_blocks(fd)
    lo, hi = (int(x) for x in a.blocks.split(":")) if a.blocks else (0, n)
    record: dict[int, int] = {}
    zeroed: set[int] = set()  # blocks whose last acknowledged write was all zeros
    if a.resume and os.path.exists(a.record):
        old = json.load(open(a.record))
        record = {int(k): v for k, v in old["last"].items()}
        zeroed = set(old.get("zero", []))
    seq = max(record.values(), default=0)
    stop = False
    errors: list[str] = []

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    rnd = random.Random(a.seed * 7919 + seq)
    buf = mmap.mmap(-1, BS)
    writes = 0
    slow: list[float] = []  # latencies over 5 ms, in ms: the writer's view of I/O pauses
    slow_at: list[tuple[float, float]] = []
    t0 = time.monotonic()
    ready = a.record + ".started"
    open(ready, "w").close()
    while not stop and (a.count is None or writes < a.count):
        blk = lo + writes % (hi - lo) if a.sequential else rnd.randrange(lo, hi)
        seq += 1
        zero = a.zeros > 0 and rnd.random() < a.zeros
        buf[:] = bytes(BS) if zero else content(a.seed, blk, seq)
        t1 = time.monotonic()
        try:
            if os.pwrite(fd, buf, blk * BS) != BS:
                raise OSError("short write")
        except OSError as e:
            errors.append(f"block {blk} seq {seq}: {e}")
            break
        lat = time.monotonic() - t1
        if lat > 0.005:
            slow.append(round(lat * 1000, 2))
            slow_at.append((round(time.time(), 4), round(lat * 1000, 2)))  # when it ended: for a timeline
        record[blk] = seq  # acknowledged: it must be there afterwards
        if zero:
            zeroed.add(blk)
        else:
            zeroed.discard(blk)
        writes += 1
        if a.rate:
            time.sleep(max(0.0, writes / a.rate - (time.monotonic() - t0)))
    os.close(fd)
    with open(a.record + ".tmp", "w") as f:
        json.dump({"seed": a.seed, "writes": writes, "errors": errors, "seconds": time.monotonic() - t0,
                   "slow_ms": slow, "slow_at": slow_at, "last": record, "zero": sorted(zeroed)}, f)
    os.replace(a.record + ".tmp", a.record)
    print(json.dumps({"writes": writes, "errors": errors, "max_latency_ms": max(slow, default=0.0),
                      "writes_over_5ms": len(slow), "zero_blocks": len(zeroed)}))
    return 1 if errors else 0


def cmd_check(a: argparse.Namespace) -> int:
    last: dict[int, int] = {}
    zero: set[int] = set()  # blocks whose newest recorded write was all zeros
    for r in a.record or []:
        rec = json.load(open(r))
        rz = set(rec.get("zero", []))
        for k, v in rec["last"].items():
            if v >= last.get(int(k), 0):
                last[int(k)] = v
                (zero.add if int(k) in rz else zero.discard)(int(k))
    fd = os.open(a.dev, os.O_RDONLY | os.O_DIRECT)
    # --blocks: only that range is the oracle's (the rest of the device belongs to another writer)
    lo, n = (int(x) for x in a.blocks.split(":")) if a.blocks else (0, dev_blocks(fd))
    buf = mmap.mmap(-1, BS * 256)
    bad: list[str] = []
    b = lo
    while b < n:
        k = min(256, n - b)
        got = os.preadv(fd, [buf], b * BS)
        if got != k * BS and got < k * BS:
            k = got // BS
        for i in range(k):
            blk = b + i
            want = bytes(BS) if blk in zero else content(a.seed, blk, last.get(blk, 0))
            if buf[i * BS:(i + 1) * BS] != want:
                have = bytes(buf[i * BS:i * BS + 32])
                what = (f"seq {struct.unpack('<QQQ', have[8:32])[2]}" if have[:8] == MAGIC
                        else "zeros" if not any(buf[i * BS:(i + 1) * BS]) else "foreign data")
                bad.append(f"block {blk}: want {'zeros of ' if blk in zero else ''}seq {last.get(blk, 0)}, "
                           f"found {what}")
        b += k
    os.close(fd)
    print(json.dumps({"blocks": n - lo, "written_blocks": len(last), "mismatches": len(bad), "first": bad[:10]}))
    return 1 if bad else 0


def cmd_digest(a: argparse.Namespace) -> int:
    """O_DIRECT: a block device's page cache goes stale when dm writes below it (a digest taken
    earlier left it filled); a file on tmpfs refuses O_DIRECT and has no other copy anyway."""
    h = hashlib.sha256()
    try:
        fd = os.open(a.dev, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = os.open(a.dev, os.O_RDONLY)
    buf = mmap.mmap(-1, 1 << 20)
    pos = 0
    while n := os.preadv(fd, [buf], pos):
        h.update(buf[:n])
        pos += n
    os.close(fd)
    print(h.hexdigest())
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("fill", "write", "check", "digest"):
        sp = sub.add_parser(name)
        sp.add_argument("dev")
        if name != "digest":
            sp.add_argument("--seed", type=int, default=1)
        if name == "write":
            sp.add_argument("--record", required=True)
            sp.add_argument("--count", type=int)
            sp.add_argument("--blocks")
            sp.add_argument("--rate", type=float)
            sp.add_argument("--resume", action="store_true")
            sp.add_argument("--zeros", type=float, default=0.0, help="fraction of writes that are all zeros")
            sp.add_argument("--sequential", action="store_true", help="write blocks A, A+1, ... in turn")
        if name == "check":
            sp.add_argument("--record", action="append")
            sp.add_argument("--blocks")
    a = p.parse_args()
    return {"fill": cmd_fill, "write": cmd_write, "check": cmd_check, "digest": cmd_digest}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
