"""The unit tests' shared fakes, in one place: the runner, XenStore, and the destination's
agent and SSH connection. Each has the interface of the adapter it stands for (runner.Runner,
xenstore.XenStore, agent.AgentClient, migrate.Remote) and records what it was asked."""
from __future__ import annotations

from typing import Any

from dmmig.agent import AgentServer
from dmmig.errors import CommandError
from dmmig.runner import Result
from dmmig.xenstore import XenStoreError

NOT_THERE = (1, "", "Device does not exist.\nCommand failed.\n")  # dmsetup info of no device
INFO = ["dmsetup", "info", "-c", "--noheadings", "--separator", ";", "-o",
        "name,major,minor,attr,open,segments,events,uuid"]


class FakeRunner:
    """Records every call. Answers with the first matching rule (an argv prefix -> a reply or a
    list of replies used in turn), else rc 0 and no output. Honours check= like the real one."""

    def __init__(self, rules: list[tuple[list[str], Any]] | None = None) -> None:
        self.rules = rules or []
        self.calls: list[dict[str, Any]] = []

    def run(self, argv: list[str], check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:
        self.calls.append({"argv": list(argv), "check": check, "timeout": timeout, "input": input})
        rc, out, err = 0, "", ""
        for prefix, reply in self.rules:
            if argv[:len(prefix)] == prefix:
                if isinstance(reply, list):
                    rc, out, err = reply.pop(0) if len(reply) > 1 else reply[0]
                elif callable(reply):
                    rc, out, err = reply(argv)
                else:
                    rc, out, err = reply
                break
        res = Result(list(argv), rc, out, err)
        if check and rc != 0:
            raise CommandError(list(argv), rc, out, err)
        return res

    @property
    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls]


class MemXenStore:
    """The XenStore adapter's interface over a dict; records writes; can refuse some keys."""

    def __init__(self, data: dict[str, str] | None = None, refuse: tuple[str, ...] = ()) -> None:
        self.data = dict(data or {})
        self.refuse = refuse
        self.writes: list[tuple[str, str]] = []

    def read(self, path: str) -> str | None:
        return self.data.get(path)

    def list(self, path: str) -> list[str]:
        pre = path.rstrip("/") + "/"
        return sorted({k[len(pre):].split("/")[0] for k in self.data if k.startswith(pre)})

    def write(self, path: str, value: str) -> None:
        if path.rsplit("/", 1)[-1] in self.refuse:
            raise XenStoreError(f"xenstore write {path}: (13, 'Permission denied')")
        self.writes.append((path, value))
        self.data[path] = value


class FakeAgent:
    """The destination: the real agent's operations, in this process."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.calls: list[str] = []

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append(op)
        return dict(getattr(self.server, f"op_{op}")(**kw))


class FakeRemote:
    """The SSH connection. Its tunnel probe (OpenSSH against the destination's agent; run for
    real in tests/kernel/test_transport.py) answers TUNNEL."""

    def __init__(self, agent: FakeAgent, tunnel: tuple[str, str] = ("relay", "streamlocal forwarding refused")) -> None:
        self.agent = agent
        self.tunnel = tunnel
        self.closed = False

    def probe_tunnel(self, runner: Any, local_dir: str) -> tuple[str, str]:
        self.agent.calls.append("probe_tunnel")
        return self.tunnel

    def close(self) -> None:
        self.closed = True
