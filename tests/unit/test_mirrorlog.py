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
    assert (small.region, small.parts, small.part(1), small.regions) == (128, 16, (96 * 128, 96 * 128, 96), 1536)
    big = mirrorlog.Layout.choose(2 << 31, 128)               # 2 TiB
    assert big.region == 2048 and big.parts == 16 and big.part(15)[2] == mirrorlog.MAX_PART_REGIONS
    assert big.slot <= 20 << 10                               # what the kernel rewrites per recovered region
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
    lay4 = mirrorlog.Layout.uniform(96 * 2048, 512, 24)
    ims4 = lay4.blank()
    lay4.mark(ims4, [(1, 2), (382, 386)], 128)
    assert [mirrorlog.parse(i.bytes())[1] for i in ims4] == [[0], [], [], [23], [0]] + [[]] * 11


def test_marked_tells_whether_the_first_swap_already_resyncs_every_region_of_the_second_delta() -> None:
    lay4 = mirrorlog.Layout.uniform(96 * 2048, 512, 24)  # 4 era blocks a region, 24 regions a part
    ims = lay4.blank()
    lay4.mark(ims, [(0, 8), (100, 101)], 128)  # regions 0, 1 (part 0) and 25 (part 1)
    assert lay4.marked(ims, [(1, 2), (6, 8), (101, 104)], 128)  # blocks inside those regions
    assert not lay4.marked(ims, [(1, 2), (8, 9)], 128)  # block 8 is region 2's
    assert not lay4.marked(ims, [(96, 97)], 128)  # region 24: the first of part 1
    assert lay4.marked(ims, [], 128)


GIB = 1 << 21  # sectors


def _resync_loads(lay: mirrorlog.Layout, delta: list[tuple[int, int]], bs: int = 128) -> list[int]:
    """Regions each part recovers for DELTA: the kernel recovers a part's one at a time."""
    ims = lay.blank()
    lay.mark(ims, delta, bs)
    return [i.out_of_sync() for i in ims]


@pytest.mark.parametrize("length, where, blocks, parts", [
    (20 * GIB, 1 / 3, 1024, 16),     # a guest rewrote one 64 MiB file of a 20 GiB disk
    (20 * GIB, 0.0, 4096, 32),       # 256 MiB at the start, TLS's 32 parts
    (20 * GIB, 0.999, 600, 16),      # at the very end
    (96 * 2048, 0.5, 300, 16),       # a small disk, a cluster wider than a part of equal length
])
def test_a_delta_in_one_piece_is_shared_out_over_the_parts(length: int, where: float, blocks: int, parts: int) -> None:
    """Equal parts put a cluster in one or two of them: the resync lasts as long as that part,
    one region at a time. Cut where the delta lies, no part recovers more than 4/3 of its
    share (+ one region), and none is longer than 4x the mean (its log stays bounded)."""
    first = min(int(length // 128 * where), length // 128 - blocks)
    delta = [(first, first + blocks)]
    equal = mirrorlog.Layout.choose(length, 128, max_parts=parts)
    lay = mirrorlog.Layout.choose(length, 128, max_parts=parts, delta=iter(delta), delta_blocks=blocks)
    loads = _resync_loads(lay, delta)
    assert max(_resync_loads(equal, delta)) >= 3 * max(loads)  # equal parts: a tail 3x as long or more
    assert lay.parts == parts and sum(loads) == blocks
    assert max(loads) <= blocks * 4 / 3 / parts + 1
    sizes = [lay.part(i)[2] for i in range(lay.parts)]
    assert max(sizes) <= 4 * lay.regions / parts + 1 and sum(sizes) == lay.regions
    assert sum(lay.part(i)[1] for i in range(lay.parts)) == length
    assert all(lay.part(i)[0] + lay.part(i)[1] == lay.part(i + 1)[0] for i in range(lay.parts - 1))


def test_a_scattered_delta_keeps_parts_of_equal_length_and_a_tiny_one_keeps_every_part() -> None:
    length = 96 * 2048
    scattered = [(b, b + 1) for b in range(0, 1536, 2)]
    lay = mirrorlog.Layout.choose(length, 128, delta=iter(scattered), delta_blocks=len(scattered))
    assert lay == mirrorlog.Layout.choose(length, 128)
    one = mirrorlog.Layout.choose(20 * GIB, 128, delta=iter([(7, 8)]), delta_blocks=1)
    assert one.parts == mirrorlog.MAX_PARTS and _resync_loads(one, [(7, 8)]).count(1) == 1
    assert max(one.part(i)[2] for i in range(one.parts)) <= 4 * one.regions / one.parts + 1
    assert mirrorlog.Layout.choose(1000, 128, delta=iter([(3, 4)]), delta_blocks=1).parts == 8  # 8 regions


def test_blocks_that_share_a_region_count_for_the_cuts() -> None:
    """Regions of 4 era blocks (a big disk's doubled regions) and a delta of every other block:
    two ranges fall in each region; both count, so the parts stay of equal length."""
    length = 96 * 2048
    scattered = [(b, b + 1) for b in range(0, 1536, 2)]
    lay = mirrorlog.Layout.choose(length, 128, max_parts=4, max_part_regions=96, delta=iter(scattered),
                                  delta_blocks=len(scattered))
    assert lay.region == 512 and lay.starts == (0, 96, 192, 288)


def test_parts_of_any_length_mark_exactly_the_regions_of_their_blocks() -> None:
    """Marking and `marked` across parts that begin anywhere, regions of 4 era blocks."""
    lay = mirrorlog.Layout(96 * 2048, 512, (0, 5, 6, 200, 383))  # 384 regions
    ranges = [(0, 1), (19, 21), (22, 30), (790, 810), (1530, 1536)]
    ims = lay.blank()
    assert lay.mark(ims, ranges, 128) == 1 + 2 + 8 + 20 + 6
    want = {0, 4, 5, 6, 7, 197, 198, 199, 200, 201, 202, 382, 383}
    got = {lay.starts[i] + r for i, im in enumerate(ims) for r in mirrorlog.parse(im.bytes())[1]}
    assert got == want
    assert lay.marked(ims, [(21, 22), (800, 801)], 128)
    assert not lay.marked(ims, [(30, 33)], 128)  # region 8
    assert [lay.part(i) for i in (0, 4)] == [(0, 5 * 512, 5), (383 * 512, 512, 1)]
    assert lay.slot == mirrorlog.log_bytes(194)


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
