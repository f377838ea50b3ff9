"""dm-mirror's "disk" dirty log, written by us before the mirror first resumes.

This is how the cutover hands the last delta to the kernel: the log's clean bitmap marks
every region in sync except those era says were written since the last copy round, so on
resume the kernel copies exactly those regions from leg 0 to the NBD leg (LOG.c):

    sector 0:    struct log_header_disk { le32 magic "MiRr"; le32 version 2; le64 nr_regions }
    byte 1024:   clean bitset, round_up(nr_regions, 64) bits, little-endian bit order;
                 bit set = region in sync
The kernel reads it at every resume (disk_resume), not at table load, and ignores it when
the table says sync/nosync or the magic is wrong; so the table must say neither.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable

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
    magic, version, nr = _HEADER.unpack_from(img)
    if magic != MAGIC or version not in (1, 2):
        raise ValueError(f"not a dm-mirror disk log: magic {magic:#x} version {version}")
    bits = img[BITS_OFFSET:BITS_OFFSET + -(-nr // 64) * 8]
    return nr, [r for r in range(nr) if not bits[r // 8] >> (r % 8) & 1]


def write(dev: str, img: bytes) -> None:
    """O_DIRECT: the kernel reads the log through dm-io, below any page cache."""
    buf = mmap.mmap(-1, len(img))
    buf[:] = img
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        with memoryview(buf) as view:
            n = os.pwritev(fd, [view], 0)
        if n != len(img):
            raise OSError(f"short write to {dev}: {n} of {len(img)} bytes")
    finally:
        os.close(fd)
        buf.close()


def read(dev: str, nbytes: int) -> bytes:
    buf = mmap.mmap(-1, nbytes)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        with memoryview(buf) as view:
            os.preadv(fd, [view], 0)
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()
