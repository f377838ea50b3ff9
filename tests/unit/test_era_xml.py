"""era_invalidate output parsing: both spellings, blocks, merging, and the real output of
thin-provisioning-tools 0.9.0 captured in the rig."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmmig.adapters.era import BlockRange, merge, parse_invalidate_xml
from dmmig.errors import DmmigError

KERNEL = json.loads((Path(__file__).parent / "fixtures" / "kernel_output.json").read_text())


def test_rust_spelling() -> None:
    assert parse_invalidate_xml('<blocks>\n  <range begin="0" end="16"/>\n</blocks>\n') == [BlockRange(0, 16)]


def test_cxx_spelling_spaces_around_equals() -> None:
    assert parse_invalidate_xml('<blocks>\n  <range begin="0" end = "16"/>\n</blocks>\n') == [BlockRange(0, 16)]
    assert parse_invalidate_xml("<blocks><range begin = '4' end = '8' /></blocks>") == [BlockRange(4, 8)]


def test_single_block() -> None:
    assert parse_invalidate_xml('<blocks>\n  <block block="20"/>\n</blocks>') == [BlockRange(20, 21)]


def test_mixed_from_docs() -> None:
    text = '<blocks>\n  <range begin="0" end="16"/>\n  <block block="20"/>\n</blocks>\n'
    r = parse_invalidate_xml(text)
    assert r == [BlockRange(0, 16), BlockRange(20, 21)]
    assert [x.count for x in r] == [16, 1]


def test_empty_output() -> None:
    assert parse_invalidate_xml("<blocks>\n</blocks>\n") == []
    assert parse_invalidate_xml("<blocks/>") == []


def test_adjacent_and_overlapping_merge_and_sort() -> None:
    text = """<blocks>
      <block block="16"/>
      <range begin="0" end="16"/>
      <block block="17"/>
      <range begin="30" end = "40"/>
      <range begin="35" end="38"/>
      <range begin="39" end="45"/>
      <block block="50"/>
      <block block="52"/>
    </blocks>"""
    assert parse_invalidate_xml(text) == [BlockRange(0, 18), BlockRange(30, 45), BlockRange(50, 51),
                                          BlockRange(52, 53)]


def test_merge_function() -> None:
    assert merge([]) == []
    assert merge([BlockRange(5, 6), BlockRange(3, 5)]) == [BlockRange(3, 6)]
    assert merge([BlockRange(0, 10), BlockRange(2, 3)]) == [BlockRange(0, 10)]  # contained
    assert merge([BlockRange(0, 1), BlockRange(2, 3)]) == [BlockRange(0, 1), BlockRange(2, 3)]  # gap


@pytest.mark.parametrize("text, why", [
    ("", "cannot parse"),
    ("syscall 'open' failed: Device or resource busy", "cannot parse"),
    ("<blocks><range begin='0' end='1'/>", "cannot parse"),
    ("<superblock/>", "unexpected era_invalidate output root"),
    ("<blocks><bit block='1'/></blocks>", "unexpected element <bit>"),
])
def test_bad_output(text: str, why: str) -> None:
    with pytest.raises(DmmigError, match=why):
        parse_invalidate_xml(text)


# ---- what era_invalidate 0.9.0 really printed in the rig ------------------------------------

def test_kernel_written_since_0_is_every_block() -> None:
    c = KERNEL["era"]
    assert ' end = "' in c["invalidate_since_0"]  # the C++ tools' spelling, as shipped by Debian 12
    assert parse_invalidate_xml(c["invalidate_since_0"]) == [BlockRange(0, c["nr_blocks"])]


def test_kernel_written_since_first_era() -> None:
    c = KERNEL["era"]
    assert "<block block=" in c["invalidate_since_first"]
    # the test wrote all of block 3 and 4 KiB inside block 200
    assert parse_invalidate_xml(c["invalidate_since_first"]) == [BlockRange(3, 4), BlockRange(200, 201)]


def test_kernel_written_since_current_is_empty() -> None:
    assert parse_invalidate_xml(KERNEL["era"]["invalidate_since_current"]) == []


def test_kernel_live_metadata_refused() -> None:
    c = KERNEL["era"]
    assert c["invalidate_live_rc"] == 1  # C++ tools: 1 on error
    assert "live metadata" in c["invalidate_live_stderr"]
