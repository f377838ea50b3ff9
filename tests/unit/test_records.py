"""Typed, versioned records: files written by dmmig before records had types (version 0,
samples in tests/unit/fixtures/v0/) load into the dataclasses and are written back in the
current version; keys this version does not know are warned about and kept, not dropped.

fixtures/v0/vm1-disk.dest.json is what the agent of commit 0777df2 wrote (op_prepare_disk
with --create, then op_export on a unix socket; only the directories renamed);
old-disk.dest.json is a record of a version before migration ids and created_as (an LV,
exported on TCP, handed over). vg0-vm1.json and srv-vm2.img.json are journals the Journal of
0777df2 saved, with dest, copy and mirror filled as that code's flows fill them (session.destination,
_copy_passes, cutover, answer_gate; the values of a rig run): a disk mirroring and handed over,
and a disk only prepared (dest {})."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from dmmig.adapters import nbd
from dmmig.core import journal, records
from dmmig.core.confine import Policy
from dmmig.errors import StateError
from dmmig.flows.destination import AgentServer, incoming
from tests.unit.fakes import FakeRunner

FIXTURES = Path(__file__).parent / "fixtures" / "v0"
MIB = 1 << 20


def state_with(tmp_path: Path, *files: str) -> str:
    state = tmp_path / "state"
    state.mkdir()
    for f in files:
        shutil.copy(FIXTURES / f, state / f)
    return str(state)


def agent(tmp_path: Path, state: str) -> AgentServer:
    return AgentServer(FakeRunner(), state, policy=Policy(file_roots=(str(tmp_path),)),
                       xenstore=lambda: contextlib.nullcontext(None))


def test_todays_agent_record_loads_typed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = state_with(tmp_path, "vm1-disk.dest.json", "old-disk.dest.json")
    with caplog.at_level(logging.WARNING, logger="dmmig"):
        recs = incoming(state)
    assert caplog.records == []  # every key of today's format is known: nothing to warn about
    new = recs["vm1-disk"]
    assert new == records.Incoming(
        name="vm1-disk", path="/srv/images/vm1.img", size=4 * MIB, created=True, created_as="file",
        migration="3f2a9c1e0b7d4e55", pre_ids=False, block_size=512, since=1796462037.1071243,
        export=nbd.Export(name="vm1-disk", path="/srv/images/vm1.img", pid=5720, cache="directsync",
                          socket="/var/lib/dmmig/nbd/vm1-disk.sock"),
        written=True, handed_over=None)
    old = recs["old-disk"]
    assert isinstance(old, records.Incoming)
    assert old.pre_ids and old.migration is None and old.created and old.created_as is None
    assert old.handed_over == 1796400100.25 and old.block_size is None
    assert old.export == nbd.Export(name="old-disk", path="/dev/vg0/old", pid=4321, cache="directsync",
                                    addr="192.168.200.2", port=10809)


def test_a_record_reads_back_as_written_with_its_version(tmp_path: Path) -> None:
    state = state_with(tmp_path, "vm1-disk.dest.json", "old-disk.dest.json")
    for name in ("vm1-disk", "old-disk"):
        rec = agent(tmp_path, state).load(name)
        assert rec is not None
        data = json.loads(json.dumps(records.to_json(rec)))
        assert data["version"] == records.INCOMING_VERSION
        assert records.Incoming.from_json(data, name, "test") == rec


def test_a_record_of_a_version_before_ids_resumes_its_migration(tmp_path: Path) -> None:
    """The pre-id record is taken for the same migration as the request (as that version did):
    a resumed copy keeps what the agent knows of its disk and writes it in today's version."""
    disk = tmp_path / "vm1.img"
    disk.write_bytes(b"")
    os.truncate(disk, 4 * MIB)
    state = state_with(tmp_path)
    Path(state, "d1.dest.json").write_text(json.dumps(
        {"name": "d1", "path": str(disk), "size": 4 * MIB, "created": True, "written": True, "since": 5.0}))
    r = agent(tmp_path, state).op_prepare_disk("d1", str(disk), 4 * MIB, migration="m1")
    assert r["created"] and not r["zeroed"]
    data = json.loads(Path(state, "d1.dest.json").read_text())
    assert data["version"] == 1 and data["migration"] == "m1" and not data["pre_ids"]
    assert data["created_as"] == "file" and data["written"] and data["since"] == 5.0


def test_unknown_keys_are_warned_about_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A newer dmmig's record: read as far as this version understands it, with a warning that
    names what it does not; its other keys go back to disk unchanged at the next save."""
    disk = tmp_path / "vm1.img"
    disk.write_bytes(b"")
    os.truncate(disk, 4 * MIB)
    state = state_with(tmp_path)
    Path(state, "d1.dest.json").write_text(json.dumps(
        {"version": 7, "name": "d1", "path": str(disk), "size": 4 * MIB, "migration": "m1",
         "checksum_of_base": "abc", "export": None}))
    a = agent(tmp_path, state)
    with caplog.at_level(logging.WARNING, logger="dmmig"):
        a.op_prepare_disk("d1", str(disk), 4 * MIB, migration="m1")
    text = caplog.text
    assert "newer dmmig (record version 7" in text and "checksum_of_base" in text, text
    data = json.loads(Path(state, "d1.dest.json").read_text())
    assert data["checksum_of_base"] == "abc" and data["version"] == records.INCOMING_VERSION


def test_a_record_missing_what_it_must_say_is_unreadable(tmp_path: Path) -> None:
    state = state_with(tmp_path)
    Path(state, "d1.dest.json").write_text(json.dumps({"name": "d1"}))
    Path(state, "d2.dest.json").write_text("[1]")
    recs = incoming(state)
    assert isinstance(recs["d1"], records.Unreadable) and "path" in recs["d1"].error
    assert isinstance(recs["d2"], records.Unreadable)


def journal_with(tmp_path: Path, *files: str) -> journal.Journal:
    return journal.Journal(state_with(tmp_path, *files))


def test_todays_journal_loads_typed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = journal_with(tmp_path, "vg0-vm1.json", "srv-vm2.img.json")
    with caplog.at_level(logging.WARNING, logger="dmmig"):
        e = j.load("vg0-vm1")
        p = j.load("srv-vm2.img")
    assert caplog.records == []
    assert e is not None and p is not None
    assert e.version == journal.JOURNAL_VERSION and e.extra == {}
    assert e.phase == journal.MIRRORING and e.block_sectors == 128 and e.handed_over
    assert e.dest == records.Destination(
        host="192.168.200.2", user="root", port=22, known_hosts="/run/ssh/known_hosts", disk="/dev/vg1/vm1",
        identity="/run/ssh/id", transport="ssh", nbd_address=None, remote_dmmig="/usr/bin/dmmig",
        remote_state_dir=None, insecure=False, tunnel="forward", tunnel_probe="streamlocal forwarding works",
        tls=None, export=nbd.Export(name="vg0-vm1", path="/dev/vg1/vm1", pid=2211, cache="directsync",
                                    socket="/run/dmmig/nbd/vg0-vm1.sock"),
        remote_state="/run/dmmig")
    assert e.copy == records.CopyState(
        migration="5d0c2a8e9b1f4c7da3e6f8b2c4d6e8f0", zeroed=False, base_era=4, base_offset=64 << 20, base_started=True,
        base_done=True, base=records.BasePass(start=0, read=64 << 20, sent=48 << 20, zeroed=16 << 20, skipped=0,
                                              seconds=1.842),
        next_since=7, rounds=[records.Round(since=4, dirty_bytes=1 << 20, read=1 << 20, sent=1 << 20, zeroed=0,
                                            skipped=0, seconds=0.051, era_seconds=0.012)])
    assert e.mirror == records.MirrorState(
        tunnel=records.Tunnel(sock="/var/lib/dmmig/vg0-vm1.nbd.sock", pid=3012, mode="forward",
                              log="/var/lib/dmmig/vg0-vm1.tunnel.log"),
        log_file="/run/dmmig/vg0-vm1.mirror-log", log_devs=["/dev/loop8", "/dev/loop9"], nbd="/dev/nbd0",
        watcher=3100, era=7, pause_seconds=0.004, pauses=[0.003, 0.004], resync_regions=3, resync_bytes=786432,
        regions=256, region_bytes=262144, parts=2, resync_ranges=[[3, 4], [10, 12]], resync_ranges_cut=False,
        synced=records.Synced(at=1796462100.5, events=5, seconds=0.41, kernel_out_of_sync_first_seen=3),
        handover=records.Handover(at=1796462200.25, ok=True, why="in sync", caught_up_bytes=0, seconds=0.012,
                                  cap_seconds=12.0, delivered=True))
    assert p.mirror.empty()
    assert p.phase == journal.PREPARED and p.dest is None
    assert p.copy == records.CopyState(migration="0a1b2c3d4e5f60718293a4b5c6d7e8f9")


def same_but_versioned(new: dict, old: dict, version: int) -> None:
    """NEW (written now) says what OLD (today's) said, plus its version; a key either leaves
    out is None (records.to_json leaves out None) or, a key only NEW has, its empty value."""
    assert new.pop("version") == version
    assert {k: new.get(k) for k in old} == old, (new, old)  # a None is left out
    assert all(new[k] in (None, False, 0, []) for k in set(new) - set(old)), new


def test_todays_journal_is_written_back_in_the_current_version(tmp_path: Path) -> None:
    """Saved again (any step of the next dmmig does), the entry carries its versions, and reads
    back the same; everything but the versions is where today's journal had it."""
    j = journal_with(tmp_path, "vg0-vm1.json", "srv-vm2.img.json")
    for name in ("vg0-vm1", "srv-vm2.img"):
        old = json.loads((FIXTURES / f"{name}.json").read_text())
        e = j.load(name)
        assert e is not None
        j.save(e)
        new = json.loads(Path(j.path(name)).read_text())
        assert new.pop("version") == journal.JOURNAL_VERSION
        nd, od = new.pop("dest", None), old.pop("dest")
        if od:
            same_but_versioned(nd, od, records.DESTINATION_VERSION)
        else:
            assert nd is None
        same_but_versioned(new.pop("copy"), old.pop("copy"), records.COPY_VERSION)
        same_but_versioned(new.pop("mirror"), old.pop("mirror"), records.MIRROR_VERSION)
        assert new == old
        assert j.load(name) == e


def test_unknown_journal_keys_are_warned_about_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = journal_with(tmp_path, "vg0-vm1.json")
    data = json.loads(Path(j.path("vg0-vm1")).read_text())
    data["version"] = 9
    data["window"] = {"cap": 12}
    data["dest"]["version"] = 3
    data["dest"]["jump_host"] = "bastion"
    data["copy"]["base"]["compressed"] = 7
    data["copy"]["rounds"][0]["queue_depth"] = 4
    data["mirror"]["tunnel"]["jump"] = True
    Path(j.path("vg0-vm1")).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="dmmig"):
        e = j.load("vg0-vm1")
    assert e is not None and e.dest is not None
    for want in ("record version 9", "window", "record version 3", "jump_host", "compressed", "queue_depth",
                 "(tunnel)"):
        assert want in caplog.text, (want, caplog.text)
    j.save(e)
    back = json.loads(Path(j.path("vg0-vm1")).read_text())
    assert back["window"] == {"cap": 12} and back["dest"]["jump_host"] == "bastion"
    assert back["copy"]["base"]["compressed"] == 7 and back["copy"]["rounds"][0]["queue_depth"] == 4
    assert back["mirror"]["tunnel"]["jump"] is True
    assert back["version"] == journal.JOURNAL_VERSION and back["dest"]["version"] == records.DESTINATION_VERSION


def test_a_journal_missing_what_it_must_say_is_unreadable(tmp_path: Path) -> None:
    j = journal_with(tmp_path)
    Path(j.path("d1")).write_text(json.dumps({"name": "d1", "origin": "/dev/loop1"}))
    with pytest.raises(StateError, match="unreadable"):
        j.load("d1")
    Path(j.path("d1")).write_text(json.dumps({"name": "d1", "origin": "/dev/loop1", "origin_devno": "7:1",
                                              "dest": {"host": "b"}}))
    with pytest.raises(StateError, match="unreadable"):
        j.load("d1")


def test_todays_watcher_record_loads_typed(tmp_path: Path) -> None:
    """vg0-vm1.health.json: what record() of 0777df2 wrote for the dict its watch() builds."""
    from dmmig.core import watch
    state = state_with(tmp_path, "vg0-vm1.health.json")
    h = watch.read_health(state, "vg0-vm1")
    assert h == records.LegFailure(failed_at=1796462300.75, health="AD", log_health=None, events=9, failed_legs=[1])
    watch.record(state, "vg0-vm1", h)
    back = json.loads(Path(state, "vg0-vm1.health.json").read_text())
    old = json.loads((FIXTURES / "vg0-vm1.health.json").read_text())
    assert back == {**{k: v for k, v in old.items() if v is not None}, "version": records.HEALTH_VERSION}
    Path(state, "vg0-vm1.health.json").write_text(json.dumps({"health": "AD"}))  # no time: unknown, not a crash
    assert watch.read_health(state, "vg0-vm1") is None


def test_what_is_not_known_yet_is_left_out_as_version_0_did(tmp_path: Path) -> None:
    """A dmmig of version 0 reading this version's journal (a downgrade) tells "not yet" by a
    key's absence: no base era, no zeroed answer, no tunnel chosen, no export, no destination."""
    j = journal_with(tmp_path, "srv-vm2.img.json")
    e = j.load("srv-vm2.img")
    assert e is not None
    e.dest = records.Destination(host="b", user="root", port=22, known_hosts="/k", disk="/srv/vm2.img")
    j.save(e)
    data = json.loads(Path(j.path("srv-vm2.img")).read_text())
    assert not {"base_era", "zeroed", "next_since", "base"} & set(data["copy"]), data["copy"]
    assert not {"tunnel", "tunnel_probe", "tls", "export"} & set(data["dest"]), data["dest"]
    assert not {"tunnel", "nbd", "watcher", "synced", "handover"} & set(data["mirror"]), data["mirror"]
