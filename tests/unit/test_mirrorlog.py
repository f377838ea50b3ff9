"""The dm-mirror disk log image dmmig writes before the first resume (LOG.c's format)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dmmig.core import mirrorlog
from dmmig.errors import Exit, LocalIOError


def test_region_count_and_log_size() -> None:
    assert mirrorlog.region_count(65536, 128) == 512
    assert mirrorlog.region_count(65537, 128) == 513  # a short last region counts
    # 1024 bytes of header sectors + the bitset rounded to 64-bit words, in 4K blocks
    assert mirrorlog.log_bytes(512) == 4096
    assert mirrorlog.log_bytes(8 * (4096 - 1024) + 1) == 8192


def test_render_marks_exactly_the_dirty_regions_and_clears_bits_past_the_end() -> None:
    img = mirrorlog.render(70, [0, 9, 69])
    magic, version, nr = struct.unpack_from("<IIQ", img)
    assert (magic, version, nr) == (0x4D695272, 2, 70)
    bits = img[1024:1024 + 16]          # 70 regions -> two 64-bit words
    assert bits[0] == 0b11111110         # region 0 out of sync, 1..7 in sync
    assert bits[1] == 0b11111101         # region 9 out of sync
    assert bits[8] == 0b00011111         # regions 64..68 in sync, 69 out, 70..71 past the end
    assert bits[9:] == bytes(7)
    assert mirrorlog.parse(img) == (70, [0, 9, 69])


def test_render_refuses_regions_outside_the_device() -> None:
    with pytest.raises(ValueError):
        mirrorlog.render(10, [10])


def test_parse_refuses_a_foreign_image() -> None:
    with pytest.raises(ValueError, match="not a dm-mirror disk log"):
        mirrorlog.parse(bytes(4096))


def test_the_layout_keeps_era_blocks_as_regions_until_a_part_would_hold_too_many() -> None:
    small = mirrorlog.Layout.choose(96 * 2048, 128)           # 96 MiB, 64 KiB blocks
    assert (small.region, small.parts, small.per_part, small.regions) == (128, 16, 96, 1536)
    big = mirrorlog.Layout.choose(2 << 31, 128)               # 2 TiB
    assert big.region == 2048 and big.parts == 16 and big.per_part == mirrorlog.MAX_PART_REGIONS
    assert mirrorlog.log_bytes(big.per_part) <= 20 << 10      # what the kernel rewrites per recovered region
    odd = mirrorlog.Layout.choose(1000, 128)                  # a short last region, fewer regions than parts
    assert (odd.regions, odd.parts, odd.part(7)) == (8, 8, (896, 104, 1))


def test_marking_block_ranges_marks_exactly_their_regions_in_each_part() -> None:
    lay = mirrorlog.Layout.choose(96 * 2048, 128)
    ims = lay.blank()
    assert lay.mark(ims, [(0, 1), (5, 300), (1535, 1536)], 128) == 297
    assert [i.out_of_sync() for i in ims] == [92, 96, 96, 12] + [0] * 11 + [1]
    assert mirrorlog.parse(ims[0].bytes())[1] == [0] + list(range(5, 96))
    assert mirrorlog.parse(ims[3].bytes())[1] == list(range(12))
    # a region size of 4 era blocks: a block marks its whole region, and nothing past the disk
    lay4 = mirrorlog.Layout(96 * 2048, 512, 24)
    ims4 = lay4.blank()
    lay4.mark(ims4, [(1, 2), (382, 386)], 128)
    assert [mirrorlog.parse(i.bytes())[1] for i in ims4] == [[0], [], [], [23], [0]] + [[]] * 11


def test_marked_tells_whether_the_first_swap_already_resyncs_every_region_of_the_second_delta() -> None:
    lay4 = mirrorlog.Layout(96 * 2048, 512, 24)  # 4 era blocks a region, 24 regions a part
    ims = lay4.blank()
    lay4.mark(ims, [(0, 8), (100, 101)], 128)  # regions 0, 1 (part 0) and 25 (part 1)
    assert lay4.marked(ims, [(1, 2), (6, 8), (101, 104)], 128)  # blocks inside those regions
    assert not lay4.marked(ims, [(1, 2), (8, 9)], 128)  # block 8 is region 2's
    assert not lay4.marked(ims, [(96, 97)], 128)  # region 24: the first of part 1
    assert lay4.marked(ims, [], 128)


def test_a_log_read_back_keeps_what_the_kernel_marked_and_takes_more() -> None:
    img = mirrorlog.LogImage(100, mirrorlog.render(100, [3, 64]))
    img.mark(10, 12)
    assert mirrorlog.parse(img.bytes()) == (100, [3, 10, 11, 64])
    with pytest.raises(ValueError, match="holds 100 regions, not 99"):
        mirrorlog.LogImage(99, img.bytes())
    with pytest.raises(ValueError):
        img.mark(99, 101)


@pytest.mark.parametrize("begin, end", [(0, 0), (0, 64), (3, 5), (5, 70), (8, 16), (1, 127), (63, 65)])
def test_clear_bits_matches_bit_by_bit(begin: int, end: int) -> None:
    bits = bytearray(b"\xff" * 16)
    mirrorlog.clear_bits(bits, begin, end)
    assert [i for i in range(128) if not bits[i // 8] >> (i % 8) & 1] == list(range(begin, end))


def test_a_log_device_that_fails_is_a_local_io_error_not_a_bug(tmp_path: Path) -> None:
    """A plain OSError crossed the CLI boundary as exit 1 (the code for dmmig's own bugs)."""
    gone = str(tmp_path / "gone")
    for op in (lambda: mirrorlog.write(gone, bytes(4096)), lambda: mirrorlog.read(gone, 4096)):
        with pytest.raises(LocalIOError) as e:
            op()
        assert e.value.exit_code == Exit.IO and gone in e.value.message and e.value.hint
