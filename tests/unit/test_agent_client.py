"""The source's end of the agent channel when SSH dies under it: paramiko raises EOFError (or
OSError) on the write; dmmig reports a remote failure (exit 8), never an internal error."""
from __future__ import annotations

import io
import json
from typing import Any

import pytest

from dmmig.agent import PROTOCOL, AgentClient
from dmmig.errors import Exit, RemoteError


class DeadAfterHello:
    """A channel whose transport dies after the agent's hello."""
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

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
