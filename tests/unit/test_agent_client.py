"""The source's end of the agent channel when SSH dies under it: paramiko raises EOFError (or
OSError) on the write; dmmig reports a remote failure (exit 8), never an internal error."""
from __future__ import annotations

import io
import json
import socket
import threading
from typing import Any

import paramiko
import pytest

from dmmig import migrate
from dmmig.agent import PROTOCOL, AgentClient
from dmmig.errors import Exit, RemoteError
from dmmig.ssh import _pump


class DeadAfterHello:
    """A channel whose transport dies after the agent's hello."""
    def __init__(self, exc: BaseException, close_exc: BaseException | None = None) -> None:
        self.exc = exc
        self.close_exc = close_exc or exc

    def close(self) -> None:
        raise self.close_exc  # paramiko sends a close message: the same dead transport

    def exec_command(self, cmd: str) -> None:
        pass

    def makefile(self, mode: str) -> Any:
        if mode == "r":
            return io.StringIO(json.dumps({"agent": "dmmig", "protocol": PROTOCOL}) + "\n")
        exc = self.exc

        class W:
            def write(self, s: str) -> None:
                pass

            def flush(self) -> None:
                raise exc
        return W()


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
    with pytest.raises(RemoteError, match="the SSH connection to the destination broke during status") as e:
        agent.call("status", name="d1")
    assert e.value.exit_code == Exit.REMOTE


DEST = {"host": "b", "user": "root", "port": 22, "known_hosts": "/dev/null", "remote_dmmig": "dmmig"}


@pytest.mark.parametrize("close_exc", [EOFError(), OSError("Socket is closed"), paramiko.SSHException("x")])
def test_closing_over_a_dead_transport_does_not_replace_the_first_error(
        close_exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote.close runs in `finally` after the copy failed; CI once saw 'internal error:
    EOFError' from it instead of the copy's RemoteError."""
    client = Client(DeadAfterHello(EOFError(), close_exc))
    monkeypatch.setattr(migrate, "connect", lambda ep: client)
    remote = migrate.Remote(DEST)
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
    monkeypatch.setattr(migrate, "connect", lambda ep: client)
    with pytest.raises(RemoteError, match="broke starting the agent") as e:
        migrate.Remote(DEST)
    assert e.value.exit_code == Exit.REMOTE and client.closed


def test_the_tunnel_pump_ends_quietly_when_the_transport_dies() -> None:
    """The pump thread's own close raised EOFError: 'Exception in thread' on stderr."""
    class Chan:
        def sendall(self, data: bytes) -> None:
            raise EOFError()

        def close(self) -> None:
            raise EOFError()
    ours, theirs = socket.socketpair()
    seen: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda a: seen.append(a.exc_value)  # type: ignore[arg-type]
    try:
        ours.sendall(b"request")
        t = threading.Thread(target=_pump, args=(theirs, Chan()))
        t.start()
        t.join(5)
    finally:
        threading.excepthook = old
        ours.close()
        theirs.close()
    assert not t.is_alive() and seen == []
