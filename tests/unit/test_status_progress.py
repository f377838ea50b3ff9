"""`dmmig status` at a glance, and the progress model's two views (a bar; JSON lines)."""
from __future__ import annotations

import io
import json
from typing import Any

import pytest

from dmmig import progress
from dmmig.flows.status import glance, render, render_glance

MIB = 1 << 20


def status(name: str = "vm1", phase: str = "copying", **journal: Any) -> dict[str, Any]:
    """What status.disk_status returns, for a disk of 64 MiB."""
    j = {"phase": phase, "origin": "/dev/vg0/vm1", "origin_devno": "254:3", "block_bytes": 65536,
         "metadata": "/dev/loop7", "checkpoints": [], "history": [],
         "dest": {"host": "b", "disk": "/dev/vg0/vm1", "transport": "ssh", "tunnel": "relay"},
         "copy": {}, "mirror": {}}
    j.update(journal)
    top = {"devno": "254:9", "open": 1, "suspended": False, "inactive_table": False, "events": 0,
           "table": f"0 {64 * MIB // 512} linear 254:8 0", "status": f"0 {64 * MIB // 512} linear"}
    return {"name": name, "journal": j, "incoming": None, "gate": None, "problems": [],
            "devices": {f"dmmig-{name}": top}}


def mirroring(in_sync: int, healthy: bool = True, parts: int = 16) -> dict[str, Any]:
    st = status(phase="mirroring", mirror={"parts": parts})
    per = 64 * MIB // 512 // parts
    top = st["devices"]["dmmig-vm1"]
    top["table"] = "\n".join(f"{i * per} {per} mirror core ..." for i in range(parts))
    top["status"] = "\n".join(f"{i * per} {per} mirror 2 ..." for i in range(parts))
    top["mirror"] = {"in_sync": in_sync, "regions": 1024, "health": "AA" if healthy else "AD",
                     "log_health": "A", "healthy": healthy}
    return st


def test_glance_says_how_far_each_phase_is() -> None:
    assert glance(status(copy={"base_started": True, "base_offset": 16 * MIB}))["progress"] == "base 25% of 64 MiB"
    r = glance(status(phase="copied", copy={"base_done": True, "rounds": [{"dirty_bytes": 3 * MIB}]}))
    assert r["progress"] == "base copied, 1 round(s), last delta 3 MiB"
    assert r["destination"] == "b:/dev/vg0/vm1 (ssh)" and r["state"] == "ok"
    assert glance(mirroring(1024))["progress"] == "mirrored, in sync (16 parts)"
    assert glance(mirroring(512))["progress"] == "resync 50% (512 regions left)"
    assert glance(mirroring(1024, healthy=False))["state"] == "LEG FAILED"


def test_the_table_has_one_line_per_disk_and_then_every_problem() -> None:
    a, b = status("vm1"), status("vm2", phase="cutting-over")
    b["problems"].append("a `cutting-over` step did not complete")
    out = render_glance([a, b]).splitlines()
    assert out[0].split() == ["DISK", "PHASE", "DESTINATION", "PROGRESS", "STATE"]
    assert out[1].startswith("vm1 ") and out[2].startswith("vm2 ") and out[2].endswith("1 problem")
    assert out[3] == "! vm2: a `cutting-over` step did not complete"


def test_a_mirror_sets_table_is_folded_unless_asked() -> None:
    st = mirroring(1024)
    short, full = render(st), render(st, tables=True)
    assert short.splitlines()[0] == "vm1: mirroring, mirrored, in sync (16 parts), ok"
    assert "15 more line(s), one per mirror part" in short and short.count(" mirror core ") == 1
    assert full.count(" mirror core ") == 16


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_json_events_carry_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    p = progress.Progress(True, label="vm1", stream=out)
    p.start("base", 100 * MIB)
    now[0] += 2
    p.advance(20 * MIB)
    now[0] += 0.5
    p.advance(MIB)   # within a second of the last event: none
    p.end(read=21 * MIB, seconds=9.9)  # a copier's own seconds win over the phase's
    ev = lines(out)
    assert [e["event"] for e in ev] == ["start", "progress", "end"]
    assert ev[1]["rate_bytes_per_s"] == 10 * MIB and ev[1]["eta_s"] == 8.0 and ev[1]["disk"] == "vm1"
    assert ev[2]["done_bytes"] == 21 * MIB and ev[2]["seconds"] == 9.9


def test_without_a_terminal_a_log_still_sees_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    err = io.StringIO()
    p = progress.Progress(False, tty=False, stream=err)
    p.event("summary", x=1)  # programs' events only with --json
    p.start("resync", 1024, unit="regions")
    for _ in range(30):
        now[0] += 1
        p.advance(10)
    p.end()
    ev = lines(err)
    assert [e["event"] for e in ev] == ["start", "progress", "progress", "progress", "end"]
    assert ev[1]["done_regions"] == 100 and ev[1]["rate_regions_per_s"] == 10
    # on a terminal: the bar, and no lines at all
    tty = io.StringIO()
    q = progress.Progress(False, tty=False, stream=tty)
    q.tty = True
    q.event("progress")
    assert tty.getvalue() == ""
