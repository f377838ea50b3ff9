"""The destination's side of a migration after its source is gone: `dmmig status` shows the
incoming disk (the agent's record and its qemu-nbd export), `dmmig abort NAME` there stops the
export and removes a disk dmmig created, but never a disk that was handed over. The agent is
the real one and so is its qemu-nbd (on a unix socket in the state dir); no root, no kernel."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from dmmig.adapters import nbd
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core import journal
from dmmig.core.confine import Policy
from dmmig.core.stack import Stack
from dmmig.errors import BadInput
from dmmig.flows import finish
from dmmig.flows.destination import AgentServer
from dmmig.flows.status import disk_status, names, render
from dmmig.validate import disk_name
from tests.unit.fakes import NOT_THERE, FakeRunner

MIB = 1 << 20


def dest_host(tmp_path: Path) -> tuple[Stack, AgentServer, str]:
    """A destination host: no dm devices of dmmig, one state dir shared by CLI and agent."""
    state = str(tmp_path / "state")
    runner = FakeRunner([(["dmsetup", "info"], NOT_THERE)])
    agent = AgentServer(SubprocessRunner(), state, policy=Policy(file_roots=(str(tmp_path),)),
                        xenstore=lambda: contextlib.nullcontext(None))
    return Stack(runner, DmSetup(runner), journal.Journal(state)), agent, state


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd (qemu-utils)")
def test_status_shows_an_incoming_disk_and_abort_there_stops_and_removes_it(tmp_path: Path) -> None:
    stack, agent, state = dest_host(tmp_path)
    path = str(tmp_path / "vm1.img")
    agent.op_prepare_disk("d1", path, 4 * MIB, create=True)
    exp = nbd.Export(**agent.op_export("d1")["export"])
    try:
        assert exp.alive()
        assert names(stack) == ["d1"]
        st = disk_status(stack, "d1")
        assert st["journal"] is None and st["incoming"]["export_alive"] and st["incoming"]["created"]
        assert any("`dmmig abort d1` here stops the export and removes" in p for p in st["problems"]), st
        text = render(st)
        assert f"incoming: onto {path} (created by dmmig), not handed over" in text, text
        assert f"qemu-nbd pid {exp.pid} (running)" in text, text

        done, left = finish.abort(stack, "d1")
        assert left == []
        assert f"stopped qemu-nbd {exp.pid} exporting {path}" in done
        assert f"removed {path} (created by dmmig)" in done
        assert not exp.alive() and not os.path.exists(path)
        # nothing left but the (empty, root-only) directory of the exports' sockets and keys
        assert names(stack) == [] and [f for f in os.listdir(state) if not f.endswith(".lock")] == ["nbd"]
        assert os.listdir(os.path.join(state, "nbd")) == []
    finally:
        nbd.stop_export(exp)


def test_abort_keeps_a_disk_that_was_handed_over(tmp_path: Path) -> None:
    stack, agent, state = dest_host(tmp_path)
    path = str(tmp_path / "vm1.img")
    agent.op_prepare_disk("d1", path, 4 * MIB, create=True)
    rec_path = os.path.join(state, "d1.dest.json")
    rec = json.load(open(rec_path))
    json.dump(dict(rec, handed_over=True), open(rec_path, "w"))
    assert not any("dmmig abort" in p for p in disk_status(stack, "d1")["problems"])
    done, _ = finish.abort(stack, "d1")
    assert os.path.exists(path)
    assert done == [f"forgot incoming d1 ({path} was handed over and stays)"]
    assert names(stack) == []


def test_an_unreadable_record_is_shown_and_abort_removes_it(tmp_path: Path) -> None:
    stack, _, state = dest_host(tmp_path)
    os.makedirs(state)
    Path(state, "d1.dest.json").write_text("{not json")
    st = disk_status(stack, "d1")
    assert any("unreadable" in p for p in st["problems"]), st
    assert finish.abort(stack, "d1")[0] == ["removed the unreadable record of incoming d1"]
    assert names(stack) == []


def test_records_next_to_the_journal_are_not_disks(tmp_path: Path) -> None:
    """d1.dest.json (agent) and d1.health.json (watcher) are d1's, not disks d1.dest and d1.health."""
    j = journal.Journal(str(tmp_path))
    j.save(journal.Entry("d1", "/dev/loop1", "7:1"), journal.WRAPPED)
    for f in ("d1.dest.json", "d1.health.json"):
        (tmp_path / f).write_text("{}")
    assert j.names() == ["d1"]
    for bad in ("d1.dest", "d1.health"):
        with pytest.raises(BadInput, match="reserved"):
            disk_name(bad)
    assert disk_name("d1.destination") == "d1.destination"


def test_block_script_names_avoid_the_reserved_suffixes() -> None:
    from dmmig.names import disk_name_for
    assert disk_name_for("/srv/vm.dest") == "srv-vm+2edest"
    assert disk_name_for("/dev/vg0/vm.health") == "vg0-vm+2ehealth"
    assert disk_name_for("/srv/vm.destination") == "srv-vm.destination"
