"""dm-mirror's "disk" dirty logs, written by us before the mirror resumes.

This is how the cutover hands the last delta to the kernel: the log's clean bitmap marks
every region in sync except those era says were written since the last copy round, so on
resume the kernel copies exactly those regions from leg 0 to the NBD leg (LOG.c):

    sector 0:    struct log_header_disk { le32 magic "MiRr"; le32 version 2; le64 nr_regions }
    byte 1024:   clean bitset, round_up(nr_regions, 64) bits, little-endian bit order;
                 bit set = region in sync
The kernel reads it at every resume (disk_resume), not at table load, and ignores it when
the table says sync/nosync or the magic is wrong; so the table must say neither.

The top's mirror is several dm-mirror targets side by side (Layout), each over its own slice
of the disk with its own log: dm-mirror recovers one region at a time per target.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dmmig.errors import LocalIOError

MAGIC = 0x4D695272
VERSION = 2
BITS_OFFSET = 1024
_HEADER = struct.Struct("<IIQ")


def region_count(length_sectors: int, region_sectors: int) -> int:
    return -(-length_sectors // region_sectors)


def log_bytes(nr_regions: int, block: int = 4096) -> int:
    """Size the log device must have: header sectors plus the bitset, in whole blocks."""
    bitset = -(-nr_regions // 64) * 8
    return -(-(BITS_OFFSET + bitset) // block) * block


def render(nr_regions: int, out_of_sync: Iterable[int]) -> bytes:
    """The whole log image: every region clean except OUT_OF_SYNC (region indexes)."""
    bitset = bytearray(b"\xff" * (-(-nr_regions // 64) * 8))
    for r in range(nr_regions, len(bitset) * 8):  # bits past the end stay clear, as the kernel keeps them
        bitset[r // 8] &= ~(1 << (r % 8)) & 0xFF
    for r in out_of_sync:
        if not 0 <= r < nr_regions:
            raise ValueError(f"region {r} outside 0..{nr_regions - 1}")
        bitset[r // 8] &= ~(1 << (r % 8)) & 0xFF
    img = bytearray(log_bytes(nr_regions))
    img[:_HEADER.size] = _HEADER.pack(MAGIC, VERSION, nr_regions)
    img[BITS_OFFSET:BITS_OFFSET + len(bitset)] = bitset
    return bytes(img)


def parse(img: bytes) -> tuple[int, list[int]]:
    """(nr_regions, regions not in sync) of a log image; the kernel's own writes included."""
    nr, _ = _header(img)
    bits = img[BITS_OFFSET:BITS_OFFSET + -(-nr // 64) * 8]
    return nr, [r for r in range(nr) if not bits[r // 8] >> (r % 8) & 1]


# The logs are loop devices over files in /run/dmmig (tmpfs): an error here is this host's
# (memory, a log device removed under dmmig), never the destination's.
_LOG_HINT = "the mirror's log devices live in /run/dmmig; `dmmig status` shows them, `dmmig abort` removes them"


def write(dev: str, img: bytes) -> None:
    """O_DIRECT: the kernel reads the log through dm-io, below any page cache."""
    buf = mmap.mmap(-1, len(img))
    buf[:] = img
    try:
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        try:
            with memoryview(buf) as view:
                n = os.pwritev(fd, [view], 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise LocalIOError(f"writing the mirror log {dev} failed: {e.strerror}", hint=_LOG_HINT) from e
    finally:
        buf.close()
    if n != len(img):
        raise LocalIOError(f"short write to the mirror log {dev}: {n} of {len(img)} bytes", hint=_LOG_HINT)


def read(dev: str, nbytes: int) -> bytes:
    buf = mmap.mmap(-1, nbytes)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            with memoryview(buf) as view:
                n = os.preadv(fd, [view], 0)
        finally:
            os.close(fd)
        if n != nbytes:
            raise LocalIOError(f"short read of the mirror log {dev}: {n} of {nbytes} bytes", hint=_LOG_HINT)
        return bytes(buf)
    except OSError as e:
        raise LocalIOError(f"reading the mirror log {dev} failed: {e.strerror}", hint=_LOG_HINT) from e
    finally:
        buf.close()


# ---- several logs: the top's mirror set --------------------------------------------------
# Mirror targets side by side: regions recovered at once, over either transport. More parts put
# more bytes in flight on the leg, which a guest write queues behind: with a writer inside the
# delta, 32 parts resynced no faster than 16 and its worst write was 2-4x longer, over ssh and
# TLS alike (docs/design.md, Resync speed).
MAX_PARTS = 16            # --resync-parts when not given
MAX_PART_REGIONS = 1 << 17  # 16 KiB of bitset per part: the kernel rewrites it at every log flush


def clear_bits(bits: bytearray, begin: int, end: int) -> None:
    """Clear bits [BEGIN, END) (little-endian bit order): whole bytes by slice."""
    while begin < end and begin % 8:
        bits[begin // 8] &= ~(1 << (begin % 8)) & 0xFF
        begin += 1
    whole = end - end % 8
    if begin < whole:
        bits[begin // 8:whole // 8] = bytes((whole - begin) // 8)
        begin = whole
    while begin < end:
        bits[begin // 8] &= ~(1 << (begin % 8)) & 0xFF
        begin += 1


class LogImage:
    """One disk log: header + clean bitset; built in place, range by range."""

    def __init__(self, nr_regions: int, img: bytes | None = None) -> None:
        self.nr = nr_regions
        if img is None:
            self.img = bytearray(render(nr_regions, ()))
        else:
            nr, _ = _header(img)
            if nr != nr_regions:
                raise ValueError(f"log holds {nr} regions, not {nr_regions}")
            self.img = bytearray(img[:log_bytes(nr_regions)])

    def mark(self, begin: int, end: int) -> None:
        """Regions [BEGIN, END) out of sync."""
        if not 0 <= begin <= end <= self.nr:
            raise ValueError(f"regions {begin}..{end} outside 0..{self.nr}")
        bits = memoryview(self.img)[BITS_OFFSET:]
        clear_bits(bits, begin, end)  # type: ignore[arg-type]

    def in_sync(self, region: int) -> bool:
        return bool(self.img[BITS_OFFSET + region // 8] >> (region % 8) & 1)

    def out_of_sync(self) -> int:
        bits = self.img[BITS_OFFSET:BITS_OFFSET + -(-self.nr // 64) * 8]
        return self.nr - sum(bin(b).count("1") for b in bits)

    def bytes(self) -> bytes:
        return bytes(self.img)


def _header(img: bytes) -> tuple[int, int]:
    magic, version, nr = _HEADER.unpack_from(img)
    if magic != MAGIC or version not in (1, 2):
        raise ValueError(f"not a dm-mirror disk log: magic {magic:#x} version {version}")
    return nr, version


LENGTH_SHARE = 4  # a balanced part's bounds: its length at most 4x the mean, its delta 4/3x


@dataclass(frozen=True)
class Layout:
    """The top's mirror set: LENGTH sectors in regions of REGION sectors; part i begins at
    region STARTS[i] (STARTS[0] is 0) and ends where the next begins; each part's log has a
    SLOT of the log file."""
    length: int
    region: int
    starts: tuple[int, ...]

    @classmethod
    def uniform(cls, length: int, region: int, per_part: int) -> Layout:
        return cls(length, region, tuple(range(0, region_count(length, region), per_part)))

    @classmethod
    def choose(cls, length: int, block_sectors: int, *, max_parts: int = MAX_PARTS,
               max_part_regions: int = MAX_PART_REGIONS, delta: Iterable[tuple[int, int]] = (),
               delta_blocks: int = 0) -> Layout:
        """Regions as small as an era block (a scattered delta resyncs no more than era
        recorded), doubled only while a part of equal length would hold more than
        MAX_PART_REGIONS: with a disk log, every region the kernel recovers rewrites its part's
        whole bitset. Without a DELTA the parts are of equal length. With one (DELTA_BLOCKS era
        blocks in ascending [begin, end) ranges, streamed once) the parts share it out
        (balanced): each part recovers its regions one at a time, so the resync lasts as long as
        its part with the most of the delta, and a guest that rewrites one file puts all of it
        in one or two parts of equal length."""
        region = block_sectors
        while -(-region_count(length, region) // max_parts) > max_part_regions:
            region *= 2
        nr = region_count(length, region)
        if delta_blocks <= 0:
            return cls.uniform(length, region, max(1, -(-nr // max_parts)))
        per_region = region // block_sectors  # era blocks in a region (region >= block)
        regions = ((b0 // per_region, -(-b1 // per_region), b1 - b0) for b0, b1 in delta)
        return cls(length, region, balanced(nr, max_parts, regions, delta_blocks))

    @property
    def regions(self) -> int:
        return region_count(self.length, self.region)

    @property
    def parts(self) -> int:
        return len(self.starts)

    def _ends(self) -> tuple[int, ...]:
        return (*self.starts[1:], self.regions)

    @property
    def slot(self) -> int:
        return log_bytes(max(e - s for s, e in zip(self.starts, self._ends())))

    def part(self, i: int) -> tuple[int, int, int]:
        """(first sector, sectors, regions) of part I."""
        first, end = self.starts[i], self._ends()[i]
        start = first * self.region
        return start, min(end * self.region, self.length) - start, end - first

    def blank(self) -> list[LogImage]:
        return [LogImage(self.part(i)[2]) for i in range(self.parts)]

    def _spans(self, block_ranges: Iterable[tuple[int, int]],
               block_sectors: int) -> Iterator[tuple[int, int, int, int]]:
        """(blocks, part, first region, end region) in that part's numbering, for each part
        a block range touches."""
        ends = self._ends()
        for b0, b1 in block_ranges:
            r0 = b0 * block_sectors // self.region
            r1 = min(-(-b1 * block_sectors // self.region), self.regions)
            blocks = b1 - b0
            i = bisect.bisect_right(self.starts, r0) - 1
            while r0 < r1:
                end = min(r1, ends[i])
                yield blocks, i, r0 - self.starts[i], end - self.starts[i]
                blocks = 0
                r0, i = end, i + 1
            if blocks:  # a range past the regions: counted, nothing to mark
                yield blocks, -1, 0, 0

    def marked(self, images: list[LogImage], block_ranges: Iterable[tuple[int, int]], block_sectors: int) -> bool:
        """Whether every region holding a block of BLOCK_RANGES is out of sync in IMAGES
        already (stops at the first that is not)."""
        for _, i, r0, r1 in self._spans(block_ranges, block_sectors):
            if i >= 0 and any(images[i].in_sync(r) for r in range(r0, r1)):
                return False
        return True

    def mark(self, images: list[LogImage], block_ranges: Iterable[tuple[int, int]], block_sectors: int) -> int:
        """Every region holding a block of BLOCK_RANGES ([begin, end) in era blocks) out of
        sync, range by range (a list of regions is never built); returns the blocks seen."""
        seen = 0
        for blocks, i, r0, r1 in self._spans(block_ranges, block_sectors):
            seen += blocks
            if i >= 0:
                images[i].mark(r0, r1)
        return seen


def balanced(nr: int, parts: int, delta: Iterable[tuple[int, int, int]], total: int) -> tuple[int, ...]:
    """The first region of each of at most PARTS parts over NR regions, given a delta of TOTAL
    era blocks as ascending (first region, end region, blocks) spans. Each cut is where a
    weight reaches its next share: (LENGTH_SHARE - 1) parts of the delta's blocks to one of
    the regions' count. So no part holds more than 4/3 of its equal share of the delta, nor
    more than LENGTH_SHARE times its equal share of the disk (one region more at most): its
    log stays bounded, and a whole-disk resync (the discard fallback, added after the swap)
    is at most that much slower than on equal parts."""
    d_w, l_w = LENGTH_SHARE - 1, 1          # weights: the delta's and the length's
    # w(x) = (d_w * dirty_before(x) / total + l_w * x / nr) / LENGTH_SHARE, cut i at w >= i / parts;
    # in integers: W(x) = d_w * dirty * nr + l_w * x * total, cut i at W * parts >= i * LENGTH_SHARE * nr * total
    unit = LENGTH_SHARE * nr * total
    cuts: list[int] = []
    i, x, dirty = 1, 0, 0

    def advance(end: int, blocks: int, span: int) -> None:
        """Regions x..END, BLOCKS delta blocks spread over SPAN regions from x."""
        nonlocal i, x, dirty
        if end <= x:
            return
        slope = d_w * nr * blocks + l_w * total * span                # W per region, times SPAN
        while i < parts:
            need = i * unit - parts * (d_w * dirty * nr + l_w * x * total)
            cut = x if need <= 0 else x - (-need * span // (parts * slope))
            if cut >= end:
                break
            cuts.append(cut)
            i += 1
        dirty += blocks * (end - x) // span
        x = end

    for r0, r1, blocks in delta:
        r0, r1 = min(max(r0, x), nr), min(r1, nr)
        advance(r0, 0, 1)
        if r1 > r0:
            advance(r1, blocks, r1 - r0)
        else:  # in a region the range before already counted (regions of several blocks)
            dirty += blocks
    advance(nr, 0, 1)
    starts = sorted({0, *(c for c in cuts if 0 < c < nr)})
    # cuts that fell together: the longest parts halved until there are PARTS again (the guest's
    # writes while mirroring go through every part's worker, not just the delta's)
    while len(starts) < min(parts, nr):
        ends = [*starts[1:], nr]
        i = max(range(len(starts)), key=lambda k: ends[k] - starts[k])
        starts.insert(i + 1, (starts[i] + ends[i]) // 2)
    return tuple(starts)
