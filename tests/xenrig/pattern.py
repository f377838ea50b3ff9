"""What guest-tool (the test domU's writer) puts on its disk, and checks of a disk against it.
Runs in dom0 (`python -m tests.xenrig.pattern ...`, prints JSON) or is imported.

A block is the 32-byte record b"XENRIG01" + seed, seq, block (little-endian u64) repeated
128 times: a block tells by itself which write of which run put it there."""
from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass

BS = 4096
MAGIC = b"XENRIG01"
_REC = struct.Struct("<8sQQQ")
ACK_RE = re.compile(r"XENRIG-ACK (\d+) (\d+) (\d+) (\d+)")


def block(seed: int, seq: int, blk: int) -> bytes:
    return _REC.pack(MAGIC, seed, seq, blk) * (BS // _REC.size)


def parse(data: bytes) -> tuple[int, int, int] | None:
    """(seed, seq, block) of a well-formed block, else None (zeros, torn or foreign data)."""
    magic, seed, seq, blk = _REC.unpack_from(data)
    if magic != MAGIC or data != block(seed, seq, blk):
        return None
    return seed, seq, blk


@dataclass(frozen=True)
class Ack:
    seq: int
    block: int
    mono_ns: int
    real_ns: int


def acks(console: str) -> list[Ack]:
    return [Ack(*map(int, m.groups())) for m in ACK_RE.finditer(console)]


def last_acked(ack_list: list[Ack]) -> dict[int, int]:
    """block -> the highest seq acknowledged for it."""
    last: dict[int, int] = {}
    for a in ack_list:
        last[a.block] = max(a.seq, last.get(a.block, 0))
    return last


def merge(*ack_lists: list[Ack]) -> list[Ack]:
    """One ack per seq, in order: a migrated guest's acks are split over two consoles."""
    by_seq: dict[int, Ack] = {}
    for lst in ack_lists:
        for a in lst:
            by_seq.setdefault(a.seq, a)
    return [by_seq[k] for k in sorted(by_seq)]


@dataclass(frozen=True)
class Gap:
    after_seq: int      # the last ack before the gap
    real_ms: float      # by the guest's CLOCK_REALTIME (includes time suspended)
    mono_ms: float      # by its CLOCK_MONOTONIC (Linux leaves time suspended out of it)


def largest_gap(ordered: list[Ack]) -> Gap:
    """The longest stretch between two consecutive acks, by the guest's wall clock."""
    if len(ordered) < 2:
        raise ValueError("need two acks for a gap")
    pairs = list(zip(ordered, ordered[1:]))
    for x, y in pairs:
        if y.seq != x.seq + 1:
            raise ValueError(f"acks missing between seq {x.seq} and {y.seq}")
    x, y = max(pairs, key=lambda p: p[1].real_ns - p[0].real_ns)
    return Gap(x.seq, (y.real_ns - x.real_ns) / 1e6, (y.mono_ns - x.mono_ns) / 1e6)


def _read(dev: str, blk: int, fd: int) -> bytes:
    return os.pread(fd, BS, blk * BS)


def check_pattern(dev: str, seed: int, start: int, count: int) -> list[str]:
    """Blocks start.. must hold seed's pattern written once (seq 0)."""
    problems = []
    fd = os.open(dev, os.O_RDONLY)
    try:
        for b in range(start, start + count):
            if _read(dev, b, fd) != block(seed, 0, b):
                problems.append(f"block {b}: {parse(_read(dev, b, fd))}")
    finally:
        os.close(fd)
    return problems


def check_acks(dev: str, seed: int, last: dict[int, int]) -> list[str]:
    """Every acknowledged write must be on the disk: each block holds this run's data with a
    seq at least the last one acknowledged for it (a later write may have completed unacked)."""
    problems = []
    fd = os.open(dev, os.O_RDONLY)
    try:
        for b, seq in sorted(last.items()):
            got = parse(_read(dev, b, fd))
            if got is None or got[0] != seed or got[2] != b or got[1] < seq:
                problems.append(f"block {b}: acked seq {seq}, disk has {got}")
    finally:
        os.close(fd)
    return problems


def seqs(dev: str, seed: int, start: int, count: int) -> list[int | None]:
    """The seq each block of start.. holds (None: not this run's well-formed block)."""
    out: list[int | None] = []
    fd = os.open(dev, os.O_RDONLY)
    try:
        for b in range(start, start + count):
            got = parse(_read(dev, b, fd))
            out.append(got[1] if got and got[0] == seed and got[2] == b else None)
    finally:
        os.close(fd)
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "seqs":
        print(json.dumps({"seqs": seqs(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))}))
        return 0
    if len(argv) == 5 and argv[0] == "check":
        problems = check_pattern(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    elif len(argv) == 3 and argv[0] == "acks":
        # the guest's console log on stdin
        problems = check_acks(argv[1], int(argv[2]), last_acked(acks(sys.stdin.read())))
    else:
        print("usage: pattern check DEV SEED START COUNT | pattern acks DEV SEED < console.log"
              " | pattern seqs DEV SEED START COUNT", file=sys.stderr)
        return 2
    print(json.dumps({"ok": not problems, "problems": problems[:50], "count": len(problems)}))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
