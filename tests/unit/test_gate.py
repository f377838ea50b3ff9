"""The gate's socket protocol in-process (real unix sockets, no root): the destination's ask,
the agent's GateServer, the source's answer."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dmmig import gate


def asker(state: Path, name: str, timeout: float, out: dict) -> threading.Thread:
    def run() -> None:
        try:
            out["reply"] = gate.ask(str(state), name, timeout)
        except gate.GateRefused as e:
            out["refused"] = e.message
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("ok", [True, False])
def test_ask_gets_the_sources_answer(tmp_path: Path, ok: bool) -> None:
    srv = gate.GateServer(str(tmp_path))
    out: dict = {}
    t = asker(tmp_path, "vm1", 10, out)   # asks before the server exists: it keeps trying
    time.sleep(0.5)
    srv.start()
    try:
        assert srv.wait(["vm0", "vm1"], 10) == "vm1"
        assert srv.answer("vm1", ok, "why not")
        t.join(10)
    finally:
        srv.close()
    if ok:
        assert out["reply"]["ok"] is True
    else:
        assert "refused the handover of vm1: why not" in out["refused"]
    assert not (tmp_path / "gate.sock").exists()


def test_no_source_is_a_refusal_within_the_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(gate.GateRefused, match="no dmmig source is waiting"):
        gate.ask(str(tmp_path), "vm1", 1)
    assert time.monotonic() - t0 < 3


def test_a_source_that_never_answers_is_a_refusal(tmp_path: Path) -> None:
    srv = gate.GateServer(str(tmp_path))
    srv.start()
    try:
        out: dict = {}
        t = asker(tmp_path, "vm1", 1, out)
        assert srv.wait(["vm1"], 5) == "vm1"
        t.join(5)
        assert "did not confirm vm1" in out["refused"]
        assert not srv.answer("vm1", True, "")  # too late: nobody is listening any more
    finally:
        srv.close()


def test_incoming_only_until_handed_over(tmp_path: Path) -> None:
    assert not gate.incoming(str(tmp_path), "vm1")
    rec = tmp_path / "vm1.dest.json"
    rec.write_text(json.dumps({"name": "vm1"}))
    assert gate.incoming(str(tmp_path), "vm1")
    rec.write_text(json.dumps({"name": "vm1", "handed_over": 1.0}))
    assert not gate.incoming(str(tmp_path), "vm1")
    rec.write_text("{garbage")
    assert gate.incoming(str(tmp_path), "vm1")  # unreadable: ask rather than trust
