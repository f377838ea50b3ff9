"""The source's end of the agent channel when SSH dies under it: paramiko raises EOFError (or
OSError) on the write; dmmig reports a remote failure (exit 8), never an internal error."""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from typing import Any

import paramiko
import pytest

from dmmig.adapters import agentclient
from dmmig.adapters.agentclient import PROTOCOL, AgentClient, deadline_for
from dmmig.adapters.ssh import pump_to_channel
from dmmig.core.records import Destination
from dmmig.errors import Exit, RemoteError
from dmmig.flows import session


class DeadAfterHello:
    """A channel whose transport dies after the agent's hello."""
    def __init__(self, exc: BaseException, close_exc: BaseException | None = None) -> None:
        self.exc = exc
        self.close_exc = close_exc or exc
        self.out = (json.dumps({"agent": "dmmig", "protocol": PROTOCOL}) + "\n").encode()

    def close(self) -> None:
        raise self.close_exc  # paramiko sends a close message: the same dead transport

    def exec_command(self, cmd: str) -> None:
        pass

    def settimeout(self, t: float | None) -> None:
        pass

    def recv(self, n: int) -> bytes:
        data, self.out = self.out[:n], self.out[n:]
        return data

    def sendall(self, data: bytes) -> None:
        raise self.exc


class Client:
    def __init__(self, chan: DeadAfterHello) -> None:
        self.chan = chan
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def get_transport(self) -> Any:
        chan = self.chan

        class T:
            def open_session(self) -> DeadAfterHello:
                return chan
        return T()


@pytest.mark.parametrize("exc", [EOFError(), OSError("Socket is closed")])
def test_a_dead_ssh_transport_is_a_remote_error(exc: BaseException) -> None:
    agent = AgentClient(Client(DeadAfterHello(exc)), "dmmig")
    with pytest.raises(RemoteError, match="the SSH connection to the destination broke during stop") as e:
        agent.call("stop", name="d1")
    assert e.value.exit_code == Exit.REMOTE


DEST = Destination(host="b", user="root", port=22, known_hosts="/dev/null", remote_dmmig="dmmig", disk="/dev/vg/d1")


@pytest.mark.parametrize("close_exc", [EOFError(), OSError("Socket is closed"), paramiko.SSHException("x")])
def test_closing_over_a_dead_transport_does_not_replace_the_first_error(
        close_exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote.close runs in `finally` after the copy failed; CI once saw 'internal error:
    EOFError' from it instead of the copy's RemoteError."""
    client = Client(DeadAfterHello(EOFError(), close_exc))
    monkeypatch.setattr(session, "connect", lambda ep: client)
    remote = session.Remote(DEST)
    with pytest.raises(RemoteError, match="broke during export"):
        try:
            remote.agent.call("export", name="d1")
        finally:
            remote.close()
    assert client.closed


@pytest.mark.parametrize("exc", [EOFError(), paramiko.SSHException("SSH session not active")])
def test_a_transport_dying_as_the_agent_starts_is_a_remote_error(
        exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(DeadAfterHello(exc))

    def dead() -> None:
        raise exc
    client.chan.exec_command = lambda cmd: dead()  # type: ignore[method-assign]
    monkeypatch.setattr(session, "connect", lambda ep: client)
    with pytest.raises(RemoteError, match="broke starting the agent") as e:
        session.Remote(DEST)
    assert e.value.exit_code == Exit.REMOTE and client.closed


def test_the_tunnel_pump_ends_quietly_when_the_transport_dies() -> None:
    """The pump thread's own close raised EOFError: 'Exception in thread' on stderr."""
    class Chan:
        def send(self, data: bytes) -> int:
            raise EOFError()

        def close(self) -> None:
            raise EOFError()
    ours, theirs = socket.socketpair()
    seen: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda a: seen.append(a.exc_value)  # type: ignore[arg-type]
    try:
        ours.sendall(b"request")
        t = threading.Thread(target=pump_to_channel, args=(theirs, Chan()))
        t.start()
        t.join(5)
    finally:
        threading.excepthook = old
        ours.close()
        theirs.close()
    assert not t.is_alive() and seen == []


def test_the_copiers_pump_sends_every_byte_in_order_a_packet_at_a_time() -> None:
    """paramiko's send takes one packet's worth or less (the window) and returns how much; 0 once
    the channel is closing. The pump must resend the rest of each read, in order, and stop (and
    close) at 0 instead of spinning."""
    class Chan:
        def __init__(self) -> None:
            self.got = bytearray()
            self.closed = False

        def send(self, data: bytes | memoryview) -> int:
            # takes the payload, then nothing: closing
            n = min(len(data), random.choice([1, 4096, 32 << 10, 32 << 10]), len(payload) - len(self.got))
            self.got += data[:n]
            return n

        def close(self) -> None:
            self.closed = True
    payload = os.urandom(3 << 20)
    ours, theirs = socket.socketpair()
    chan = Chan()
    t = threading.Thread(target=pump_to_channel, args=(theirs, chan))
    t.start()
    ours.sendall(payload + bytes(64 << 10))  # more than the channel takes
    t.join(10)
    ours.close()
    theirs.close()
    assert not t.is_alive() and chan.closed
    assert bytes(chan.got) == payload


class SocketChannel:
    """A channel that is a real socket (paramiko's Channel has the same recv/sendall/settimeout):
    the test holds the agent's end and decides whether, and when, it answers."""

    def __init__(self) -> None:
        self.ours, self.agent = socket.socketpair()
        self.agent.sendall((json.dumps({"agent": "dmmig", "protocol": PROTOCOL}) + "\n").encode())

    def exec_command(self, cmd: str) -> None:
        pass

    def settimeout(self, t: float | None) -> None:
        self.ours.settimeout(t)

    def recv(self, n: int) -> bytes:
        return self.ours.recv(n)

    def sendall(self, data: bytes) -> None:
        self.ours.sendall(data)

    def close(self) -> None:
        self.ours.close()


def test_a_black_holed_agent_is_a_remote_error_within_the_deadline() -> None:
    """Before: the call waited for a reply as long as TCP kept the connection (~15 min)."""
    chan = SocketChannel()
    agent = AgentClient(Client(chan), "dmmig")  # type: ignore[arg-type]
    t = time.monotonic()
    with pytest.raises(RemoteError, match="no reply from the destination's agent to export within") as e:
        agent.call("export", name="d1", deadline_s=0.5)
    assert 0.4 < time.monotonic() - t < 2 and e.value.exit_code == Exit.REMOTE
    # the reply that comes late can no longer be taken for the next call's: the channel is closed
    with pytest.raises(OSError):
        chan.agent.sendall(b'{"ok": true, "export": "late"}\n')
    with pytest.raises(RemoteError, match="unusable"):
        agent.call("stop", name="d1")


def test_every_call_has_a_deadline_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert deadline_for("await_gate", {"timeout": 300}) == 330
    assert deadline_for("digest", {"length": 256 << 20}) == 60 + 256
    assert deadline_for("answer_gate", {}) == 30 and deadline_for("something_new", {}) == 120
    chan = SocketChannel()
    agent = AgentClient(Client(chan), "dmmig")  # type: ignore[arg-type]
    monkeypatch.setitem(agentclient._DEADLINES_S, "stop", 0.3)
    with pytest.raises(RemoteError, match="to stop within"):
        agent.call("stop", name="d1")


def test_a_reply_split_across_packets_is_read_whole() -> None:
    chan = SocketChannel()
    agent = AgentClient(Client(chan), "dmmig")  # type: ignore[arg-type]

    def answer() -> None:
        chan.agent.recv(100)
        chan.agent.sendall(b'{"ok": true, ')
        time.sleep(0.2)
        chan.agent.sendall(b'"known": false}\n{"ok": true, "known": true}\n')
    th = threading.Thread(target=answer)
    th.start()
    assert agent.call("stop", name="d1", deadline_s=5) == {"known": False}
    th.join()
    assert agent.call("stop", name="d1", deadline_s=5) == {"known": True}
