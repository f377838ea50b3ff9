"""The destination agent in-process, no root: its record of an incoming disk (fresh for each
migration, handed over only once the `add` got the yes), what counts as zeroed, what it
refuses as in use (another process, a local domain's backend, another dmmig record) or of
another block size, and what it digests. Disks are files in tmp_path; loop devices and
block sizes answer through the fake runner, XenStore is the in-memory one."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from dmmig.core import gate, journal
from dmmig.core.confine import Policy, Refused
from dmmig.errors import BadInput, Busy
from dmmig.flows.destination import AgentServer
from tests.unit.fakes import FakeRunner, MemXenStore

MIB = 1 << 20


class Dest:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "images"
        self.dir.mkdir()
        self.state = str(tmp_path / "state")
        self.xs = MemXenStore()
        self.runner = FakeRunner()
        self.agent = AgentServer(self.runner, self.state, policy=Policy(file_roots=(str(self.dir),)),
                                 xenstore=lambda: contextlib.nullcontext(self.xs))

    def path(self, name: str, size: int | None = None) -> str:
        p = self.dir / name
        if size is not None:
            p.write_bytes(b"")
            os.truncate(p, size)
        return str(p)

    def rec(self, name: str) -> dict[str, Any]:
        with open(os.path.join(self.state, f"{name}.dest.json")) as f:
            return dict(json.load(f))

    def write_rec(self, name: str, rec: dict[str, Any]) -> None:
        os.makedirs(self.state, exist_ok=True)
        with open(os.path.join(self.state, f"{name}.dest.json"), "w") as f:
            json.dump(rec, f)


@pytest.fixture
def dest(tmp_path: Path) -> Dest:
    return Dest(tmp_path)


def test_only_a_sparse_file_the_agent_just_created_counts_as_zeroed(dest: Dest) -> None:
    p = dest.path("vm1.img")
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, block_size=512, migration="m1")
    assert r == {"path": p, "size": 4 * MIB, "created": True, "zeroed": True}
    assert dest.rec("d1")["created_as"] == "file"
    # the same migration resumed: still created by dmmig; once written (exported), not zeroed
    dest.write_rec("d1", dict(dest.rec("d1"), written=True))
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, block_size=512, migration="m1")
    assert r["created"] and not r["zeroed"]
    # an existing disk: never zeroed, never created by dmmig
    q = dest.path("vm2.img", 4 * MIB)
    r = dest.agent.op_prepare_disk("d2", q, 4 * MIB, block_size=512, migration="m2")
    assert not r["created"] and not r["zeroed"]


def test_a_new_migration_starts_a_fresh_record(dest: Dest) -> None:
    p = dest.path("vm1.img")
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, migration="m1")
    # migration m1 was handed over; its source never told this agent to forget it
    dest.write_rec("d1", dict(dest.rec("d1"), handed_over=1234.5, written=True))
    assert not gate.incoming(dest.state, "d1")
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m2")
    rec = dest.rec("d1")
    assert "handed_over" not in rec and rec["migration"] == "m2" and gate.incoming(dest.state, "d1")
    # nothing of m1 survives: m2 did not create the disk (its abort keeps it), nor is it zero
    assert not rec["created"] and not rec["written"] and not r["zeroed"]


def test_an_unfinished_record_of_another_migration_refuses(dest: Dest) -> None:
    p = dest.path("vm1.img")
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, migration="m1")
    with pytest.raises(Busy, match="another migration of d1 was arriving .unfinished. here onto"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m2")
    with pytest.raises(Busy, match="another migration of d1"):
        dest.agent.op_prepare_disk("d1", dest.path("other.img", 4 * MIB), 4 * MIB, migration="m1")
    assert dest.rec("d1")["migration"] == "m1"


def test_a_record_of_the_earlier_version_is_resumed_but_never_stays_handed_over(dest: Dest) -> None:
    """A migration in flight across an upgrade: its record has no migration id."""
    p = dest.path("vm1.img", 4 * MIB)
    dest.write_rec("d1", {"name": "d1", "path": p, "size": 4 * MIB, "created": True, "written": True})
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, migration="m9")
    assert r["created"] and not r["zeroed"] and dest.rec("d1")["migration"] == "m9"
    dest.write_rec("d1", {"name": "d1", "path": p, "size": 4 * MIB, "created": True, "handed_over": 1.0})
    r = dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m10")
    assert not r["created"] and "handed_over" not in dest.rec("d1")
    assert dest.agent.op_stop("d1", remove_created=True) == {"done": []} and os.path.exists(p)


def test_handed_over_only_once_the_answer_reached_the_add(dest: Dest) -> None:
    p = dest.path("vm1.img")
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, migration="m1")
    dest.agent.op_await_gate([], 0)  # the gate listens
    try:
        # nobody asked (or the `add` gave up): the yes reaches nobody, the disk stays incoming
        assert dest.agent.op_answer_gate("d1", True, "fine")["delivered"] is False
        assert "handed_over" not in dest.rec("d1") and gate.incoming(dest.state, "d1")
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(gate.ask(dest.state, "d1", 10)))
        t.start()
        assert dest.agent.op_await_gate(["d1"], 10) == {"asked": "d1"}
        assert dest.agent.op_answer_gate("d1", True, "fine")["delivered"] is True
        t.join(10)
    finally:
        dest.agent.gate.close()
    assert out["ok"] and dest.rec("d1")["handed_over"] > 0 and not gate.incoming(dest.state, "d1")


def test_a_process_holding_the_disk_open_refuses_it(dest: Dest) -> None:
    """qemu opens a disk without O_EXCL: the agent finds it among the open files."""
    p = dest.path("vm1.img", 4 * MIB)
    with open(p, "rb") as f:
        holder = subprocess.Popen(["sleep", "30"], stdin=f)
    try:
        with pytest.raises(Busy, match=rf"in use: held open by pid {holder.pid} \(sleep\)"):
            dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")
        probe = dest.agent.op_probe([p], names={p: "d1"})["disks"][p]
        assert f"pid {holder.pid}" in probe["in_use"]
    finally:
        holder.kill()
        holder.wait()
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")


def test_a_local_domains_backend_or_another_dmmig_record_refuses_it(dest: Dest) -> None:
    p = dest.path("vm1.img", 4 * MIB)
    be = "/local/domain/0/backend/qdisk/5/768"
    dest.xs.data.update({"/local/domain/5/name": "hvm1", f"{be}/params": f"aio:{p}"})
    with pytest.raises(Busy, match=r"used by domain hvm1 \(domid 5\) through its qdisk backend 768"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")
    dest.xs.data.clear()
    # another incoming disk's destination, by another name for the same file
    os.symlink(p, dest.path("alias.img"))
    dest.write_rec("d0", {"name": "d0", "path": dest.path("alias.img"), "size": 4 * MIB})
    with pytest.raises(Busy, match="the destination of dmmig's incoming migration d0"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")
    os.unlink(os.path.join(dest.state, "d0.dest.json"))
    # a disk this host migrates away (or serves through block-dmmig) sits on it
    journal.Journal(dest.state).save(journal.Entry("d7", p, "7:7"), journal.WRAPPED)
    with pytest.raises(Busy, match="the origin of dmmig disk d7 here"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")


def test_a_loop_device_over_the_file_refuses_it(dest: Dest) -> None:
    p = dest.path("vm1.img", 4 * MIB)
    st = os.stat(p)
    # what losetup 2.38.1 (Debian 12) prints, padding included (recorded in the rig)
    listing = {"loopdevices": [
        {"name": "/dev/loop3", "maj:min": "  7:3  ",
         "back-maj:min": f"       {os.major(st.st_dev)}:{os.minor(st.st_dev)} ",
         "back-ino": st.st_ino, "offset": 0},
        {"name": "/dev/loop4", "maj:min": "  7:4  ", "back-maj:min": "       0:1 ", "back-ino": 99, "offset": 0}]}
    dest.runner.rules.append((["losetup", "--list"], (0, json.dumps(listing, indent=3), "")))
    with pytest.raises(Busy, match="a loop device is over it: /dev/loop3$"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")


def test_another_logical_block_size_refuses_before_anything_changes(dest: Dest) -> None:
    p = dest.path("vm1.img")
    with pytest.raises(BadInput, match="logical block size of 512 bytes, the source disk 4096"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, block_size=4096, migration="m1")
    assert not os.path.exists(p) and not os.path.exists(dest.state)
    with pytest.raises(BadInput, match="invalid logical block size"):
        dest.agent.op_prepare_disk("d1", p, 4 * MIB, create=True, block_size=3000, migration="m1")


def test_digest_only_of_a_disk_being_migrated_here_within_its_size(dest: Dest) -> None:
    p = dest.path("vm1.img", 8 * MIB)
    with pytest.raises(Refused, match="not a disk being migrated into this host"):
        dest.agent.op_digest(path="/etc/shadow", offset=0, length=4096, chunk=4096)
    dest.agent.op_prepare_disk("d1", p, 4 * MIB, migration="m1")
    with pytest.raises(Refused, match="beyond the migrated disk's 4194304 bytes"):
        dest.agent.op_digest(name="d1", offset=0, length=8 * MIB, chunk=MIB)
    with pytest.raises(Refused, match="not a disk being migrated"):
        dest.agent.op_digest(name="d1", path="/etc/shadow", offset=0, length=4096, chunk=4096)
    assert len(dest.agent.op_digest(name="d1", path=p, offset=0, length=4 * MIB, chunk=MIB)["digests"]) == 4
    assert len(dest.agent.op_digest(path=p, offset=0, length=MIB, chunk=MIB)["digests"]) == 1


@pytest.mark.parametrize("name", ["../x", "a/b", "-x", "x.dest"])
def test_names_are_validated(dest: Dest, name: str) -> None:
    with pytest.raises(BadInput, match="invalid disk name"):
        dest.agent.op_prepare_disk(name, dest.path("vm1.img"), 4 * MIB, create=True)
    with pytest.raises(BadInput, match="invalid disk name"):
        dest.agent.op_stop(name)


def test_probe_reports_a_refusal_instead_of_facts_outside_the_confinement(dest: Dest) -> None:
    probe = dest.agent.op_probe(["/etc/shadow", "/root/.ssh/id_ed25519"])["disks"]
    assert all("not under this agent's file roots" in d["refused"] and "size" not in d for d in probe.values())
    p = dest.path("new.img")
    probe = dest.agent.op_probe([p], sizes={p: 1 << 60}, create=True)["disks"]
    assert "do not fit" in probe[p]["refused"] and not os.path.exists(p)
