"""The gate asks again, right before its yes, whether LVM reloaded an adopted LV: the top's
suspension does not stop writes through a reloaded LV (they go straight to the PV), so a
reload during the catch-up must turn the yes into a no (review of ab8cd7b, finding 5)."""
from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmmig.core import journal
from dmmig.core.records import Synced
from dmmig.flows import handover


class _Dm:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def suspend(self, name: str) -> None:
        self.calls.append(f"suspend {name}")

    def resume(self, name: str) -> None:
        self.calls.append(f"resume {name}")

    def mirror_status(self, name: str) -> Any:  # a leg failed since the sync: a catch-up first
        return SimpleNamespace(synced=False, healthy=False, health="DA")

    def info(self, name: str) -> Any:
        return SimpleNamespace(events=3)

    def table(self, name: str) -> Any:
        return SimpleNamespace(length=2048)


class _Stack:
    def __init__(self, problems: list[str | None], discards: str = "254:1/9/0") -> None:
        self.dm = _Dm()
        self.mark = discards
        self.era = SimpleNamespace(dirty=lambda era, meta, since: ([], 0))
        self.journal = SimpleNamespace(save=lambda entry, phase=None: None)
        self.problems = problems

    def lv_problem(self, entry: journal.Entry) -> str | None:
        return self.problems.pop(0) if self.problems else None

    def discards(self, name: str) -> str | None:
        return self.mark


class _Remote:
    def __init__(self) -> None:
        self.answers: list[tuple[bool, str]] = []
        self.agent = self
        self.hello: dict[str, Any] = {}  # no warm_gate: the gate records no generation
        self.ssh = None
        self.a, self.b = socket.socketpair()

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert op == "answer_gate"
        self.answers.append((kw["ok"], kw["why"]))
        return {"delivered": True}

    def nbd(self, export: Any, name: str) -> Any:
        return SimpleNamespace(aio_get_fd=self.a.fileno, shutdown=lambda: None)


RELOADED = "the table of vg0-vm1 is no longer dmmig's"


def _catch_up(monkeypatch: pytest.MonkeyPatch, exports: list[bool] | None = None) -> journal.Entry:
    """A mirroring entry whose leg broke since the sync (events moved): the gate must catch up;
    the export and the copy do nothing (EXPORTS gets each export's `fresh`)."""
    monkeypatch.setattr(handover, "start_export", lambda remote, dest, name, deadline_s=None, fresh=False:
                        (exports if exports is not None else []).append(fresh))
    copied = SimpleNamespace(read=0)
    monkeypatch.setattr(handover, "Copier", lambda *a, **k: SimpleNamespace(copy=lambda ext: copied))
    e = journal.Entry("d1", "/dev/loop0", "7:0", phase=journal.MIRRORING, metadata="/dev/loop1", block_sectors=128)
    e.mirror.synced = Synced(events=2)
    e.copy.discards = "254:1/9/0"
    monkeypatch.setattr(journal.Entry, "destination", lambda self: None)
    return e


@pytest.mark.parametrize("problems, ok", [([None, None], True), ([None, RELOADED], False)])
def test_a_reload_during_the_catch_up_turns_the_yes_into_a_no(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, problems: list[str | None], ok: bool) -> None:
    e = _catch_up(monkeypatch)
    s, r = _Stack(list(problems)), _Remote()
    s.journal.dir = str(tmp_path)  # where the gate drops a generation it does not record
    rec = handover.answer_gate(s, e, r)  # type: ignore[arg-type]
    assert rec["ok"] is ok and r.answers[-1][0] is ok, (rec, r.answers)
    if not ok:
        assert "no longer dmmig's" in rec["why"]
    assert s.dm.calls == ["suspend dmmig-d1", "resume dmmig-d1"]


def test_the_catch_up_writes_through_a_fresh_export_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The broken leg's connection may still hold writes on their way to the destination (a
    TCP flow that black-holed, then comes back): they would land over the catch-up's. So the
    catch-up asks for a fresh export, whose old qemu-nbd has exited (op_export)."""
    exports: list[bool] = []
    e = _catch_up(monkeypatch, exports)
    s, r = _Stack([None, None]), _Remote()
    s.journal.dir = str(tmp_path)
    assert handover.answer_gate(s, e, r)["ok"]  # type: ignore[arg-type]
    assert exports == [True]


def test_a_discard_since_the_cutover_turns_a_catch_up_into_a_no(monkeypatch: pytest.MonkeyPatch) -> None:
    """Era records a discard by its first block only, and after a leg failed a discard reached
    leg 0 alone: no catch-up in the window can know where the rest of it fell."""
    e = _catch_up(monkeypatch)
    s, r = _Stack([], discards="254:1/9/2048"), _Remote()
    rec = handover.answer_gate(s, e, r)  # type: ignore[arg-type]
    assert rec["ok"] is False and r.answers[-1][0] is False, (rec, r.answers)
    assert "2048 sector(s) were discarded through the era device" in rec["why"], rec
    assert s.dm.calls == ["suspend dmmig-d1", "resume dmmig-d1"]
