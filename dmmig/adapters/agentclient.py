"""The source's client of the destination agent (`dmmig agent`, dmmig/entry/agent.py): JSON
lines over a paramiko exec channel, every call with a deadline.

Protocol version 2. The first line the agent writes is a hello:
    {"agent": "dmmig", "protocol": 2, "version": "...", "host": "...", "state_dir": ..., "export_dir": ...,
     "tools": {"qemu-nbd": true}}
then one reply per request:  request {"op": OP, ...}  ->  {"ok": true, ...} | {"ok": false,
"error": MSG, "hint": HINT, "kind": CLASS, "exit_code": N, "fields": {...}}: the destination's
error (errors.DmmigError.to_reply), re-raised here as the same kind (from_reply), so the source
exits with the code the failure has there.
"""
from __future__ import annotations

import json
import time
from typing import Any

from dmmig.adapters.agentcmd import agent_command, remote_command
from dmmig.errors import DmmigError, RemoteError

PROTOCOL = 2
# an agent that records and checks generations (warm copies) says {"warm": WARM_PROTOCOL} in its
# hello: stop(warm=...) and prepare_disk(warm=...) go only to one that does
WARM_PROTOCOL = 1

# Every agent call has a deadline: a link that black-holes (no RST, no FIN) would otherwise
# hold the caller until TCP gives up (~15 min). The transport's keepalive (ssh.connect) keeps
# idle NAT state alive; the deadline is what turns a dead peer into a RemoteError.
START_DEADLINE_S = 30.0


DEFAULT_DEADLINE_S = 120.0


_DEADLINES_S = {"hello": 30.0, "probe": 60.0, "export": 60.0, "stop": 60.0, "relay": 30.0,
                "answer_gate": 30.0, "prepare_disk": 600.0}  # lvcreate alone may take 120 s


def deadline_for(op: str, kw: dict[str, Any]) -> float:
    """The default deadline of OP, in seconds."""
    if op == "await_gate":
        return float(kw.get("timeout", 0)) + 30
    if op == "digest":  # reads LENGTH bytes there: at 1 MiB/s, slow storage included
        return 60 + int(kw.get("length", 0)) / (1 << 20)
    return _DEADLINES_S.get(op, DEFAULT_DEADLINE_S)


class AgentClient:
    """The source's side of the agent protocol, over a paramiko exec channel."""

    def __init__(self, client: Any, remote_dmmig: str, state_dir: str | None = None) -> None:
        argv = agent_command(remote_dmmig, state_dir)
        self._buf = b""
        self._broken: str | None = None
        self.chan = client.get_transport().open_session()
        self.chan.exec_command(remote_command(argv))
        try:
            first = self._readline(time.monotonic() + START_DEADLINE_S, "start")
        except RemoteError as e:
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: {self._stderr() or e.message}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from e
        try:
            hello = json.loads(first)
        except ValueError:
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: "
                              f"{self._stderr() or first!r}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from None
        if hello.get("agent") != "dmmig" or hello.get("protocol") != PROTOCOL:
            raise RemoteError(f"the destination's dmmig speaks protocol {hello.get('protocol')}, "
                              f"we speak {PROTOCOL}", hint="install the same dmmig version on both hosts")
        self.hello = hello

    def call(self, op: str, *, deadline_s: float | None = None, **kw: Any) -> dict[str, Any]:
        """OP's reply; RemoteError if none came within DEADLINE_S (default: deadline_for)."""
        if self._broken:
            raise RemoteError(f"the agent channel to the destination is unusable ({self._broken}); "
                              f"{op} was not sent")
        limit = deadline_for(op, kw) if deadline_s is None else deadline_s
        end = time.monotonic() + limit
        try:
            self.chan.settimeout(max(limit, 0.001))
            self.chan.sendall((json.dumps({"op": op, **kw}) + "\n").encode())
        except TimeoutError:
            self._fail(f"no room to send {op} within {limit:.0f}s")
            raise RemoteError(f"the destination took no request for {limit:.0f}s ({op}): "
                              "a dead or black-holed link?") from None
        except (OSError, EOFError) as e:  # paramiko raises EOFError writing to a dead transport
            self._fail(f"{op}: {type(e).__name__}")
            raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                              f"{type(e).__name__} {e}".rstrip()) from e
        line = self._readline(end, op)
        rep = dict(json.loads(line))
        if not rep.pop("ok"):
            raise DmmigError.from_reply(rep, "destination: ")
        return rep

    def _readline(self, end: float, op: str) -> str:
        """One reply line by END (monotonic). A reply that comes late can no longer be told
        from the next one's: after a timeout the channel is closed and the client unusable."""
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.chan.settimeout(left)
                data = self.chan.recv(1 << 16)
            except TimeoutError:
                self._fail(f"no reply to {op} in time")
                raise RemoteError(f"no reply from the destination's agent to {op} within the deadline: "
                                  "a dead or black-holed link? (the agent channel is closed)") from None
            except (OSError, EOFError) as e:
                self._fail(f"{op}: {type(e).__name__}")
                raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                                  f"{type(e).__name__} {e}".rstrip()) from e
            if not data:  # the agent's end closed: what it said on stderr is still readable
                self._broken = f"the agent went away during {op}"
                raise RemoteError(f"the destination agent went away during {op}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def detach(self) -> tuple[Any, bytes]:
        """The channel, for what the session became after the last call (op_relay: NBD), and
        the bytes already read past that call's reply. The client can make no call after it."""
        self._broken = "the agent's session carries NBD now"
        rest, self._buf = self._buf, b""
        self.chan.settimeout(None)  # an idle NBD connection is no dead agent
        return self.chan, rest

    def _fail(self, why: str) -> None:
        self._broken = why
        try:
            self.chan.close()
        except (OSError, EOFError):
            pass
        except Exception:  # noqa: BLE001 - paramiko's SSHException on a dead transport; the first error stands
            pass

    def _stderr(self) -> str:
        try:
            self.chan.settimeout(5)
            err = self.chan.makefile_stderr("r").read(4000)
        except Exception:  # noqa: BLE001 - only for the message; the failure is reported anyway
            return ""
        return (err.decode(errors="replace") if isinstance(err, bytes) else str(err)).strip()

    def close(self) -> None:
        self.chan.close()
