"""Errors that can be tested: each expected failure has its own kind and exit code (1 only for
bugs), the destination's kind survives the agent's JSON relay, and --debug shows where a
failure came from (its causes, each teardown step's, a bug's on the destination)."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmmig import errors
from dmmig.adapters import nbd
from dmmig.adapters.agentclient import AgentClient
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.xenstore import XenStoreError
from dmmig.core.confine import Policy
from dmmig.core.gate import GateRefused
from dmmig.core.window import WindowClosed
from dmmig.entry import cli
from dmmig.entry.hotplug import HotplugError, HotplugTimeout
from dmmig.errors import (
    BadInput,
    Busy,
    CommandError,
    DmmigError,
    Exit,
    LocalIOError,
    MissingDependency,
    RemoteError,
    StateError,
    TeardownError,
    TimedOut,
    ToolError,
    Undo,
)
from dmmig.flows.destination import AgentServer, Lines
from tests.unit.fakes import FakeRunner

KINDS: list[tuple[type[DmmigError], Exit]] = [
    (BadInput, Exit.BAD_INPUT), (MissingDependency, Exit.MISSING_DEP), (ToolError, Exit.COMMAND),
    (StateError, Exit.STATE), (Busy, Exit.BUSY), (RemoteError, Exit.REMOTE), (LocalIOError, Exit.IO),
    (TimedOut, Exit.TIMEOUT),
    # kinds defined next to their adapter: the code of the kind they are
    (HotplugError, Exit.BAD_INPUT), (HotplugTimeout, Exit.TIMEOUT), (WindowClosed, Exit.TIMEOUT),
    (XenStoreError, Exit.COMMAND), (GateRefused, Exit.REMOTE)]


def test_every_exit_code_is_in_the_documented_table() -> None:
    """errors.py's docstring is the table the README copies: every code, once."""
    doc = errors.__doc__ or ""
    table = {int(m.group(1)) for m in re.finditer(r"^    (\d+)\s", doc, re.M)}
    assert table == {int(c) for c in Exit}
    assert len({int(c) for c in Exit}) == len(Exit)  # one code per kind


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: BaseException,
            *flags: str) -> tuple[int, str]:
    def verb(a: Any) -> int:
        raise exc
    monkeypatch.setattr(cli, "cmd_status", verb)
    rc = cli.main([*flags, "status"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(("cls", "code"), KINDS)
def test_the_cli_exits_with_each_kinds_code(cls: type[DmmigError], code: Exit, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_cli(monkeypatch, capsys, cls("it broke", hint="do this"))
    assert rc == code != Exit.FAILED
    assert err == "dmmig status: error: it broke\n  what to do: do this\n"


def test_a_bug_exits_1_and_debug_shows_it(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_cli(monkeypatch, capsys, KeyError("x"))
    assert rc == Exit.FAILED and "internal error: KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        run_cli(monkeypatch, capsys, KeyError("x"), "--debug")


def test_debug_shows_the_original_exception_an_error_was_raised_from(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        try:
            raise OSError(5, "Input/output error", "/dev/xyz")
        except OSError as e:
            raise LocalIOError("reading /dev/xyz failed") from e
    except LocalIOError as e:
        caught = e
    rc, err = run_cli(monkeypatch, capsys, caught)
    assert rc == Exit.IO and "Traceback" not in err
    rc, err = run_cli(monkeypatch, capsys, caught, "--debug")
    assert rc == Exit.IO
    assert "OSError: [Errno 5] Input/output error: '/dev/xyz'" in err
    assert "The above exception was the direct cause" in err and "dmmig status: error: reading" in err


def test_debug_shows_every_teardown_steps_traceback(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    undo = Undo()

    def first() -> None:
        raise ValueError("the first step's bug")

    def second() -> None:
        raise Busy("the device is open")
    undo.push("one", first)
    undo.push("two", second)
    with pytest.raises(TeardownError) as e:
        undo.run("teardown")
    # a step's own kind is kept (the message says which step)
    assert [type(x) for x in e.value.errors] == [Busy, DmmigError]
    assert e.value.errors[0].message == "two: the device is open"
    rc, err = run_cli(monkeypatch, capsys, e.value, "--debug")
    assert rc == Exit.STATE and "--- step 2 of the teardown" in err
    assert "ValueError: the first step's bug" in err and "in first" in err


# ---- the agent's relay: the real server and client over a socket pair --------------------
class SocketChannel:
    """What paramiko's exec channel offers AgentClient, over one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def exec_command(self, cmd: str) -> None:
        pass

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class SshClient:
    def __init__(self, chan: SocketChannel) -> None:
        self.chan = chan

    def get_transport(self) -> Any:
        chan = self.chan

        class T:
            def open_session(self) -> SocketChannel:
                return chan
        return T()


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    """An AgentClient talking JSON lines to a real AgentServer (confined to tmp_path/disks,
    running its commands for real) in a thread."""
    with start_relay(tmp_path) as client:
        yield client


@contextlib.contextmanager
def start_relay(tmp_path: Path) -> Iterator[AgentClient]:
    (tmp_path / "disks").mkdir()
    (tmp_path / "state").mkdir(mode=0o700)
    server = AgentServer(SubprocessRunner(), str(tmp_path / "state"),
                         policy=Policy(file_roots=(str(tmp_path / "disks"),)))
    ours, theirs = socket.socketpair()
    out = theirs.makefile("w")
    th = threading.Thread(target=server.serve, args=(Lines(theirs.fileno()), out), daemon=True)
    th.start()
    try:
        yield AgentClient(SshClient(SocketChannel(ours)), "dmmig")
    finally:  # the server sees the end of its input, writes what it still has, returns; then close
        ours.shutdown(socket.SHUT_WR)
        th.join(5)
        out.close()
        theirs.close()
        ours.close()


def prepared(client: AgentClient, tmp_path: Path) -> None:
    disk = tmp_path / "disks" / "d1"
    disk.write_bytes(b"")
    os.truncate(disk, 1 << 20)
    client.call("prepare_disk", name="d1", path=str(disk), size=1 << 20)


def test_a_tool_missing_on_the_destination_is_a_missing_dependency_here(
        relay: AgentClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the agent's MissingDependency arrived as a RemoteError (exit 8)."""
    prepared(relay, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # the destination has no qemu-nbd
    with pytest.raises(MissingDependency, match="destination: command not found: qemu-nbd") as e:
        relay.call("export", name="d1")
    assert e.value.exit_code == Exit.MISSING_DEP and e.value.hint and "install" in e.value.hint


def test_a_failing_qemu_nbd_on_the_destination_is_a_command_error_with_its_stderr(
        relay: AgentClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: qemu-nbd's failure was a bare DmmigError there, exit 1 here (the code for bugs)."""
    prepared(relay, tmp_path)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "qemu-nbd").write_text("#!/bin/sh\necho 'qemu-nbd: Failed to blk_new_open: Permission denied' >&2\n"
                                   "exit 1\n")
    (bin_ / "qemu-nbd").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    with pytest.raises(CommandError, match="Failed to blk_new_open: Permission denied") as e:
        relay.call("export", name="d1")
    assert e.value.exit_code == Exit.COMMAND
    assert e.value.argv[0] == "qemu-nbd" and e.value.returncode == 1 and "Permission denied" in e.value.stderr
    assert e.value.hint and "could not export" in e.value.hint


@pytest.mark.parametrize(("cls", "code"), [(Busy, Exit.BUSY), (StateError, Exit.STATE), (TimedOut, Exit.TIMEOUT),
                                           (GateRefused, Exit.REMOTE), (BadInput, Exit.BAD_INPUT)])
def test_every_kind_survives_the_relay(cls: type[DmmigError], code: Exit, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(name: str) -> dict[str, Any]:
        raise cls(f"{name} failed there", hint="the hint there")
    monkeypatch.setattr(AgentServer, "op_stop", lambda self, name: stop(name))
    with start_relay(tmp_path) as client, pytest.raises(cls) as e:
        client.call("stop", name="d1")
    assert type(e.value) is cls and e.value.exit_code == code
    assert e.value.message == "destination: d1 failed there" and e.value.hint == "the hint there"


def test_a_bug_in_the_agent_is_a_bug_here_with_the_destinations_traceback(relay: AgentClient) -> None:
    with pytest.raises(DmmigError) as e:
        relay.call("stop", name="d1", bogus=1)  # a TypeError inside the agent's dispatch
    assert type(e.value) is DmmigError and e.value.exit_code == Exit.FAILED
    assert "internal error: TypeError" in e.value.message
    assert e.value.remote_trace and "Traceback" in e.value.remote_trace and "TypeError" in e.value.remote_trace


def test_an_unknown_kind_keeps_its_exit_code() -> None:
    """A newer dmmig on the destination may send a kind this one does not know."""
    e = DmmigError.from_reply({"error": "x", "kind": "SomethingNew", "exit_code": 7})
    assert isinstance(e, Busy) and e.exit_code == Exit.BUSY
    e = DmmigError.from_reply({"error": "x", "kind": "SomethingNew", "exit_code": 99})
    assert type(e) is RemoteError


def test_a_relayed_teardown_error_is_one() -> None:
    e = DmmigError.from_reply({"error": "stop: 1 step(s) failed", "kind": "TeardownError", "exit_code": 6})
    assert isinstance(e, TeardownError) and e.errors == [] and e.exit_code == Exit.STATE


# ---- the adapters' expected failures, each with its kind ---------------------------------
def test_qemu_nbd_failing_locally_is_a_command_error(tmp_path: Path) -> None:
    r = FakeRunner([(["qemu-nbd"], (1, "", "qemu-nbd: Failed to bind socket: Address in use by x\n"))])
    (tmp_path / "d").write_bytes(b"")
    with pytest.raises(CommandError) as e:
        nbd.start_export(r, "d1", str(tmp_path / "d"), str(tmp_path / "pid"), socket_path=str(tmp_path / "s"))
    assert e.value.exit_code == Exit.COMMAND and "Failed to bind" in e.value.message


def test_the_nbd_module_missing_is_a_missing_dependency(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dmmig.adapters import nbdkernel
    real_exists, real_listdir = os.path.exists, os.listdir
    monkeypatch.setattr(nbdkernel.os.path, "exists",
                        lambda p: False if p.startswith("/sys/block/nbd") else real_exists(p))
    monkeypatch.setattr(nbdkernel.os, "listdir",
                        lambda p: [] if p == "/sys/block" else real_listdir(p))
    k = nbdkernel.NbdKernel(FakeRunner())
    with pytest.raises(MissingDependency, match="the nbd module is missing") as e:
        k._choose()
    assert e.value.exit_code == Exit.MISSING_DEP


def test_a_udev_wait_that_runs_out_is_a_timeout() -> None:
    from dmmig.adapters.udev import wait_dm_node
    with pytest.raises(TimedOut, match="did not appear within") as e:
        wait_dm_node("dmmig-test-never-there", timeout=0.2)
    assert e.value.exit_code == Exit.TIMEOUT


def test_with_context_keeps_kind_fields_and_cause() -> None:
    e = CommandError(["dmsetup", "load"], 1, "", "device busy\n")
    out = e.with_context("d1")
    assert type(out) is CommandError and out.argv == ["dmsetup", "load"] and out.exit_code == Exit.COMMAND
    assert out.message.startswith("d1: `dmsetup load` exited with status 1") and str(out) == out.message
    assert e.message.startswith("`dmsetup")  # the original is unchanged


def test_a_request_the_agent_cannot_read_is_refused_not_a_bug(tmp_path: Path) -> None:
    """Before: an unknown op or a line that is no JSON object was an internal error there, so
    exit 1 (a bug) here; a source of another version sends them."""
    with start_relay(tmp_path) as client:
        _unreadable_requests(client)


def _unreadable_requests(client: AgentClient) -> None:
    with pytest.raises(BadInput, match="unknown agent request") as e:
        client.call("no_such_op")
    assert e.value.exit_code == Exit.BAD_INPUT
    client.chan.sendall(b"[1, 2]\n")  # the next reply is this line's
    with pytest.raises(BadInput, match="not an object"):
        client.call("hello")


def test_qemu_nbd_missing_for_a_tcp_export_is_a_missing_dependency(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The TCP export runs qemu-nbd through dmmig.adapters.listen (socket activation): its exec failing
    was a traceback there and a CommandError (5) here, not the missing tool it is (4)."""
    (tmp_path / "d").write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(MissingDependency, match="command not found: qemu-nbd") as e:
        nbd.start_export(SubprocessRunner(), "d1", str(tmp_path / "d"), str(tmp_path / "pid"), addr="127.0.0.1",
                         tls=None)
    assert e.value.exit_code == Exit.MISSING_DEP
