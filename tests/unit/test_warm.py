"""Warm copies (issue 16 part 1): every reason a copy back is a full one, and the records.

The write fence reads the kernel's counters; here, a file disk (its inode, size, mtime and
ctime) and counters read from fake sysfs stat files stand for them."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters import writefence
from dmmig.adapters.writefence import Counters
from dmmig.core import generation, journal
from dmmig.core.confine import Policy
from dmmig.core.records import KEPT, TOOK_OVER, CopyState, Warm, WarmTrack, read_warm, to_json
from dmmig.flows import warm
from dmmig.flows.destination import AgentServer
from dmmig.names import Files
from tests.unit.fakes import FakeRunner, MemXenStore

MIB = 1 << 20
R: Any = FakeRunner()


@pytest.fixture(autouse=True)
def _quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.02)


class Dest:
    """A destination agent confined to TMP/images, with no Xen."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "images"
        self.dir.mkdir()
        self.state = str(tmp_path / "state")
        xs = MemXenStore()
        self.agent = AgentServer(FakeRunner(), self.state, policy=Policy(file_roots=(str(self.dir),)),
                                 xenstore=lambda: contextlib.nullcontext(xs))

    def path(self, name: str, size: int) -> str:
        p = self.dir / name
        p.write_bytes(b"")
        os.truncate(p, size)
        return str(p)


@pytest.fixture
def dest(tmp_path: Path) -> Dest:
    return Dest(tmp_path)


# ---- the fence ---------------------------------------------------------------------------------
def test_a_file_fence_sees_any_write_a_new_inode_and_a_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(8192))
    fence = writefence.take(str(f), R)
    assert fence.device is None and fence.file is not None
    assert writefence.written_since(fence, R) is None  # untouched: the only answer that allows warm
    with open(f, "r+b") as fh:  # the same bytes again: still a write
        fh.write(bytes(10))
    assert "was changed since" in str(writefence.written_since(fence, R))
    fence = writefence.take(str(f), R)
    os.replace(tmp_path / "disk.img", tmp_path / "old.img")
    (tmp_path / "disk.img").write_bytes(bytes(8192))
    assert "another file now" in str(writefence.written_since(fence, R))
    fence = writefence.take(str(f), R)
    boot = tmp_path / "boot_id"
    boot.write_text("another boot\n")
    monkeypatch.setattr(writefence, "BOOT_ID", str(boot))
    assert "rebooted" in str(writefence.written_since(fence, R))
    os.unlink(f)
    monkeypatch.undo()
    assert "cannot be checked" in str(writefence.written_since(fence, R))


def test_a_write_in_the_same_clock_tick_as_the_fence_still_moves_the_ctime(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    for _ in range(20):
        f.write_bytes(os.urandom(512))  # written just now: the stamp must wait for the clock
        fence = writefence.take(str(f), R)
        with open(f, "r+b") as fh:
            fh.write(b"x")
        assert writefence.written_since(fence, R) is not None


def test_a_write_while_the_fence_waits_for_the_ctime_gives_no_fence(tmp_path: Path) -> None:
    """The wait for a settled ctime took the stamp again after it: a write straight to the file
    during that wait became part of the baseline (review of 9e4b05e, finding 6)."""
    import threading
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(512))  # just written: the fence must wait
    t = threading.Timer(0.1, lambda: f.write_bytes(b"behind dmmig's back"))
    t.start()
    try:
        with pytest.raises(OSError, match="written while its fence was taken"):
            writefence.settled_stamp(str(f), settle_s=0.5)
    finally:
        t.join()


def fake_sysfs(monkeypatch: pytest.MonkeyPatch, table: dict[str, Counters | None]) -> None:
    def counters(devno: str, runner: Any = None) -> Counters:
        c = table.get(devno)
        if c is None:
            raise FileNotFoundError(2, "No such file or directory")
        return c
    monkeypatch.setattr(writefence, "counters", counters)


@pytest.mark.parametrize("origin_now, era_now, why", [
    (Counters("7:0", 5, 1100, 0), Counters("254:1", 9, 100, 0), None),
    (Counters("7:0", 5, 1108, 0), Counters("254:1", 9, 100, 0), "written past the era device: 108 sector(s)"),
    (Counters("7:0", 5, 1100, 8), Counters("254:1", 9, 100, 0), "8 discarded on it"),
    # a discard through era: era marked its first block only (review of 9e4b05e, finding 2)
    (Counters("7:0", 5, 1100, 2048), Counters("254:1", 9, 100, 2048), "discarded through the era device"),
    (Counters("7:0", 6, 1100, 0), Counters("254:1", 9, 100, 0), "origin 7:0 was attached or made again"),
    (Counters("7:0", 5, 1100, 0), Counters("254:1", 10, 100, 0), "era device 254:1 was attached or made again"),
    (Counters("7:0", 5, 1100, 0), None, "cannot be read"),
])
def test_a_write_past_era_is_a_difference_of_the_two_devices_counters(
        monkeypatch: pytest.MonkeyPatch, origin_now: Counters, era_now: Counters | None, why: str | None) -> None:
    fake_sysfs(monkeypatch, {"7:0": origin_now, "254:1": era_now})
    got = writefence.bypassed(Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0), R)
    assert (got is None) if why is None else (why in str(got)), got


# ---- the records -------------------------------------------------------------------------------
def test_generation_and_tracking_records_round_trip_and_keep_unknown_keys(tmp_path: Path) -> None:
    f = tmp_path / "d.img"
    f.write_bytes(bytes(4096))
    rec = generation.record(str(tmp_path), "d1", KEPT, str(f), 4096, "ab12", "hostb", R)
    data = json.load(open(tmp_path / "d1.warm.json"))
    assert data["version"] == 1 and data["role"] == KEPT
    data["from_the_future"] = 1
    (tmp_path / "d1.warm.json").write_text(json.dumps(data))
    back = read_warm(str(tmp_path / "d1.warm.json"))
    assert back is not None and back.fence == rec.fence and back.extra == {"from_the_future": 1}
    (tmp_path / "d1.warm.json").write_text("{torn")
    assert generation.load(str(tmp_path), "d1") is None  # unreadable: no copy is warm
    st = CopyState(migration="m", warm=WarmTrack("ab12", 3, Counters("7:0", 1, 2, 3), Counters("254:1", 4, 0, 0)))
    again = CopyState.from_json(json.loads(json.dumps(to_json(st))), "t")
    assert again == st
    assert CopyState.from_json({"migration": "m", "base_done": True}, "old").warm is None  # an older journal


# ---- the destination's half (A) ----------------------------------------------------------------
def kept(dest: Dest, size: int = 4 * MIB, gen: str = "g1") -> str:
    p = dest.path("vm1.img", size)
    generation.record(dest.state, "d1", KEPT, p, size, gen, "hostb", R)
    return p


def ask(dest: Dest, path: str, gen: str = "g1", size: int = 4 * MIB) -> dict[str, Any]:
    r = dest.agent.op_prepare_disk("d1", path, size, block_size=512, migration="m2", warm=gen)
    assert generation.load(dest.state, "d1") is None, "the check consumes the generation"
    dest.agent.op_stop("d1")  # that copy was aborted: the next question starts afresh
    return dict(r["warm"])


def test_the_destination_says_warm_only_for_its_untouched_generation(dest: Dest) -> None:
    p = kept(dest)
    assert ask(dest, p) == {"ok": True, "why": f"{p} is untouched since generation g1"}
    assert ask(dest, p)["why"] == "no generation of d1 is recorded on this host"  # consumed
    kept(dest)
    assert "carries generation g1, not g2" in ask(dest, p, gen="g2")["why"]
    kept(dest)
    other = dest.path("vm2.img", 4 * MIB)
    assert "names" in ask(dest, other)["why"]
    p = kept(dest)
    with open(p, "r+b") as fh:
        fh.write(b"behind dmmig's back")
    assert "was changed since" in ask(dest, p)["why"]
    p = kept(dest, size=4 * MIB)
    assert "was 4194304 bytes at the generation" in ask(dest, p, size=2 * MIB)["why"]
    p = dest.path("vm1.img", 4 * MIB)
    generation.record(dest.state, "d1", TOOK_OVER, p, 4 * MIB, "g1", "hostb", R)
    assert "was not kept here" in ask(dest, p)["why"]


def test_no_warm_question_no_warm_answer(dest: Dest) -> None:
    p = kept(dest)
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m2")
    assert "warm" not in r


def test_the_new_owner_records_its_half_as_the_export_stops(dest: Dest) -> None:
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    done = dest.agent.op_stop("d1", warm={"generation": "abc123", "peer": "hosta"})["done"]
    rec = generation.load(dest.state, "d1")
    assert rec is not None and rec.role == TOOK_OVER and rec.generation == "abc123" and rec.path == p, done
    assert any("recorded generation abc123" in d for d in done), done
    # an abort records nothing; a generation that is no id is refused, and none stays
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m3")
    done = dest.agent.op_stop("d1", warm={"generation": "../x", "peer": "hosta"})["done"]
    assert generation.load(dest.state, "d1") is None and any("recorded no generation" in d for d in done), done
    assert dest.agent.op_hello()["warm"] == 1


def test_no_half_is_recorded_for_a_disk_used_here_before_the_sources_finish(dest: Dest) -> None:
    """The fence here is taken when finish stops the export, after the source vouched: a disk a
    domain took over (the gate's yes, then the guest wrote it) or that dmmig wrapped here before
    that finish has writes the source never got; recorded, they became the baseline and a copy
    back skipped them (review of 9e4b05e, finding 1)."""
    import json
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    f = Files(dest.state, "d1").incoming
    with open(f) as fh:
        rec = json.load(fh)
    with open(f, "w") as fh:
        json.dump(dict(rec, handed_over=1234.5), fh)
    done = dest.agent.op_stop("d1", warm={"generation": "abc123", "peer": "hosta"})["done"]
    assert generation.load(dest.state, "d1") is None, done
    assert any("recorded no generation" in d and "handed over" in d for d in done), done
    # wrapped here (a journal) before the source's finish
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m2")
    with open(Files(dest.state, "d1").journal, "w") as fh:
        fh.write("{}")
    done = dest.agent.op_stop("d1", warm={"generation": "abc124", "peer": "hosta"})["done"]
    assert generation.load(dest.state, "d1") is None and any("wrapped here" in d for d in done), done


# ---- the source's half (B) ---------------------------------------------------------------------
class _Stack:
    """What local_verdict and decide use of a Stack: the journal and dm suspend/resume."""

    def __init__(self, state: str) -> None:
        self.journal = journal.Journal(state)
        self.runner = R
        self.calls: list[str] = []
        self.dm = self

    def suspend(self, name: str) -> None:
        self.calls.append(f"suspend {name}")

    def resume(self, name: str) -> None:
        self.calls.append(f"resume {name}")


def entry(state: str, track: WarmTrack | None) -> journal.Entry:
    e = journal.Entry("d1", "/dev/loop0", "7:0", phase=journal.PREPARED, copy=CopyState(migration="m", warm=track))
    journal.Journal(state).save(e)
    return e


def test_every_reason_this_host_cannot_go_warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = str(tmp_path)
    s: Any = _Stack(state)
    e = entry(state, None)
    assert "no generation is recorded" in warm.local_verdict(s, e)[1]
    f = tmp_path / "d.img"
    f.write_bytes(bytes(4096))
    generation.record(state, "d1", KEPT, str(f), 4096, "g1", "b", R)
    assert "kept the old disk" in warm.local_verdict(s, e)[1]
    rec = generation.record(state, "d1", TOOK_OVER, str(f), 4096, "g1", "b", R)
    assert "not tracked since generation" in warm.local_verdict(s, e)[1]
    rec.broken = "/dev/loop0 was not tracked from the handover on: written"
    generation.save(state, rec)
    assert warm.local_verdict(s, e)[1] == rec.broken
    track = WarmTrack("g1", 2, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0))
    e = entry(state, track)
    generation.drop(state, "d1")
    assert "the record of generation g1 is gone" in warm.local_verdict(s, e)[1]  # `forget` there
    generation.record(state, "d1", TOOK_OVER, str(f), 4096, "g1", "b", R)
    fake_sysfs(monkeypatch, {"7:0": Counters("7:0", 5, 1016, 0), "254:1": Counters("254:1", 9, 8, 0)})
    t, why = warm.local_verdict(s, e)
    assert t is None and "written past the era device" in why
    assert s.calls == ["suspend dmmig-d1", "resume dmmig-d1"]  # read drained, and resumed
    fake_sysfs(monkeypatch, {"7:0": Counters("7:0", 5, 1016, 0), "254:1": Counters("254:1", 9, 16, 0)})
    assert warm.local_verdict(s, e) == (track, "")


def test_the_choice_is_warm_only_with_both_halves_and_stands_for_the_migration(tmp_path: Path) -> None:
    state = str(tmp_path)
    s: Any = _Stack(state)
    track = WarmTrack("g1", 2, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0))
    e = entry(state, track)
    assert not warm.decide(s, e, track, "", {"warm": {"ok": False, "why": "/dev/x was written since"}}, 4096)
    assert e.copy.warm and e.copy.warm.decision == ("cold: full copy, because on the destination, "
                                                     "/dev/x was written since")
    # decided: a resumed copy keeps the choice, whatever it is asked next
    assert not warm.decide(s, e, track, "", {"warm": {"ok": True, "why": ""}}, 4096)
    e = entry(state, WarmTrack("g1", 2, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0)))
    assert not warm.decide(s, e, None, "the origin 7:0 was written past the era device", {"warm": {"ok": True}},
                           4096)
    assert e.copy.warm and e.copy.warm.decision and "past the era device" in e.copy.warm.decision
    e = entry(state, WarmTrack("g1", 2, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0)))
    assert not warm.decide(s, e, e.copy.warm, "", {}, 4096)  # an older agent there: no answer is no yes
    e = entry(state, WarmTrack("g1", 2, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0)))
    assert warm.decide(s, e, e.copy.warm, "", {"warm": {"ok": True, "why": "untouched"}}, 4096)
    saved = journal.Journal(state).load("d1")
    assert saved is not None and saved.copy.warm is not None and saved.copy.warm.warm
    # no base pass, in the same save as the decision: a dmmig killed after it resumes with both
    c = saved.copy
    assert (c.base_era, c.next_since, c.base_done, c.base_offset) == (2, 2, True, 4096)


def test_a_copy_resumed_after_a_warm_decision_without_its_base_state_goes_on(tmp_path: Path) -> None:
    """The decision and the skipped base pass were two saves: killed between them, every resumed
    copy failed on an assert (exit 1) until abort (review of 9e4b05e, finding 4)."""
    state = str(tmp_path)
    s: Any = _Stack(state)
    track = WarmTrack("g1", 3, Counters("7:0", 5, 1000, 0), Counters("254:1", 9, 0, 0))
    e = entry(state, track)
    assert e.copy.warm is not None
    e.copy.warm.decision = "warm: only the blocks written here since generation g1 (era 3)"
    assert e.copy.base_era is None  # what the journal held after the first save
    assert warm.decide(s, e, None, "", None, 8192)  # resumed: no local verdict, no question there
    assert (e.copy.base_era, e.copy.next_since, e.copy.base_done, e.copy.base_offset) == (3, 3, True, 8192)


def test_warm_state_is_shown_and_forgotten(tmp_path: Path) -> None:
    state = str(tmp_path)
    s: Any = _Stack(state)
    f = tmp_path / "d.img"
    f.write_bytes(bytes(4096))
    generation.record(state, "d1", KEPT, str(f), 4096, "g1", "hostb", R)
    st = warm.status(s, "d1", None)
    assert st is not None and st["role"] == KEPT and st["untouched"] is True and "any write here" in st["effect"]
    assert warm.names(state) == ["d1"]
    assert warm.forget(s, "d1") == ["forgot the generation of d1"]
    with pytest.raises(Exception, match="has no warm state"):
        warm.forget(s, "d1")


def test_warm_records_are_no_disk_names() -> None:
    from dmmig.errors import BadInput
    from dmmig.validate import disk_name
    with pytest.raises(BadInput):
        disk_name("vm1.warm")
    assert Warm  # the record type is the one read_warm returns


def test_no_warm_question_forgets_the_generation_of_that_disk(dest: Dest) -> None:
    p = kept(dest)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m2")
    assert generation.load(dest.state, "d1") is None


class _WrapStack(_Stack):
    """A stack that has just wrapped d1 over a file standing for its origin."""

    def __init__(self, state: str, origin: str, open_count: int = 0) -> None:
        super().__init__(state)
        self.open_count = open_count
        self.prepared = 0
        e = journal.Entry("d1", origin, "7:0", phase=journal.WRAPPED)
        self.journal.save(e)

    def entry_of(self, name: str) -> journal.Entry:
        e = self.journal.load(name)
        assert e is not None
        return e

    def info(self, name: str) -> Any:
        return type("Info", (), {"open_count": self.open_count})()

    def prepare(self, name: str, confine: bool = True) -> None:
        self.prepared += 1
        self.confined = confine
        e = self.entry_of(name)
        self.journal.save(e, journal.PREPARED)

    def era_status(self, name: str) -> Any:
        return type("EraStatus", (), {"current_era": 1})()


@pytest.mark.parametrize("case, why", [
    ("phase", "is in phase prepared"),
    ("open", "was already open when the tracking could start"),
    ("path", "is not the disk the generation names"),
    ("written", "was changed since"),
    ("counters", "cannot be read"),
    # the gate's half, taken at once in the window: written before track settled it
    ("unsettled", "its fence could not be settled"),
])
def test_wrap_tracks_only_an_untouched_disk_that_nothing_opened_yet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, why: str) -> None:
    state = str(tmp_path / "state")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))
    if case == "unsettled":
        monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.6)
    generation.record(state, "d1", TOOK_OVER, str(disk), 8192, "g1", "a", R, wait=case != "unsettled")
    if case == "unsettled":
        time.sleep(0.05)
        with open(disk, "r+b") as fh:
            fh.write(b"x")
    fake_sysfs(monkeypatch, {"7:0": None if case == "counters" else Counters("7:0", 3, 50, 0)})
    s: Any = _WrapStack(state, str(disk), open_count=1 if case == "open" else 0)
    if case == "phase":
        s.prepare("d1")
    elif case == "path":
        s.journal.save(journal.Entry("d1", str(tmp_path / "other.img"), "7:0", phase=journal.WRAPPED))
    elif case == "written":
        with open(disk, "r+b") as fh:
            fh.write(b"x")
    note = warm.track(s, "d1")
    assert note is not None and note.startswith("cold: ") and why in note, note
    rec = generation.load(state, "d1")
    assert rec is not None and rec.broken and why in rec.broken and not rec.tracking
    assert s.prepared == (1 if case == "phase" else 0)
    assert warm.track(s, "d1") is None  # broken stays broken: no second try
    assert why in warm.local_verdict(s, s.entry_of("d1"))[1]


def test_wrap_of_the_handed_over_disk_puts_era_under_it_at_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    state = str(tmp_path / "state")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))
    generation.record(state, "d1", TOOK_OVER, str(disk), 8192, "g1", "a", R)
    fake_sysfs(monkeypatch, {"7:0": Counters("7:0", 3, 50, 0), "254:7": Counters("254:7", 12, 0, 0)})
    monkeypatch.setattr(writefence, "devno_of", lambda path: "254:7" if "mapper" in path else None)
    s: Any = _WrapStack(state, str(disk))
    assert "warm: era tracks every write to d1 since generation g1 (era 1)" == warm.track(s, "d1")
    e = s.entry_of("d1")
    assert s.prepared == 1 and e.copy.warm == WarmTrack("g1", 1, Counters("7:0", 3, 50, 0), Counters("254:7", 12, 0, 0))
    assert s.confined is False  # B's tracking era keeps the origin's discard limit
    rec = generation.load(state, "d1")
    assert rec is not None and rec.tracking
    assert warm.track(s, "d1") is None  # once


def test_status_shows_a_kept_disk_and_whether_it_is_still_untouched(tmp_path: Path) -> None:
    from dmmig.flows.status import glance, render
    state = str(tmp_path)
    s: Any = _Stack(state)
    f = tmp_path / "d.img"
    f.write_bytes(bytes(4096))
    generation.record(state, "d1", KEPT, str(f), 4096, "0123456789abcdef", "hostb", R)
    st = {"name": "d1", "journal": None, "incoming": None, "devices": {}, "problems": [], "gate": None,
          "warm": warm.status(s, "d1", None)}
    assert glance(st)["phase"] == "warm (kept)" and glance(st)["progress"] == "untouched"
    text = render(st)
    assert "generation 0123456789ab with hostb, kept" in text and "(untouched)" in text, text
    with open(f, "r+b") as fh:
        fh.write(b"x")
    st["warm"] = warm.status(s, "d1", None)
    assert glance(st)["progress"] == "WRITTEN since" and "no longer trusted" in render(st)


def test_a_disk_remapped_without_a_write_is_no_longer_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An LV reduced and extended again maps other extents: its data changed, and no write
    went through it. The mapping (a dm table, a loop device's offset, a partition's start) is
    part of the fence."""
    then = Counters("253:4", 7, 100, 0, 0, "size=8192;table=0 8192 linear 7:0 2048")
    now = Counters("253:4", 7, 100, 0, 0, "size=8192;table=0 8192 linear 7:0 10240")
    assert "maps onto something else" in str(writefence._differs("/dev/vg/lv", then, now))
    fake_sysfs(monkeypatch, {"253:4": now, "254:1": Counters("254:1", 9, 0, 0)})
    assert "maps onto something else" in str(writefence.bypassed(then, Counters("254:1", 9, 0, 0), R))


def test_the_mapping_is_read_from_sysfs_and_a_dm_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = tmp_path / "sys"
    devs = {"7:0": {"size": "8192", "loop/backing_file": "/img", "loop/offset": "0", "loop/sizelimit": "0"},
            "253:4": {"size": "4096", "dm/name": "vg-lv"}, "8:1": {"size": "100", "start": "2048"}}
    for devno, files in devs.items():
        for rel, text in files.items():
            (sysfs / devno / rel).parent.mkdir(parents=True, exist_ok=True)
            (sysfs / devno / rel).write_text(text + "\n")
    real = os.path

    class P:  # os.path with /sys/dev/block/ redirected
        def __getattr__(self, name: str) -> Any:
            fn = getattr(real, name)
            return lambda p, *a: fn(str(p).replace("/sys/dev/block", str(sysfs)), *a)
    monkeypatch.setattr(writefence.os, "path", P())
    import builtins
    opener = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda p, *a, **k: opener(str(p).replace("/sys/dev/block", str(sysfs)), *a, **k))
    runner = FakeRunner([(["dmsetup", "table"], (0, "0 4096 linear 7:0 2048\n", ""))])
    assert writefence.mapping("7:0", runner) == "size=8192;loop=/img@0+0"
    assert writefence.mapping("8:1", runner) == "size=100;start=2048"
    assert writefence.mapping("253:4", runner) == "size=4096;table=0 4096 linear 7:0 2048"
    assert runner.argvs == [["dmsetup", "table", "-j", "253", "-m", "4"]]
    with pytest.raises(OSError, match="dmsetup table of 253:4 failed"):
        writefence.mapping("253:4", FakeRunner([(["dmsetup"], (1, "", "No such device"))]))


# ---- dmmig migrate (Xen): the gate's yes records the generation ------------------------------------
def _asked(dest: Dest, name: str, out: dict[str, Any]) -> Any:
    """A destination `add` asking about NAME (the real gate socket), once the gate listens."""
    import threading

    from dmmig.core import gate
    dest.agent.op_await_gate([], 0)
    def ask() -> None:
        try:
            out.update(gate.ask(dest.state, name, 10))
        except gate.GateRefused as e:
            out["refused"] = e.message
    t = threading.Thread(target=ask)
    t.start()
    assert dest.agent.op_await_gate([name], 10) == {"asked": name}
    return t


def _answer(dest: Dest, name: str, out: dict[str, Any], *, ok: bool = True, gen: str = "abc123",
            asked: bool = True) -> dict[str, Any]:
    """The source's answer to NAME's gate with a generation, with the `add` asking first unless
    not ASKED (an `add` that gave up: the answer is not delivered); the agent's reply."""
    t = _asked(dest, name, out) if asked else None
    try:
        r = dest.agent.op_answer_gate(name, ok, "fine", warm={"generation": gen, "peer": "hosta"})
        if t is not None:
            t.join(10)
    finally:
        dest.agent.gate.close()
    return r


def test_the_new_owner_records_its_half_at_the_gates_yes_once_its_export_stopped(dest: Dest) -> None:
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    assert dest.agent.op_hello()["warm_gate"] is True
    out: dict[str, Any] = {}
    r = _answer(dest, "d1", out)
    assert r["delivered"] is True and r["warm"] == {"ok": True} and out["ok"], r
    rec = generation.load(dest.state, "d1")
    assert rec is not None and rec.role == TOOK_OVER and rec.generation == "abc123" and rec.path == p
    rec = generation.settle(dest.state, rec, R)  # as warm.track does before era goes under the top
    assert rec.fence.file is not None and writefence.written_since(rec.fence, R) is None


@pytest.mark.parametrize("case, why", [
    ("undelivered", "the yes was not delivered"),  # the `add` gave up: the disk is not this host's
    ("bad id", "invalid generation"),
    ("no", "no yes"),
])
def test_no_half_is_recorded_at_the_gate_unless_the_yes_reached_the_add(dest: Dest, case: str, why: str) -> None:
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    generation.record(dest.state, "d1", TOOK_OVER, p, 4 * MIB, "older", "hosta", R)  # an older one goes too
    r = _answer(dest, "d1", {}, ok=case != "no", gen="../x" if case == "bad id" else "abc123",
                asked=case != "undelivered")
    assert r["warm"]["ok"] is False and why in r["warm"]["why"], r
    if case != "no":
        assert generation.load(dest.state, "d1") is None


@pytest.mark.parametrize("case, why", [
    ("handed over", "handed over to a domain here"),  # an earlier yes on this record: a domain used it
    ("wrapped", "dmmig here has a journal for d1"),   # dmmig-d1 stacked on it before this yes
])
def test_no_half_is_recorded_at_the_gate_for_a_disk_used_here_since_the_exports_last_write(
        dest: Dest, case: str, why: str) -> None:
    """ce18dd3's rule on the migrate path: the gate's fence here is taken as the export stops;
    a disk something else used since then (a domain an earlier yes handed it to, dmmig's own
    wrap) has writes the source never got, which would become the "identical" baseline."""
    import json
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    if case == "handed over":
        f = Files(dest.state, "d1").incoming
        with open(f) as fh:
            rec = json.load(fh)
        with open(f, "w") as fh:
            json.dump(dict(rec, handed_over=1234.5), fh)
    else:
        with open(Files(dest.state, "d1").journal, "w") as fh:
            fh.write("{}")
    out: dict[str, Any] = {}
    r = _answer(dest, "d1", out)
    assert r["delivered"] and r["warm"]["ok"] is False and why in r["warm"]["why"], r
    assert generation.load(dest.state, "d1") is None


def test_a_kept_loop_device_becomes_a_fence_of_its_file_only_if_nothing_wrote_either(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """block-dmmig's loop device over the file goes after the handover: a's half then fences the
    file itself (what a migration back names), with the stamp taken at the gate."""
    state = str(tmp_path / "state")
    img = tmp_path / "vm1.img"
    img.write_bytes(bytes(8192))
    loops = {"/dev/loop3": "7:3"}
    monkeypatch.setattr(writefence, "devno_of", lambda path: loops.get(path))
    monkeypatch.setattr(writefence, "backing_file", lambda devno: str(img) if devno == "7:3" else None)
    monkeypatch.setattr(writefence, "sync", lambda path: None)
    s: Any = _Stack(state)
    for case in ("untouched", "through the loop", "the file", "other node"):
        fake_sysfs(monkeypatch, {"7:3": Counters("7:3", 4, 100, 0)})
        rec = generation.record(state, "d1", KEPT, "/dev/loop3", 8192, "g1", "b", R)
        assert rec.fence.device is not None and rec.fence.file_path == str(img)
        if case == "through the loop":
            fake_sysfs(monkeypatch, {"7:3": Counters("7:3", 4, 108, 0)})
        elif case == "the file":
            with open(img, "r+b") as fh:
                fh.write(b"x")
        note = warm.kept_file(s, "d1", "/dev/loop4" if case == "other node" else "/dev/loop3", str(img))
        got = generation.load(state, "d1")
        if case == "untouched":
            assert note and "now fences" in note and got is not None, note
            assert got.path == str(img) and got.fence.device is None and got.fence.file == rec.fence.file
            loops.clear()  # detached: the file alone is checked now
            assert writefence.written_since(got.fence, R) is None
            with open(img, "r+b") as fh:  # a new loop device's write moves the file's ctime
                fh.write(b"y")
            assert "was changed since" in str(writefence.written_since(got.fence, R))
            loops["/dev/loop3"] = "7:3"
        elif case == "other node":
            assert note is None and got is not None and got.path == "/dev/loop3"
        else:
            assert note and "forgot the generation" in note and got is None, note
        generation.drop(state, "d1")


class _GateStack(_Stack):
    """What answer_gate uses of a Stack: a mirror in sync since its sync, a disk in a file."""

    def __init__(self, state: str, origin: str) -> None:
        super().__init__(state)
        from dmmig.core.records import MirrorState, Synced
        self.e = journal.Entry("d1", origin, "7:0", phase=journal.MIRRORING)
        self.e.mirror = MirrorState(synced=Synced(at=1.0, events=3))
        self.e.dest = None
        self.journal.save(self.e)

    def mirror_status(self, name: str) -> Any:
        return type("St", (), {"synced": True, "healthy": True, "in_sync": 8, "regions": 8, "health": "AA"})()

    def info(self, name: str) -> Any:
        return type("Info", (), {"events": 3, "open_count": 1, "suspended": False})()

    def table(self, name: str) -> Any:
        return type("T", (), {"length": 16})()

    def lv_problem(self, entry: journal.Entry) -> str | None:  # no adopted LV here
        return None


class _Agent:
    def __init__(self, hello: dict[str, Any], reply: dict[str, Any]) -> None:
        self.hello, self.reply, self.calls = hello, reply, []  # type: list[Any]

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append((op, kw))
        return self.reply


@pytest.mark.parametrize("case", ["warm", "older agent", "short window", "undelivered", "not recorded there",
                                  "adopted", "written after the window"])
def test_the_gates_yes_records_this_hosts_half_only_with_the_destinations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from dmmig.flows.handover import answer_gate
    monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.6)  # long enough to show in the window
    state = str(tmp_path / "state")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))
    s: Any = _GateStack(state, str(disk))
    if case == "adopted":  # its kept disk would be dmmig-NAME-lv, which finish removes (as finish)
        from dmmig.core.records import Adopted
        s.e.adopted = Adopted(lv="vg0-vm1", path="/dev/vg0/vm1", devno="253:3", uuid="LVM-x", table="0 16 linear 7:0 0")
    generation.record(state, "d1", KEPT, str(disk), 8192, "older", "b", R)  # an older one never stays
    disk.write_bytes(bytes(8192))  # the guest's last write through the mirror, just now
    hello = {} if case == "older agent" else {"warm_gate": True}
    reply: dict[str, Any] = {"delivered": case != "undelivered",
                             "warm": {"ok": case != "not recorded there", "why": "could not be fenced"}}
    agent = _Agent(hello, reply)
    remote: Any = type("Remote", (), {"agent": agent})()
    if case == "written after the window":  # the top resumed, then the kept disk was written
        resume = s.resume
        def resume_and_write(name: str) -> None:
            resume(name)
            with open(disk, "r+b") as fh:
                fh.write(b"after the yes")
        s.resume = resume_and_write
    # the disk's file was just written (its ctime is fresh): the window must not wait for it
    h = answer_gate(s, s.e, remote, cap=3.5 if case == "short window" else 12.0)
    assert h["ok"], h
    assert h["seconds"] < 0.3, h  # a's fence waited for the ctime (0.6 s here) in the window
    [(op, kw)] = agent.calls
    rec = generation.load(state, "d1")
    if case == "warm":
        assert rec is not None and rec.role == KEPT and rec.path == str(disk) and rec.size == 16 * 512
        assert kw["warm"]["generation"] == rec.generation and h["generation"] == rec.generation
        assert rec.fence.settled and writefence.written_since(rec.fence, R) is None  # settled after it
    else:
        assert rec is None, case
        assert ("warm" in kw) == (case in ("undelivered", "not recorded there", "written after the window")), kw
        assert h.get("generation") is None, h
    assert s.calls[0] == "suspend dmmig-d1" and s.calls[-1] == "resume dmmig-d1"


def test_migrate_dry_run_says_why_a_disk_not_prepared_is_a_full_copy(tmp_path: Path) -> None:
    """`dmmig migrate --dry-run` shows copying.estimate per disk: a disk block-dmmig only
    wrapped says cold and why, not nothing."""
    from dmmig.flows import copying
    state = str(tmp_path)
    s: Any = _WrapStack(state, str(tmp_path / "disk.img"))
    s.loop = type("Loop", (), {"find": lambda self, f: [], "info": lambda self, d: None})()
    s.dm = s
    s.table = lambda name: type("T", (), {"length": 2048})()
    s.discard_unit = lambda name: 0  # main's Stack.discard_unit: an origin that takes no discard
    est = copying.estimate(s, "d1")
    assert est["warm"] == "cold: full copy, because no generation is recorded for this disk here " \
                          "(no migration finished onto it)", est
    assert "cold: full copy, because" in "\n".join(copying.render_estimate(est))


def test_a_fence_taken_at_once_proves_nothing_until_settled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's fences are taken in a suspended window without waiting for a file's ctime:
    such a fence says "never settled" until settle() took the stamp again past the ctime's
    settling time and found it, and the counters, as they were; a write in between: no fence."""
    from dmmig.core.records import fence_of
    monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.6)
    f = tmp_path / "d.img"
    f.write_bytes(bytes(4096))  # just written: its ctime has not settled
    t0 = time.monotonic()
    fence = writefence.take(str(f), R, wait=False)
    assert time.monotonic() - t0 < 0.3 and not fence.settled
    assert "never settled" in str(writefence.written_since(fence, R))
    assert fence_of(to_json(fence)) == fence  # saved and read back: still unsettled
    assert not fence_of(dict(to_json(fence), settled="yes")).settled  # anything but true is not settled
    done = writefence.settle(fence, R)
    assert done.settled and done.file == fence.file and writefence.written_since(done, R) is None
    f.write_bytes(bytes(4096))
    fence = writefence.take(str(f), R, wait=False)
    t = threading.Timer(0.2, lambda: f.write_bytes(b"between the window and the settle"))
    t.start()
    try:
        with pytest.raises(OSError, match="written while its fence was taken"):
            writefence.settle(fence, R)
    finally:
        t.join()


def test_the_new_owners_half_at_the_gate_is_taken_at_once_and_settled_by_track(
        dest: Dest, monkeypatch: pytest.MonkeyPatch) -> None:
    """b's agent records its half in the source's suspended window: no wait for the file's ctime
    there (the export wrote it just now); warm.track settles it before era goes under the top,
    and a write to the file in between makes the record unusable (dropped: a full copy back)."""
    monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.6)
    p = dest.path("vm1.img", 4 * MIB)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, block_size=512, migration="m1")
    out: dict[str, Any] = {}
    t = _asked(dest, "d1", out)
    try:
        with open(p, "r+b") as fh:
            fh.write(b"x")  # the export's last write, just now
        t0 = time.monotonic()
        r = dest.agent.op_answer_gate("d1", True, "fine", warm={"generation": "abc", "peer": "a", "budget_s": 0})
        took = time.monotonic() - t0
        t.join(10)
    finally:
        dest.agent.gate.close()
    assert r["delivered"] and r["warm"]["ok"] is True and took < 0.3, (r, took)
    rec = generation.load(dest.state, "d1")
    assert rec is not None and not rec.fence.settled
    assert generation.settle(dest.state, rec, R).fence.settled
    got = generation.load(dest.state, "d1")
    assert got is not None and got.fence.settled and writefence.written_since(got.fence, R) is None
    # again, with a write before the settle
    with open(p, "r+b") as fh:
        fh.write(b"z")
    generation.record(dest.state, "d1", TOOK_OVER, p, 4 * MIB, "abd", "a", R, wait=False)
    rec = generation.load(dest.state, "d1")
    assert rec is not None and not rec.fence.settled
    time.sleep(0.05)  # past the ctime's tick of the record's stamp (a write within it does not show)
    with open(p, "r+b") as fh:
        fh.write(b"y")
    with pytest.raises(OSError):
        generation.settle(dest.state, rec, R)
    assert generation.load(dest.state, "d1") is None


@pytest.mark.parametrize("written", [False, True])
def test_migrate_settles_each_gates_generation_after_every_disk_was_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: bool) -> None:
    """`dmmig migrate` answers every disk's gate first (answer_gate(settle=False): no disk's yes
    waits for another's ctime), then settles each generation, its lock still held; a write
    between the window and the settle drops it, journaled."""
    from dmmig.flows.handover import answer_gate, settle_generation
    monkeypatch.setattr(writefence, "CTIME_SETTLE_S", 0.6)
    state = str(tmp_path / "state")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))  # just written: its ctime is fresh
    s: Any = _GateStack(state, str(disk))
    remote: Any = type("Remote", (), {"agent": _Agent({"warm_gate": True},
                                                      {"delivered": True, "warm": {"ok": True}})})()
    h = answer_gate(s, s.e, remote, settle=False)
    rec = generation.load(state, "d1")
    assert h["ok"] and h["generation"] and rec is not None and not rec.fence.settled, (h, rec)
    if written:
        time.sleep(0.05)
        disk.write_bytes(bytes(8192))
    settle_generation(s, s.e)
    saved = journal.Journal(state).load("d1")
    assert saved is not None and saved.mirror.handover is not None
    rec = generation.load(state, "d1")
    if written:
        assert rec is None and saved.mirror.handover.generation is None
    else:
        assert rec is not None and rec.fence.settled and saved.mirror.handover.generation == h["generation"]
