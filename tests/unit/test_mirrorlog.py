"""The dm-mirror disk log image dmmig writes before the first resume (LOG.c's format)."""
from __future__ import annotations

import struct

import pytest

from dmmig import mirrorlog as L


def test_region_count_and_log_size() -> None:
    assert L.region_count(65536, 128) == 512
    assert L.region_count(65537, 128) == 513  # a short last region counts
    # 1024 bytes of header sectors + the bitset rounded to 64-bit words, in 4K blocks
    assert L.log_bytes(512) == 4096
    assert L.log_bytes(8 * (4096 - 1024) + 1) == 8192


def test_render_marks_exactly_the_dirty_regions_and_clears_bits_past_the_end() -> None:
    img = L.render(70, [0, 9, 69])
    magic, version, nr = struct.unpack_from("<IIQ", img)
    assert (magic, version, nr) == (0x4D695272, 2, 70)
    bits = img[1024:1024 + 16]          # 70 regions -> two 64-bit words
    assert bits[0] == 0b11111110         # region 0 out of sync, 1..7 in sync
    assert bits[1] == 0b11111101         # region 9 out of sync
    assert bits[8] == 0b00011111         # regions 64..68 in sync, 69 out, 70..71 past the end
    assert bits[9:] == bytes(7)
    assert L.parse(img) == (70, [0, 9, 69])


def test_render_refuses_regions_outside_the_device() -> None:
    with pytest.raises(ValueError):
        L.render(10, [10])


def test_parse_refuses_a_foreign_image() -> None:
    with pytest.raises(ValueError, match="not a dm-mirror disk log"):
        L.parse(bytes(4096))
