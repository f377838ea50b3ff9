"""Era marks only the block a discard bio starts in. prepare writes the era device's
discard_max_bytes down to its granularity (the block layer then cuts every discard into pieces
that each lie in one era block), or to 0 where no granularity can; the cutover sets the NBD
leg's to 0 (the mirror then takes no discard). The counting stays as a guard: a round whose
snapshot shows another discard count than the last one sends the whole disk only if era's limit
was lost. The kernel side is tests/kernel/test_discard.py."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dmmig import sizing
from dmmig.adapters import writefence
from dmmig.adapters.blockdev import DiscardLimits, QueueLimits
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.era import BlockRange
from dmmig.adapters.writefence import Counters
from dmmig.core import journal
from dmmig.core.copier import Counters as Copied
from dmmig.core.stack import Stack
from dmmig.errors import StateError
from dmmig.flows import copying, cutover
from dmmig.flows.session import CopyOptions
from dmmig.progress import Progress, Stopwatch
from tests.unit.fakes import FakeRunner, fake_queue

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

    def __init__(self, snapshots: list[tuple[list[BlockRange], str | None]], exact: bool) -> None:
        self.snapshots = snapshots
        self.exact = exact
        self.journal = SimpleNamespace(save=lambda entry, phase=None: None)
        self.era_now = 10

    def drained_dirty_ranges(self, name: str, since: int) -> tuple[_Ranges, int, str | None]:
        ranges, mark = self.snapshots.pop(0)
        self.era_now += 1
        return _Ranges(ranges), self.era_now, mark

    def check_lv(self, entry: journal.Entry) -> None:
        pass

    def discards_exact(self, name: str) -> bool:
        return self.exact


Sent = list[list[tuple[int, int]]]


def rounds(monkeypatch: pytest.MonkeyPatch, start: str | None, snapshots: list[tuple[list[BlockRange], str | None]],
           exact: bool = False) -> tuple[Sent, journal.Entry, dict[str, Any]]:
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
    s: Any = _Stack(snapshots, exact)
    summary = copying._copy_passes(s, "d1", e, [], 1024 * KiB, CopyOptions(converge=64 * KiB), Progress(), None,
                                   Stopwatch(), None)
    return sent, e, summary


def test_a_round_after_a_discard_with_the_limit_lost_sends_the_whole_disk_and_the_next_one_the_delta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent, e, summary = rounds(monkeypatch, "254:1/9/0", [
        ([BlockRange(1, 2)], "254:1/9/2056"),   # a 1 MiB discard from block 1: era has block 1 only
        ([BlockRange(3, 4)], "254:1/9/2056"),   # nothing discarded since
    ])
    assert sent == [[(0, 1024 * KiB)], [(3 * 64 * KiB, 64 * KiB)]]
    assert e.copy.rounds[0].full and "2056 sector(s) were discarded" in e.copy.rounds[0].full
    assert "discard_max_bytes is not confined" in e.copy.rounds[0].full
    assert e.copy.rounds[0].dirty_bytes == 1024 * KiB
    assert e.copy.rounds[1].full is None
    assert e.copy.discards == "254:1/9/2056" and e.copy.next_since == 12
    assert summary["full_rounds"] == 1


def test_rounds_without_discards_send_only_the_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    sent, e, summary = rounds(monkeypatch, "254:1/9/0", [([BlockRange(1, 2)], "254:1/9/0")])
    assert sent == [[(64 * KiB, 64 * KiB)]] and summary["full_rounds"] == 0


@pytest.mark.parametrize("start, mark", [(None, "254:1/9/0"), ("254:1/9/0", None)])
def test_with_the_limit_lost_a_copy_that_cannot_tell_sends_the_whole_disk(
        monkeypatch: pytest.MonkeyPatch, start: str | None, mark: str | None) -> None:
    """A journal an older dmmig wrote mid-copy (no mark), or a counter that cannot be read."""
    sent, e, _ = rounds(monkeypatch, start, [([BlockRange(1, 2)], mark), ([], mark)])
    assert sent[0] == [(0, 1024 * KiB)] and e.copy.rounds[0].full
    if mark is None:  # still unreadable: every round is a full one
        assert sent[1] == [(0, 1024 * KiB)]
    else:
        assert sent[1] == []


def test_with_the_limit_held_a_discard_makes_no_full_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Era marked every block the discard touched (its pieces each lie in one block): the round
    sends era's delta, not the disk; the mark moves on."""
    sent, e, summary = rounds(monkeypatch, "254:1/9/0", [
        ([BlockRange(1, 10)], "254:1/9/2056"),
        ([BlockRange(3, 4)], "254:1/9/2056"),
    ], exact=True)
    assert sent == [[(64 * KiB, 9 * 64 * KiB)], [(3 * 64 * KiB, 64 * KiB)]]
    assert [r.full for r in e.copy.rounds] == [None, None] and summary["full_rounds"] == 0
    assert e.copy.discards == "254:1/9/2056"


@pytest.mark.parametrize("lim, block, confined, exact", [
    (DiscardLimits(4294966784, 4096, 0), 64 * KiB, 4096, False),      # the rig's loop device
    (DiscardLimits(4096, 4096, 0), 64 * KiB, 4096, True),              # confined
    (DiscardLimits(2048, 4096, 0), 64 * KiB, 4096, True),              # below a unit: still one block
    (DiscardLimits(0, 4096, 0), 64 * KiB, 0, True),                    # no discard at all
    (DiscardLimits(1 << 30, 4096, 512), 64 * KiB, 0, False),           # an alignment shifts the pieces
    (DiscardLimits(4096, 4096, 512), 64 * KiB, 0, False),
    (DiscardLimits(1 << 30, 192 * KiB, 0), 64 * KiB, 0, False),        # a unit that does not divide the block
    (DiscardLimits(1 << 30, 1 << 20, 0), 64 * KiB, 0, False),          # a unit above the block
    (DiscardLimits(1 << 30, 1 << 20, 0), 1 << 20, 1 << 20, False),
    (DiscardLimits(1 << 30, 0, 0), 64 * KiB, 0, False),                # no granularity told
])
def test_the_discard_limit_that_keeps_each_piece_in_one_era_block(lim: DiscardLimits, block: int, confined: int,
                                                                   exact: bool) -> None:
    assert lim.confined_max(block) == confined
    assert lim.exact_for(block) is exact
    assert DiscardLimits(confined, lim.granularity, lim.alignment).exact_for(block)


def stack_with(tmp_path: Any, runner: FakeRunner | None = None) -> Stack:
    r: Any = runner or FakeRunner()
    return Stack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")), queue=QueueLimits(str(tmp_path / "sys")))


def read(tmp_path: Any, devno: str) -> int:
    return int((tmp_path / "sys" / "dev" / "block" / devno / "queue" / "discard_max_bytes").read_text())


@pytest.mark.parametrize("granularity, alignment, want", [(4096, 0, 4096), (4096, 512, 0), (192 * KiB, 0, 0)])
def test_prepare_confines_the_era_devices_discards(tmp_path: Any, granularity: int, alignment: int,
                                                   want: int) -> None:
    fake_queue(tmp_path, "253:5", 4294966784, granularity, alignment)
    got = stack_with(tmp_path).confine_discards("d1", "253:5", 64 * KiB)
    assert read(tmp_path, "253:5") == want and got.max_bytes == want


def test_a_limit_the_kernel_did_not_take_fails_prepare(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_queue(tmp_path, "253:5", 4294966784)
    monkeypatch.setattr(QueueLimits, "set_discard_max", lambda self, devno, n: self.discard(devno))  # ignored
    with pytest.raises(StateError, match="cannot confine the era device's discards"):
        stack_with(tmp_path).confine_discards("d1", "253:5", 64 * KiB)


def test_a_device_without_discard_is_left_alone(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_queue(tmp_path, "253:5", 0, 0)
    monkeypatch.setattr(QueueLimits, "set_discard_max", lambda self, devno, n: pytest.fail("wrote a limit"))
    assert stack_with(tmp_path).confine_discards("d1", "253:5", 64 * KiB).max_bytes == 0


def test_the_guard_reads_era_s_own_limit(tmp_path: Any) -> None:
    """Stack.discards_exact: the era device's limit now (raised by hand: lost), not the top's."""
    fake_queue(tmp_path, "253:5", 4096)
    s = stack_with(tmp_path, FakeRunner([(["dmsetup", "info"],
                                          (0, "dmmig-d1-era;253;5;L--w;1;1;0;DMMIG-era-d1\n", ""))]))
    e = journal.Entry("d1", "/dev/loop0", "7:0", metadata="/dev/loop1", block_sectors=128)
    s.journal.save(e, journal.COPYING)
    assert s.discards_exact("d1") is True
    (tmp_path / "sys" / "dev" / "block" / "253:5" / "queue" / "discard_max_bytes").write_text("1073741824\n")
    assert s.discards_exact("d1") is False
    (tmp_path / "sys" / "dev" / "block" / "253:5" / "queue" / "discard_max_bytes").unlink()
    assert s.discards_exact("d1") is False          # unreadable: counted as lost
    # one dmsetup process per ask (the era device's number with the check that it exists), and
    # none from a caller that has the number (the cutover, after its swap)
    assert len(s.runner.argvs) == 3, s.runner.argvs
    (tmp_path / "sys" / "dev" / "block" / "253:5" / "queue" / "discard_max_bytes").write_text("4096\n")
    assert s.discards_exact("d1", "253:5") is True and len(s.runner.argvs) == 3


def test_the_cutover_turns_the_nbd_legs_discards_off(tmp_path: Any) -> None:
    fake_queue(tmp_path, "43:0", 4294966784, 512)
    cutover.no_discards(stack_with(tmp_path), "43:0")
    assert read(tmp_path, "43:0") == 0


def test_a_leg_that_keeps_its_discards_stops_the_cutover(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_queue(tmp_path, "43:0", 4294966784, 512)
    monkeypatch.setattr(QueueLimits, "set_discard_max", lambda self, devno, n: self.discard(devno))
    with pytest.raises(StateError, match="cannot turn discards off on the mirror's NBD leg 43:0"):
        cutover.no_discards(stack_with(tmp_path), "43:0")


@pytest.mark.parametrize("then, now, fails", [("254:1/9/0", "254:1/9/0", False), ("254:1/9/0", "254:1/9/8", True),
                                              ("254:1/9/0", None, True)])
def test_a_discard_that_reached_era_while_mirroring_fails_the_cutover(then: str, now: str | None,
                                                                        fails: bool) -> None:
    """Should not happen (the mirror takes no discard); if the limit did not hold, dm-raid1 may
    have let kcopyd copy old data over the discard on the NBD leg."""
    if fails:
        with pytest.raises(StateError, match="a discard reached the era device while the mirror resynced"):
            cutover.check_no_discard_while_mirroring("d1", "/dev/nbd0", then, now)
    else:
        cutover.check_no_discard_while_mirroring("d1", "/dev/nbd0", then, now)


@pytest.mark.parametrize("unit, block", [(0, 64 * KiB), (4096, 64 * KiB), (64 * KiB, 64 * KiB), (1 << 20, 1 << 20),
                                         (192 * KiB, 256 * KiB)])
def test_the_chosen_era_block_is_at_least_the_origins_discard_unit(unit: int, block: int) -> None:
    assert sizing.choose_block(1 << 30, None, unit).block_bytes == block
