"""Sizes chosen from the disk size: the era block (= mirror region today), the era metadata
dm-era needs, and the estimates `--dry-run` prints. Pure arithmetic, no I/O.

The era metadata layout (linux drivers/md/dm-era-target.c, persistent-data/dm-array.c,
dm-bitset.c, dm-btree.c): 4 KiB metadata blocks; the era array is a dm_array of __le32, an
array block holding (4096 - 24) / 4 = 1018 entries behind a 24-byte header; each writeset is
a dm_bitset, a dm_array of __le64 words, (4096 - 24) / 8 = 509 words = 32576 bits a block;
both arrays hang off a btree whose nodes hold (4096 - 32) / 16 = 254 (key, block) pairs. Every
array block is allocated when the target formats the metadata (prepare), so the metadata in
use right after prepare is about nr_blocks / 1018 + nr_blocks / 32576 blocks: checked against
`dmsetup status` of real era devices in the rig (2 TiB at 64 KiB: 34143 blocks, this model
34137; tests/kernel/test_big_disk.py).

Why the era block grows with the disk: the rounds' `era_invalidate` walks the whole era array,
so its cost grows with the number of blocks (measured in the rig: 0.8 s at 2 Ki blocks, 2.4 s
at 4 Mi, 4-5 s at 8 Mi, 12 s at 32 Mi = 2 TiB at 64 KiB), and so does the metadata.
"""
from __future__ import annotations

from dataclasses import dataclass

from dmmig.errors import BadInput

META_BLOCK = 4096
ARRAY_ENTRIES = (META_BLOCK - 24) // 4        # era array: __le32 per data block
BITSET_BITS = (META_BLOCK - 24) // 8 * 64     # a writeset: one bit per data block
BTREE_ENTRIES = (META_BLOCK - 32) // 16       # btree node: (u64 key, u64 block) pairs
SM_BITMAP_BLOCKS = (META_BLOCK - 16) * 4      # space-map bitmap: 2 bits per metadata block
# dm-space-map-metadata.h: DM_SM_METADATA_MAX_BLOCKS; era cannot use (or grow) more
SM_MAX_BLOCKS = 255 * ((1 << 14) - 64)

DEFAULT_BLOCK_BYTES = 64 << 10
MIN_AUTO_BLOCK = 64 << 10
# the default era block keeps a disk at or below this many blocks (4 Mi: ~17 MiB of metadata
# at prepare, an era_invalidate of ~2.4 s in the rig), so 64 KiB up to 256 GiB, 512 KiB at 2 TiB
AUTO_MAX_BLOCKS = 1 << 22
# an explicit --block-size with more blocks than this is warned about (~65 MiB of metadata,
# a query of ~6 s in the rig, paid by every copy round and twice by the cutover)
WARN_BLOCKS = 1 << 24
ERA_MAX_BLOCKS = (1 << 31) - 1                # dm-era's valid_nr_blocks
DEFAULT_RATE = 100 << 20                      # --rate's default: ~1 Gbit/s of payload


def nr_blocks(disk_bytes: int, block_bytes: int) -> int:
    return -(-disk_bytes // block_bytes)


def _blocks(n: int, per: int) -> int:
    return -(-n // per)


def era_metadata_blocks(nr: int, writesets: int = 1) -> int:
    """4 KiB metadata blocks in use right after dm-era formatted the metadata of NR blocks
    (and with WRITESETS writesets alive): the era array, its btree, the writesets, the space
    map's bitmaps and index, the superblock and the writeset tree's root."""
    array = _blocks(nr, ARRAY_ENTRIES)
    btree = 0
    level = array
    while level > 1:  # every btree level above the array blocks
        level = _blocks(level, BTREE_ENTRIES)
        btree += level
    ws = writesets * (_blocks(nr, BITSET_BITS) + _blocks(_blocks(nr, BITSET_BITS), BTREE_ENTRIES))
    core = array + max(btree, 1) + ws + 4
    return core + _blocks(core, SM_BITMAP_BLOCKS) + 1


def metadata_file_bytes(nr: int) -> int:
    """The metadata device dmmig makes (a sparse file): room for a second copy of the era
    array and its btree (era folds archived writesets into the array while a metadata
    snapshot pins the old blocks: every array block may be shadowed once) and for four
    writesets (the current one, archived ones not yet folded in, the snapshot's), plus 4 MiB;
    dm-era cannot grow its metadata later. Sparse: only what era writes takes space."""
    array = era_metadata_blocks(nr, writesets=0)
    need = 2 * array + 4 * (_blocks(nr, BITSET_BITS) + 1) + 1024
    return _round_up(need * META_BLOCK, 1 << 20)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class BlockChoice:
    disk_bytes: int
    block_bytes: int
    nr_blocks: int
    metadata_bytes: int      # in use right after prepare (what era writes)
    metadata_file: int       # the size of the metadata device dmmig makes
    chosen: bool             # True: picked from the disk size (no --block-size)
    warning: str | None = None

    def describe(self) -> str:
        how = (f"chosen for a {human(self.disk_bytes)} disk: at most "
               f"{AUTO_MAX_BLOCKS >> 20} Mi era blocks" if self.chosen else "--block-size")
        return (f"era block {human(self.block_bytes)} ({how}): {self.nr_blocks} blocks, era metadata "
                f"{human(self.metadata_bytes)} at prepare, on a {human(self.metadata_file)} sparse device")


def choose_block(disk_bytes: int, block_bytes: int | None = None, discard_unit: int = 0) -> BlockChoice:
    """The era block for a disk of DISK_BYTES: BLOCK_BYTES if given (the operator's, honoured,
    with a warning past WARN_BLOCKS), else the smallest power of two >= 64 KiB and >= the
    origin's DISCARD_UNIT (its discard_granularity: era's discards are cut into pieces of one
    unit, each inside one era block; docs/design.md "Discards") that keeps the disk at
    AUTO_MAX_BLOCKS blocks or fewer. Refuses a size dm-era cannot take, or whose metadata would
    not fit dm-era's space map."""
    chosen = block_bytes is None
    if block_bytes is None:
        block_bytes = MIN_AUTO_BLOCK
        while block_bytes < discard_unit:
            block_bytes <<= 1
        while nr_blocks(disk_bytes, block_bytes) > AUTO_MAX_BLOCKS:
            block_bytes <<= 1
    nr = nr_blocks(disk_bytes, block_bytes)
    if nr > ERA_MAX_BLOCKS:
        raise BadInput(f"block size {human(block_bytes)} makes {nr} era blocks of a {human(disk_bytes)} disk; "
                       "dm-era takes fewer than 2^31", hint="use a larger --block-size, or leave it out "
                                                             "(dmmig then chooses one from the disk size)")
    file = metadata_file_bytes(nr)
    if file // META_BLOCK > SM_MAX_BLOCKS:
        raise BadInput(f"block size {human(block_bytes)} on a {human(disk_bytes)} disk needs {human(file)} of era "
                       f"metadata; dm-era's space map holds at most {human(SM_MAX_BLOCKS * META_BLOCK)}",
                       hint="use a larger --block-size, or leave it out (dmmig then chooses one)")
    warning = None
    if nr > WARN_BLOCKS:
        warning = (f"{nr} era blocks ({human(block_bytes)} on a {human(disk_bytes)} disk): every era query (each "
                   f"copy round, twice at the cutover) reads {human(era_metadata_blocks(nr) * META_BLOCK)} of era "
                   f"metadata; without --block-size dmmig would use {human(choose_block(disk_bytes).block_bytes)}")
    return BlockChoice(disk_bytes, block_bytes, nr, era_metadata_blocks(nr) * META_BLOCK, file, chosen, warning)


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
