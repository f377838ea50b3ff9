"""The gate's socket protocol in-process (real unix sockets, no root): the destination's ask,
the agent's GateServer, the source's answer."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from dmmig.core import gate
from dmmig.errors import Busy


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
    srv.listen(["vm0", "vm1"])
    try:
        assert srv.wait(["vm0", "vm1"], 10) == "vm1"
        assert srv.answer("vm1", ok, "why not")
        t.join(10)
        # one answer per handover: vm1's gate closed, vm0's still listens
        assert not (tmp_path / "vm1.gate.sock").exists() and (tmp_path / "vm0.gate.sock").exists()
    finally:
        srv.close()
    if ok:
        assert out["reply"]["ok"] is True
    else:
        assert "refused the handover of vm1: why not" in out["refused"]
    assert not list(tmp_path.glob("*.sock"))


def test_no_source_is_a_refusal_within_the_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(gate.GateRefused, match="no dmmig source is waiting"):
        gate.ask(str(tmp_path), "vm1", 1)
    assert time.monotonic() - t0 < 3


def test_a_source_that_never_answers_is_a_refusal(tmp_path: Path) -> None:
    srv = gate.GateServer(str(tmp_path))
    srv.listen(["vm1"])
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


def test_two_agents_on_one_host_each_get_their_own_disks_question(tmp_path: Path) -> None:
    """Before: the second agent unlinked the first one's gate.sock and took every question."""
    first, second = gate.GateServer(str(tmp_path)), gate.GateServer(str(tmp_path))
    first.listen(["vm1"])
    second.listen(["vm2"])
    try:
        outs: dict[str, dict] = {"vm1": {}, "vm2": {}}
        ts = [asker(tmp_path, n, 10, outs[n]) for n in ("vm1", "vm2")]
        assert first.wait(["vm1"], 5) == "vm1" and second.wait(["vm2"], 5) == "vm2"
        assert first.answer("vm1", True, "") and second.answer("vm2", True, "")
        for t in ts:
            t.join(10)
        assert outs["vm1"]["reply"]["ok"] and outs["vm2"]["reply"]["ok"], outs
    finally:
        first.close()
        second.close()


def test_a_second_agent_for_the_same_disk_is_refused_never_steals_it(tmp_path: Path) -> None:
    first, second = gate.GateServer(str(tmp_path)), gate.GateServer(str(tmp_path))
    first.listen(["vm1"])
    try:
        with pytest.raises(Busy, match=f"pid {os.getpid()}.* already waits for the handover of vm1"):
            second.listen(["vm2", "vm1"])
        assert second.listening() == [] and not (tmp_path / "vm2.gate.sock").exists()  # all or nothing
        out: dict = {}
        t = asker(tmp_path, "vm1", 10, out)
        assert first.wait(["vm1"], 5) == "vm1"  # the first agent still gets vm1's question
        assert first.answer("vm1", True, "")
        t.join(10)
        assert out["reply"]["ok"]
        assert gate.holder(str(tmp_path), "vm1") is None
    finally:
        first.close()
        second.close()


def test_a_socket_left_by_a_dead_agent_is_replaced_and_abort_removes_it(tmp_path: Path) -> None:
    import socket
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(gate.socket_path(str(tmp_path), "vm1"))  # bound, never listening: what SIGKILL leaves
    dead.close()
    assert gate.stale_socket(str(tmp_path), "vm1") and gate.names(str(tmp_path)) == ["vm1"]
    srv = gate.GateServer(str(tmp_path))
    srv.listen(["vm1"])
    try:
        assert not gate.stale_socket(str(tmp_path), "vm1") and gate.holder(str(tmp_path), "vm1") == os.getpid()
        assert gate.remove_stale(str(tmp_path), "vm1") == []  # a live agent's socket is never removed
        out: dict = {}
        t = asker(tmp_path, "vm1", 10, out)
        assert srv.wait(["vm1"], 5) == "vm1"
    finally:
        srv.close()
    t.join(10)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(gate.socket_path(str(tmp_path), "vm1"))
    dead.close()
    assert gate.remove_stale(str(tmp_path), "vm1") == [f"removed the stale gate socket {tmp_path}/vm1.gate.sock"]
    assert gate.names(str(tmp_path)) == []


def test_a_question_on_another_disks_socket_is_refused(tmp_path: Path) -> None:
    import json
    import socket
    srv = gate.GateServer(str(tmp_path))
    srv.listen(["vm1"])
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(gate.socket_path(str(tmp_path), "vm1"))
        s.sendall(b'{"name": "vm2"}\n')
        assert json.loads(s.makefile().readline())["ok"] is False
        s.close()
        assert srv.wait(["vm1", "vm2"], 0.5) is None
    finally:
        srv.close()


def test_the_wait_ends_when_the_source_is_gone(tmp_path: Path) -> None:
    srv = gate.GateServer(str(tmp_path))
    srv.listen(["vm1"])
    try:
        t = time.monotonic()
        gone = [False]
        threading.Timer(0.3, lambda: gone.__setitem__(0, True)).start()
        assert srv.wait(["vm1"], 30, gone=lambda: gone[0]) is None
        assert time.monotonic() - t < 2
    finally:
        srv.close()


def test_the_agent_sees_its_source_go_without_reading_a_request(tmp_path: Path) -> None:
    from dmmig.adapters.runner import SubprocessRunner
    from dmmig.flows.destination import AgentServer
    r, w = os.pipe()
    srv = AgentServer(SubprocessRunner(), str(tmp_path))
    srv._inp = os.fdopen(r)
    try:
        os.write(w, b'{"op": "hello"}\n')
        assert not srv._source_gone()  # a request waiting is not the source going away
        os.close(w)
        assert srv._source_gone()
        assert srv._inp.readline() == '{"op": "hello"}\n'  # nothing was consumed
    finally:
        srv._inp.close()


def test_the_no_reaches_the_add_before_it_gives_up() -> None:
    """The source's window (work, resume) and its no must end inside the destination add's
    own wait, with time for the question to travel and for the source to pick it up."""
    from dmmig.entry import hotplug
    assert gate.SUSPEND_CAP_S + gate.NO_DELIVERY_S + 2 < hotplug.GATE_TIMEOUT_S
