"""A discard through era is recorded by its first block only (dm splits a discard at target
boundaries, not at era's block size; era_map marks the block a bio starts in). The copy counts
them instead: a round whose drained snapshot shows another discard count than the last one
sends the whole disk. The kernel side is tests/kernel/test_discard.py."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dmmig.adapters import writefence
from dmmig.adapters.era import BlockRange
from dmmig.adapters.writefence import Counters
from dmmig.core import journal
from dmmig.core.copier import Counters as Copied
from dmmig.flows import copying
from dmmig.flows.session import CopyOptions
from dmmig.progress import Progress, Stopwatch

KiB = 1 << 10


def test_a_discard_mark_names_the_device_and_its_discarded_sectors() -> None:
    assert writefence.discard_mark(Counters("254:1", 9, 100, 2048)) == "254:1/9/2048"
    assert writefence.discard_mark(Counters("254:1", None, 100, 0)) == "254:1/None/0"


@pytest.mark.parametrize("then, now, why", [
    ("254:1/9/0", "254:1/9/0", None),
    ("254:1/9/0", "254:1/9/2056", "2056 sector(s) were discarded through the era device"),
    ("254:1/9/0", "254:1/10/0", "the era device is another one since the last snapshot (254:1/9, now 254:1/10)"),
    ("254:1/9/0", None, "discard counter cannot be read"),
    (None, "254:1/9/0", "no discard count was taken with the last snapshot"),
    (None, None, "discard counter cannot be read"),
])
def test_any_doubt_about_a_discard_means_the_whole_disk(then: str | None, now: str | None,
                                                         why: str | None) -> None:
    got = writefence.discards_since(then, now)
    assert (got is None) if why is None else (got is not None and why in got), got


def test_an_unreadable_counter_gives_no_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    def gone(devno: str, runner: Any = None) -> Counters:
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(writefence, "counters", gone)
    assert writefence.discard_mark_of("254:1") is None


class _Ranges:
    def __init__(self, ranges: list[BlockRange]) -> None:
        self.list = ranges
        self.blocks = sum(r.count for r in ranges)

    def __iter__(self) -> Any:
        return iter(self.list)

    def close(self) -> None:
        pass


class _Stack:
    """What the rounds use of a Stack: drained snapshots (ranges, era, discard mark) in turn."""

    def __init__(self, snapshots: list[tuple[list[BlockRange], str | None]]) -> None:
        self.snapshots = snapshots
        self.journal = SimpleNamespace(save=lambda entry, phase=None: None)
        self.era_now = 10

    def drained_dirty_ranges(self, name: str, since: int) -> tuple[_Ranges, int, str | None]:
        ranges, mark = self.snapshots.pop(0)
        self.era_now += 1
        return _Ranges(ranges), self.era_now, mark

    def check_lv(self, entry: journal.Entry) -> None:
        pass


def rounds(monkeypatch: pytest.MonkeyPatch, start: str | None,
           snapshots: list[tuple[list[BlockRange], str | None]]) -> tuple[list[list[tuple[int, int]]], journal.Entry,
                                                                           dict[str, Any]]:
    sent: list[list[tuple[int, int]]] = []

    class FakeCopier:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def copy(self, extents: Any, checkpoint: Any = None) -> Copied:
            ext = list(extents)
            sent.append(ext)
            return Copied(read=sum(n for _, n in ext))
    monkeypatch.setattr(copying, "Copier", FakeCopier)
    e = journal.Entry("d1", "/dev/loop0", "7:0", phase=journal.COPYING, metadata="/dev/loop1", block_sectors=128)
    e.copy.base_done, e.copy.next_since, e.copy.discards = True, 10, start
    s: Any = _Stack(snapshots)
    summary = copying._copy_passes(s, "d1", e, [], 1024 * KiB, CopyOptions(converge=64 * KiB), Progress(), None,
                                   Stopwatch(), None)
    return sent, e, summary


def test_a_round_after_a_discard_sends_the_whole_disk_and_the_next_one_the_delta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent, e, summary = rounds(monkeypatch, "254:1/9/0", [
        ([BlockRange(1, 2)], "254:1/9/2056"),   # a 1 MiB discard from block 1: era has block 1 only
        ([BlockRange(3, 4)], "254:1/9/2056"),   # nothing discarded since
    ])
    assert sent == [[(0, 1024 * KiB)], [(3 * 64 * KiB, 64 * KiB)]]
    assert e.copy.rounds[0].full and "2056 sector(s) were discarded" in e.copy.rounds[0].full
    assert e.copy.rounds[0].dirty_bytes == 1024 * KiB
    assert e.copy.rounds[1].full is None
    assert e.copy.discards == "254:1/9/2056" and e.copy.next_since == 12
    assert summary["full_rounds"] == 1


def test_rounds_without_discards_send_only_the_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    sent, e, summary = rounds(monkeypatch, "254:1/9/0", [([BlockRange(1, 2)], "254:1/9/0")])
    assert sent == [[(64 * KiB, 64 * KiB)]] and summary["full_rounds"] == 0


@pytest.mark.parametrize("start, mark", [(None, "254:1/9/0"), ("254:1/9/0", None)])
def test_a_copy_that_cannot_tell_sends_the_whole_disk(monkeypatch: pytest.MonkeyPatch, start: str | None,
                                                      mark: str | None) -> None:
    """A journal an older dmmig wrote mid-copy (no mark), or a counter that cannot be read."""
    sent, e, _ = rounds(monkeypatch, start, [([BlockRange(1, 2)], mark), ([], mark)])
    assert sent[0] == [(0, 1024 * KiB)] and e.copy.rounds[0].full
    if mark is None:  # still unreadable: every round is a full one
        assert sent[1] == [(0, 1024 * KiB)]
    else:
        assert sent[1] == []
