"""Issue 14 part 4 without a kernel: what `dmmig copy` no longer does twice (the tunnel probe of a
journaled destination, the agent's probe call), what it starts early (the suspend guard, the
SSH connection while the local checks run), and the --json summary's time breakdown."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from typing import Any

import pytest

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.dm.guard import SuspendGuard
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.ssh import SshOptions
from dmmig.core.records import Destination
from dmmig.flows import copying, session
from dmmig.flows.destination import AgentServer
from dmmig.progress import Stopwatch, since_exec
from tests.unit.fakes import FakeRunner

EP = SshOptions(known_hosts="/run/ssh/known_hosts", identity="/run/ssh/id")


def new_dest(tunnel: str | None = None) -> Destination:
    """What `dmmig copy NAME root@b ...` builds from its command line."""
    return session.destination("root@b", EP, session.CopyOptions(remote_dmmig="/usr/bin/dmmig", tunnel=tunnel),
                               "/dev/loop0")


def journaled(**over: Any) -> Destination:
    return dataclasses.replace(new_dest(), tunnel="relay", tunnel_probe="streamlocal forwarding refused: ...", **over)


def test_a_rerun_to_the_same_destination_reuses_the_journaled_tunnel_probe() -> None:
    """`dmmig copy NAME HOST` again (a resumed copy, a catch-up) asked OpenSSH again each time:
    1.2-1.7 s in the rig. The journaled answer stands while nothing it depends on changed."""
    d = new_dest()
    session.keep_probe(journaled(), d)
    assert d.tunnel == "relay" and d.tunnel_probe and d.tunnel_probe.startswith("streamlocal forwarding refused")


@pytest.mark.parametrize("change", [
    {"identity": "/run/ssh/other"}, {"known_hosts": "/etc/ssh/kh"}, {"port": 2222}, {"user": "admin"},
    {"remote_dmmig": "/opt/dmmig"}, {"remote_state_dir": "/srv/dmmig"},
])
def test_the_tunnel_is_probed_again_when_what_openssh_logs_in_or_runs_with_changed(change: dict[str, Any]) -> None:
    d = new_dest()
    session.keep_probe(journaled(**change), d)
    assert d.tunnel is None, (change, d)


def test_an_earlier_explicit_tunnel_is_no_probe_result() -> None:
    old = journaled()
    old.tunnel_probe = None  # --tunnel relay, not probed
    d = new_dest()
    session.keep_probe(old, d)
    assert d.tunnel is None
    d = new_dest(tunnel="forward")  # and --tunnel now wins over the journal
    session.keep_probe(journaled(), d)
    assert d.tunnel == "forward"


def test_the_agents_hello_says_which_tools_it_lacks(tmp_path: Any) -> None:
    """copy's check of the destination's tools needs no probe call (and no scan of its disk)."""
    agent = AgentServer(SubprocessRunner(), str(tmp_path), xenstore=lambda: contextlib.nullcontext(None))
    assert set(agent.op_hello()["tools"]) == {"qemu-nbd"}


def test_the_suspend_guard_starts_before_the_first_suspend_and_only_once() -> None:
    r = FakeRunner()
    spawned: list[list[str]] = []

    def spawn_piped(argv: list[str], *, logfile: str) -> tuple[int, int]:
        spawned.append(argv)
        return 4242, os.open(os.devnull, os.O_WRONLY)  # the guard's pipe: what it hears is not checked here
    r.spawn_piped = spawn_piped  # type: ignore[attr-defined]
    guard = SuspendGuard(r, "/run/dmmig")  # type: ignore[arg-type]
    dm = DmSetup(r, guard=guard)  # type: ignore[arg-type]
    dm.arm_guard()
    assert len(spawned) == 1 and spawned[0][-2:] == ["dmmig.adapters.dm.guard", "/run/dmmig"]
    r.rules.append((["dmsetup"], (0, "", "")))
    dm.suspend("dmmig-d1")
    dm.resume("dmmig-d1")
    assert len(spawned) == 1  # the same companion hears of the suspend


def test_started_returns_or_raises_what_its_thread_did() -> None:
    assert session.Started(lambda: 7).result() == 7

    def boom() -> int:
        raise session.RemoteError("unreachable")
    with pytest.raises(session.RemoteError, match="unreachable"):
        session.Started(boom).result()


@pytest.mark.parametrize("late", [False, True])
def test_an_abandoned_start_is_cleaned_up_exactly_once(late: bool) -> None:
    """A local check failed while the SSH connection was coming up: whenever the connection
    comes, it is closed (once), and nothing waits for it."""
    go = threading.Event()
    closed: list[int] = []

    def connect() -> int:
        go.wait(5)
        return 1
    s = session.Started(connect)
    if not late:
        go.set()
        s.wait()
    t0 = time.monotonic()
    s.abandon(closed.append)
    assert time.monotonic() - t0 < 1
    go.set()
    s.wait()
    assert closed == [1]


def test_phases_add_up_and_since_exec_is_this_process_age() -> None:
    t = Stopwatch()
    with t("a"):
        time.sleep(0.01)
    t.add("a", 1.0)
    t.add("b", 0.5)
    assert list(t.rounded()) == ["a", "b"] and 1.01 <= t.rounded()["a"] < 1.5
    age = since_exec()
    assert age is not None and 0 <= age < 3600


def prepared_stack(tmp_path: Any) -> Any:
    from dmmig.core import journal
    from dmmig.core.stack import Stack
    j = journal.Journal(str(tmp_path))
    j.save(journal.Entry(name="d1", origin="/dev/loop0", origin_devno="7:0", phase=journal.PREPARED, block_sectors=128,
                   metadata="/dev/loop1"))
    r = FakeRunner([(["dmsetup", "info"], (0, "dmmig-d1-era;253;1;L--w;1;1;0;\n", ""))])
    return Stack(r, DmSetup(r), j)  # type: ignore[arg-type]


def test_a_local_check_failing_while_the_connection_comes_up_is_reported_at_once_and_the_connection_closed(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig.errors import MissingDependency
    from dmmig.progress import Progress
    closed = threading.Event()

    class SlowRemote:  # the destination's agent takes its time to start
        def __init__(self, dest: Destination, phases: Stopwatch | None = None) -> None:
            time.sleep(0.5)

        def close(self) -> None:
            closed.set()

    def refuse(stack: Any, transport: str, disks: list[str]) -> None:
        raise MissingDependency("command not found: era_invalidate")
    monkeypatch.setattr(copying, "Remote", SlowRemote)  # where copy() looks them up
    monkeypatch.setattr(copying, "check_source", refuse)
    t0 = time.monotonic()
    with pytest.raises(MissingDependency, match="era_invalidate"):
        copying.copy(prepared_stack(tmp_path), "d1", "root@b", EP, session.CopyOptions(dest_disk="/dev/loop0"),
                     Progress())
    assert time.monotonic() - t0 < 0.4  # not after the connection came
    assert closed.wait(5)  # and when it came, it was closed


def test_copy_refuses_before_the_copy_what_its_cutover_would_lack(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dmmig copy` checked only tools and dm targets: with every nbd device taken (or
    /run/dmmig not root-only) the copy ran to the end and its cutover refused; `migrate`'s plan
    checked both. Now copy runs the same local checks as the plan, before it connects."""
    from dmmig.adapters.nbdkernel import NbdKernel
    from dmmig.errors import Busy
    from dmmig.progress import Progress
    from tests.unit.fakes import fake_nbd_devices

    connected: list[Destination] = []

    class Remote:
        def __init__(self, dest: Destination, phases: Stopwatch | None = None) -> None:
            connected.append(dest)

        def close(self) -> None:
            pass
    monkeypatch.setattr(copying, "Remote", Remote)
    monkeypatch.setattr(session, "require_tools", lambda *tools: None)
    stack = prepared_stack(tmp_path)
    stack.dm.require_targets = lambda *targets: None
    stack.mirror.nbd = NbdKernel(stack.runner, sys_block=fake_nbd_devices(tmp_path, 2, attached={0: 2048, 1: 8}))
    with pytest.raises(Busy, match="1 free nbd device here for its mirror leg, 0 are free"):
        copying.copy(stack, "d1", "root@b", EP, session.CopyOptions(dest_disk="/dev/loop0"), Progress())


def imported_by(code: str) -> set[str]:
    import subprocess
    import sys
    show = "import sys; print(' '.join(k for k, v in sys.modules.items() if v is not None))"
    out = subprocess.run([sys.executable, "-c", f"{code}; {show}"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@functools.cache
def agent_start() -> frozenset[str]:
    """What an agent's start imports (the CLI, the agent, its confinement): one interpreter for
    every test that asks."""
    return frozenset(imported_by("import dmmig.entry.cli, dmmig.entry.agent, dmmig.core.confine"))


def test_the_agent_imports_no_disk_stack() -> None:
    """Every agent start on the destination (its session, a probe, the tunnel's hold or relay)
    paid for the disk stack's imports through the CLI: 0.15 s of Python in the rig, each."""
    mods = agent_start()
    assert not {"dmmig.core.stack", "dmmig.adapters.era", "dmmig.core.mirror", "dmmig.adapters.tunnel",
                "dmmig.adapters.dm.dmsetup", "paramiko"} & mods


def test_the_agent_loads_no_library_that_only_one_of_its_calls_uses() -> None:
    """pyxs (a Xen host's handover), hashlib with OpenSSL (verify's digests) and datetime (the
    TLS certificates) cost 0.12 s of each agent start in the rig, for calls most sessions never
    make: they load where they are used."""
    mods = agent_start()
    assert not {"pyxs", "_hashlib", "datetime"} & mods


def test_a_tunnels_hold_and_the_plans_probe_start_without_the_destinations_flow() -> None:
    """`dmmig agent hold NAME` (each cutover's tunnel) and `dmmig agent probe TOKEN` (a first
    copy's plan) only wait on their session: the JSON agent's flow was 0.14 s of their start."""
    mods = agent_start()
    assert "dmmig.flows.destination" not in mods


def test_paramiko_runs_without_invoke() -> None:
    """dmmig never has paramiko read an ssh_config (`Match exec` is what it imports invoke for)."""
    mods = imported_by("import dmmig.flows.session; import paramiko; paramiko.SSHClient()")
    assert "paramiko" in mods and "invoke" not in mods


@pytest.mark.parametrize("phase", ["copied", "cutting-over"])
def test_after_a_copy_the_cutover_reads_only_the_live_table_to_know_there_is_no_mirror(
        tmp_path: Any, phase: str) -> None:
    # COPIED with nothing of a mirror journaled: no cutover has begun since the copy, so one
    # `dmsetup table` (it must not show a mirror) replaces info + table on the critical path.
    # A cutover that began (CUTTING_OVER) may have left a suspended top or an inactive table:
    # info is read as before
    from dmmig.core import journal
    from dmmig.core.stack import Stack
    from dmmig.flows.cutover import drop_mirror
    j = journal.Journal(str(tmp_path))
    e = journal.Entry(name="d1", origin="/dev/loop0", origin_devno="7:0", block_sectors=128, metadata="/dev/loop1")
    j.save(e, {"copied": journal.COPIED, "cutting-over": journal.CUTTING_OVER}[phase])
    r = FakeRunner([(["dmsetup", "table"], (0, "0 2048 linear 253:1 0\n", "")),
                    (["dmsetup", "info"], (0, "dmmig-d1;253;2;L--w;1;1;0;DMMIG-top-d1\n", ""))])
    stack = Stack(r, DmSetup(r), j)  # type: ignore[arg-type]
    assert drop_mirror(stack, e) == 2048
    assert [a[1] for a in r.argvs] == (["table"] if phase == "copied" else ["info", "table"])
