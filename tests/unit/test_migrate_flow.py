"""Every failure branch of `dmmig migrate`'s steps 2-4 (migrate_domain.migrate), each with its
cause, its exit code and what was left: the destination's agent, xl and the per-disk steps
injected (the whole flow runs on real Xen in tests/xen/test_dmmig_migrate.py)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.ssh import SshOptions
from dmmig.adapters.xl import Domain, XlRun
from dmmig.core import journal
from dmmig.core.records import Destination, MirrorState, Synced
from dmmig.core.stack import Stack
from dmmig.entry import cli
from dmmig.errors import Busy, DmmigError, Exit, MissingDependency, RemoteError, StateError
from dmmig.flows import migrate_domain
from dmmig.flows.domain import Vbd
from tests.unit.fakes import FakeRunner

VM = Domain(7, "vm1")


class FakeXl:
    """xl: MIGRATE is what `xl migrate` returns (or raises); AFTER is the domain `xl` finds here
    once it ended (None: the guest no longer runs here)."""

    def __init__(self, migrate: XlRun | BaseException, after: Domain | None = VM,
                 until: Callable[[], bool] | None = None) -> None:
        self.result = migrate
        self.after = after
        self.until = until  # xl runs until the destination asked (a real xl takes seconds)
        self.ran = False

    def find(self, domain: str) -> Domain | None:
        return self.after

    def migrate(self, domid: int, host: str, extra: list[str], timeout: float, log: str) -> XlRun:
        self.ran = True
        if isinstance(self.result, BaseException):
            raise self.result
        deadline = time.monotonic() + 5
        while self.until is not None and not self.until() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.result


class GateAgent:
    """The destination's agent during xl migrate: the block script there asks about each of
    ASKS in turn. FAIL_FIRST: its first call (the gate set-up) raises that."""

    def __init__(self, asks: list[str], fail_first: BaseException | None = None) -> None:
        self.asks = list(asks)
        self.fail_first = fail_first
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append((op, kw))
        if self.fail_first is not None:
            e, self.fail_first = self.fail_first, None
            raise e
        if kw.get("timeout") == 0:
            return {"asked": None}
        return {"asked": self.asks.pop(0) if self.asks else None}


class Remote:
    def __init__(self, agent: GateAgent) -> None:
        self.agent = agent
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Flow:
    """A source host with disks d1 and d2 mirroring to root@b, and the record of what the
    injected steps were asked."""

    def __init__(self, tmp_path: Path, names: tuple[str, ...] = ("d1", "d2")) -> None:
        r = FakeRunner()
        self.stack = Stack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")))
        self.disks = []
        for i, n in enumerate(names):
            self.stack.journal.save(journal.Entry(n, f"/dev/loop{i}", f"7:{i}", dest=dest_of(n),
                                            mirror=MirrorState(synced=Synced(at=0.0, events=0, seconds=0.0))),
                                   journal.MIRRORING)
            v = Vbd(str(51712 + i), f"xvd{'ab'[i]}", f"/local/domain/0/backend/vbd/7/{51712 + i}",
                    "/etc/xen/scripts/block-dmmig", f"/srv/{n}", "w", "fd:4", "")
            self.disks.append(migrate_domain.Disk(v, n, f"/dev/loop{i}", 1 << 20, journal.MIRRORING, f"/srv/{n}",
                                                  True, []))
        self.plan = migrate_domain.Plan(VM, "root@b", self.disks, [])
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.said: list[str] = []
        self.agent = GateAgent(list(names))
        self.remotes: list[Remote] = []
        self.mirror_results: list[Any] = [{"copy": {"read": 0}, "cutover": {"suspended_seconds": 0.01,
                                                                             "resync_regions": 0}}] * len(names)
        self.finish_errors: dict[str, DmmigError] = {}

    def ops(self, **over: Any) -> migrate_domain.Ops:
        def remote(dest: Destination) -> Remote:
            self.remotes.append(Remote(self.agent))
            return self.remotes[-1]

        def to_mirror(*a: Any) -> list[Any]:
            return list(self.mirror_results)

        def answer_gate(stack: Stack, entry: journal.Entry, remote: Any) -> dict[str, Any]:
            return {"ok": True, "why": "in sync", "delivered": True}

        def finish(stack: Stack, d: migrate_domain.Disk, dest: Destination) -> dict[str, Any]:
            self.finished.append(d.name)
            if d.name in self.finish_errors:
                raise self.finish_errors[d.name]
            return {"done": [], "seconds": 0.0}

        def abort(stack: Stack, name: str) -> tuple[list[str], list[str]]:
            self.aborted.append(name)
            return ["abort"], []
        kw = dict(remote=remote, to_mirror=to_mirror, answer_gate=answer_gate, finish=finish, abort=abort)
        kw.update(over)
        return migrate_domain.Ops(**kw)

    def run(self, xl: FakeXl, **over: Any) -> dict[str, Any]:
        return migrate_domain.migrate(self.stack, xl, self.plan, SshOptions(), migrate_domain.MigrateOptions(),
                                      lambda d, i: None,  # type: ignore
                                      self.said.append, self.ops(**over))


OK = XlRun(0, "", 3.0)


def dest_of(name: str) -> Destination:
    return Destination(host="b", user="root", port=22, known_hosts="/dev/null", disk=f"/srv/{name}")


@pytest.fixture
def flow(tmp_path: Path) -> Flow:
    return Flow(tmp_path)


def test_success_finishes_every_disk(flow: Flow) -> None:
    s = flow.run(FakeXl(OK, until=lambda: not flow.agent.asks))
    assert flow.finished == ["d1", "d2"] and flow.aborted == []
    assert s["disks"]["d1"]["handover"]["ok"] and s["xl"]["returncode"] == 0
    assert all(r.closed for r in flow.remotes)


@pytest.mark.parametrize("exc", [Busy("another dmmig is working on 'd2'"), MissingDependency("no nbd-client"),
                                 RemoteError("destination: its disk is gone")])
def test_a_disk_that_cannot_reach_a_mirror_aborts_all_with_its_own_kind(flow: Flow, exc: DmmigError) -> None:
    flow.mirror_results = [flow.mirror_results[0], exc]
    xl = FakeXl(OK)
    with pytest.raises(type(exc)) as e:
        flow.run(xl)
    assert e.value.exit_code == exc.exit_code and e.value.__cause__ is exc
    assert e.value.message.startswith("d2: could not reach a synchronous mirror") and exc.message in e.value.message
    assert flow.aborted == ["d1", "d2"] and not xl.ran


def test_a_bug_in_a_disks_thread_is_raised_as_it_is(flow: Flow) -> None:
    bug = KeyError("copy")
    flow.mirror_results = [bug, bug]
    with pytest.raises(KeyError) as e:
        flow.run(FakeXl(OK))
    assert e.value is bug and flow.aborted == ["d1", "d2"]


def test_a_gate_that_cannot_listen_aborts_all_before_xl_runs(flow: Flow) -> None:
    """A second migration of the same disk waits on the destination already: refused, exit 7."""
    flow.agent.fail_first = Busy("destination: another source already waits for d1's gate")
    xl = FakeXl(OK)
    with pytest.raises(Busy, match="already waits"):
        flow.run(xl)
    assert flow.aborted == ["d1", "d2"] and not xl.ran and flow.remotes[0].closed


def test_no_ssh_to_the_destination_for_the_gate_aborts_all(flow: Flow) -> None:
    def remote(dest: dict[str, Any]) -> Remote:
        raise RemoteError("SSH to root@b failed: No route to host")
    with pytest.raises(RemoteError, match="No route"):
        flow.run(FakeXl(OK), remote=remote)
    assert flow.aborted == ["d1", "d2"]


def test_xl_missing_is_a_missing_dependency_and_the_disks_are_aborted(flow: Flow) -> None:
    """Before: xl's own error was dropped in its thread and the migration failed as a remote
    failure (exit 8: 'xl migrate failed (status -1)')."""
    missing = MissingDependency("command not found: xl")
    with pytest.raises(MissingDependency, match="command not found: xl") as e:
        flow.run(FakeXl(missing))
    assert e.value is missing and e.value.exit_code == Exit.MISSING_DEP
    assert flow.aborted == ["d1", "d2"] and flow.finished == []


def test_xl_still_running_at_the_timeout_leaves_every_disk(flow: Flow) -> None:
    with pytest.raises(StateError, match="still runs after") as e:
        flow.run(FakeXl(XlRun(None, "", 3600.0, 4242, "/x.log")))
    assert e.value.exit_code == Exit.STATE and flow.aborted == [] and flow.finished == []


def test_xl_failing_with_the_guest_here_aborts_every_disk(flow: Flow) -> None:
    with pytest.raises(RemoteError, match="resumed on this host") as e:
        flow.run(FakeXl(XlRun(1, "migration target: Domain creation failed", 2.0)))
    assert "Domain creation failed" in e.value.message and e.value.exit_code == Exit.REMOTE
    assert flow.aborted == ["d1", "d2"] and flow.finished == []


def test_xl_failing_with_the_guest_gone_leaves_every_disk_to_the_operator(flow: Flow) -> None:
    with pytest.raises(StateError, match="no longer runs here") as e:
        flow.run(FakeXl(XlRun(1, "xl: fatal", 2.0), after=None))
    assert e.value.exit_code == Exit.STATE and flow.aborted == [] and flow.finished == []
    assert e.value.hint and "xl list" in e.value.hint


def test_a_lost_gate_is_a_refusal_and_xl_decides(flow: Flow) -> None:
    """The agent's connection dies while xl runs: every disk not yet answered is refused."""
    class Dies(GateAgent):
        def call(self, op: str, **kw: Any) -> dict[str, Any]:
            self.calls.append((op, kw))
            if kw.get("timeout") == 0:
                return {"asked": None}
            raise RemoteError("the SSH connection to the destination broke during await_gate")
    flow.agent = Dies([])
    with pytest.raises(RemoteError, match="the handover gate refused d1: the gate was lost") as e:
        flow.run(FakeXl(XlRun(1, "Target reported an error", 2.0), until=lambda: len(flow.agent.calls) > 1))
    assert flow.aborted == ["d1", "d2"] and e.value.exit_code == Exit.REMOTE


def test_a_disk_whose_finish_fails_does_not_keep_the_others_from_finishing(flow: Flow) -> None:
    """Before: d1's failure on the destination ended the loop and d2 was never finished."""
    flow.finish_errors["d1"] = RemoteError("d1: finished here, but on the destination: stop failed")
    with pytest.raises(RemoteError) as e:
        flow.run(FakeXl(OK))
    assert flow.finished == ["d1", "d2"]
    assert e.value.message.startswith("vm1 runs on root@b now, but finishing d1 failed")
    assert e.value.__cause__ is flow.finish_errors["d1"]


def test_the_cli_exits_with_the_flows_code(flow: Flow, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The boundary: `dmmig migrate`'s failure, its message and hint, and its exit code."""
    def cmd(a: Any) -> int:
        flow.run(FakeXl(XlRun(1, "xl: fatal", 2.0), after=None))
        return 0
    monkeypatch.setattr(cli, "cmd_migrate", cmd)
    assert cli.main(["migrate", "vm1", "root@b"]) == Exit.STATE
    err = capsys.readouterr().err
    assert err.startswith("dmmig migrate: error: xl migrate failed (status 1): xl: fatal") and "what to do:" in err
