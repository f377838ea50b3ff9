"""dmmig.adapters.dm.targets against a real kernel: every table dmmig renders is accepted by the
kernel and reads back (`dmsetup table`) as the same object; every status line the kernel
writes parses to what the device is really doing.

With DMMIG_CAPTURE=1 the raw kernel text seen here is saved to
tests/unit/fixtures/kernel_output.json, which the unit tests parse without a kernel.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping

import pytest

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.dm.targets import CoreLog, DiskLog, Era, EraStatus, Linear, Mirror, MirrorStatus, Other, Table
from dmmig.adapters.era import BlockRange, EraTools, parse_invalidate_xml
from dmmig.adapters.runner import Result
from dmmig.errors import CommandError
from tests.rig.uml import ROOT, UmlHost

pytestmark = pytest.mark.kernel

MiB = 1 << 20
LEN = 16 * MiB // 512          # every data device here: 16 MiB = 32768 sectors
CAPTURE = os.environ.get("DMMIG_CAPTURE") == "1"
FIXTURE = ROOT / "tests" / "unit" / "fixtures" / "kernel_output.json"
_captured: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="module", autouse=True)
def _save_capture(rig: UmlHost) -> Iterator[None]:
    yield
    if not (CAPTURE and _captured):
        return
    data: dict[str, object] = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    data["_about"] = {
        "what": "raw kernel text seen by tests/kernel/test_targets.py (DMMIG_CAPTURE=1)",
        "kernel": rig.run(["uname", "-r"]).out.strip(),
        "dmsetup": rig.run(["dmsetup", "--version"]).out.strip().splitlines(),
        "era_invalidate": rig.run(["era_invalidate", "-V"]).out.strip(),
    }
    data.update(_captured)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def capture(case: str, **kw: object) -> None:
    _captured.setdefault(case, {}).update(kw)


class RigRunner:
    """dmmig's Runner protocol over the rig, so DmSetup/EraTools run in the real kernel."""

    def __init__(self, rig: UmlHost) -> None:
        self.rig = rig

    def run(self, argv: list[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None, env: Mapping[str, str] | None = None) -> Result:
        r = self.rig.run(argv, check=False, timeout=timeout or 60, env=dict(env) if env else None,
                         input=input.encode() if input is not None else None)
        res = Result(argv, r.rc, r.out, r.err)
        if check and r.rc != 0:
            raise CommandError(argv, r.rc, r.out, r.err)
        return res


class DmDevices:
    """dm devices made by one test; removed in reverse order at teardown."""

    def __init__(self, rig: UmlHost) -> None:
        self.rig = rig
        self.dm = DmSetup(RigRunner(rig))
        self.names: list[str] = []

    def create(self, name: str, table: Table | str) -> str:
        text = table.render() if isinstance(table, Table) else table
        self.rig.run(["dmsetup", "create", name, "--table", text])
        self.names.append(name)
        info = self.dm.info(name)
        assert info is not None
        return info.devno

    def table(self, name: str) -> str:
        return self.rig.run(["dmsetup", "table", name]).out

    def status(self, name: str) -> str:
        return self.rig.run(["dmsetup", "status", name]).out

    def cleanup(self) -> None:
        errors = []
        for n in reversed(self.names):
            r = self.rig.run(["dmsetup", "remove", "--retry", n], check=False)
            if r.rc != 0:
                errors.append(f"{n}: {r.err.strip()}")
        self.names.clear()
        assert not errors, f"could not remove dm devices: {errors}"


@pytest.fixture
def dmdev(rig: UmlHost, disks) -> Iterator[DmDevices]:  # after `disks`: torn down before it
    d = DmDevices(rig)
    yield d
    d.cleanup()


def devno(rig: UmlHost, path: str) -> str:
    hexes = rig.run(["stat", "-L", "-c", "%t:%T", path]).out.strip()
    major, minor = (int(x, 16) for x in hexes.split(":"))
    return f"{major}:{minor}"


def zero(rig: UmlHost, dev: str, nbytes: int = 4096) -> None:
    rig.run(["dd", "if=/dev/zero", f"of={dev}", f"bs={nbytes}", "count=1", "oflag=direct"])


def wait_status(dmdev: DmDevices, name: str, pred, timeout: float = 30) -> MirrorStatus:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        line = dmdev.dm.status_line(name)
        st = MirrorStatus.parse(line)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: status never satisfied the condition, last: {line!r}")
        time.sleep(0.2)


# ---- linear ---------------------------------------------------------------------------------

def test_linear_table_roundtrip_and_info(rig: UmlHost, disks, dmdev: DmDevices, name: str) -> None:
    origin = disks(16)
    t = Table(Linear(LEN - 4096, devno(rig, origin), 2048))
    mine = dmdev.create(name, t)
    text = dmdev.table(name)
    status = dmdev.status(name)
    capture("linear", table=text, status=status, rendered=t.render())
    assert Table.parse(text) == t
    assert text.strip() == t.render()
    assert status.split() == ["0", str(LEN - 4096), "linear"]
    # the dmsetup adapter reads the same device
    assert dmdev.dm.table(name) == t
    info = dmdev.dm.info(name)
    assert info is not None and info.name == name and info.live and not info.suspended
    assert not info.has_inactive and info.segments == 1 and info.open_count == 0
    assert info.devno == mine == devno(rig, f"/dev/mapper/{name}")
    capture("linear", info=rig.run(["dmsetup", "info", "-c", "--noheadings", "--separator", ";",
                                    "-o", "name,major,minor,attr,open,segments,events,uuid", name]).out)
    dmdev.dm.suspend(name)
    try:
        info = dmdev.dm.info(name)
        assert info is not None and info.suspended
        capture("linear", info_suspended=rig.run(
            ["dmsetup", "info", "-c", "--noheadings", "--separator", ";",
             "-o", "name,major,minor,attr,open,segments,events,uuid", name]).out)
    finally:
        dmdev.dm.resume(name)
    info = dmdev.dm.info(name)
    assert info is not None and not info.suspended
    assert dmdev.dm.info(name + "-absent") is None


# ---- era ------------------------------------------------------------------------------------

def test_era_table_status_snapshot_and_invalidate(rig: UmlHost, disks, dmdev: DmDevices, name: str) -> None:
    meta, origin = disks(4), disks(16)
    zero(rig, meta)  # an all-zero superblock makes era_ctr format the metadata
    meta_dn = devno(rig, meta)
    t = Table(Era(LEN, meta_dn, devno(rig, origin), 128))
    dmdev.create(name, t)
    text = dmdev.table(name)
    line = dmdev.status(name)
    capture("era", table=text, status=line, rendered=t.render(), block_sectors=128, nr_blocks=LEN // 128)
    assert Table.parse(text) == t
    assert text.strip() == t.render()
    st = EraStatus.parse(line)
    assert st.metadata_block_sectors == 8
    assert st.current_era >= 1
    assert st.snapshot_block is None
    assert 0 < st.metadata_used < st.metadata_total == 4 * MiB // 4096
    first_era = st.current_era

    # one whole era block (3) and 4 KiB inside block 200
    rig.run(["dd", "if=/dev/urandom", f"of=/dev/mapper/{name}", "bs=64K", "count=1", "seek=3", "oflag=direct"])
    rig.run(["dd", "if=/dev/urandom", f"of=/dev/mapper/{name}", "bs=4K", "count=1",
             f"seek={200 * 16 + 5}", "oflag=direct"])

    rig.run(["dmsetup", "message", name, "0", "take_metadata_snap"])
    try:
        snap_line = dmdev.status(name)
        snap = EraStatus.parse(snap_line)
        assert snap.snapshot_block is not None and snap.snapshot_block > 0
        assert snap.current_era == first_era + 1  # taking the snapshot rolls the era over
        xml0 = rig.run(["era_invalidate", "--metadata-snapshot", "--written-since", "0", meta]).out
        xml1 = rig.run(["era_invalidate", "--metadata-snapshot", "--written-since", str(first_era), meta]).out
        xml_now = rig.run(["era_invalidate", "--metadata-snapshot", "--written-since",
                           str(snap.current_era), meta]).out
        capture("era", status_snap=snap_line, invalidate_since_0=xml0,
                invalidate_since_first=xml1, first_era=first_era, invalidate_since_current=xml_now)
        assert parse_invalidate_xml(xml0) == [BlockRange(0, LEN // 128)]  # every era is >= 0
        assert parse_invalidate_xml(xml1) == [BlockRange(3, 4), BlockRange(200, 201)]
        assert parse_invalidate_xml(xml_now) == []
        # a second snapshot is refused while one is held
        again = rig.run(["dmsetup", "message", name, "0", "take_metadata_snap"], check=False)
        assert again.rc != 0
        # without --metadata-snapshot the tool cannot open live metadata
        live = rig.run(["era_invalidate", "--written-since", "0", meta], check=False)
        capture("era", invalidate_live_rc=live.rc, invalidate_live_stderr=live.err)
        assert live.rc != 0
    finally:
        rig.run(["dmsetup", "message", name, "0", "drop_metadata_snap"])
    dropped = dmdev.status(name)
    capture("era", status_dropped=dropped)
    assert EraStatus.parse(dropped).snapshot_block is None

    # the same through dmmig's own EraTools (which takes and drops the snapshot itself)
    runner = RigRunner(rig)
    tools = EraTools(runner, dmdev.dm)
    era = tools.checkpoint(name)
    assert era == first_era + 2
    rig.run(["dd", "if=/dev/urandom", f"of=/dev/mapper/{name}", "bs=64K", "count=2", "seek=10", "oflag=direct"])
    ranges, now = tools.dirty(name, meta, era)
    assert ranges == [BlockRange(10, 12)]
    assert now == era + 1
    assert dmdev.dm.era_status(name).snapshot_block is None


# ---- mirror ---------------------------------------------------------------------------------

def test_mirror_core_log_nosync(rig: UmlHost, disks, dmdev: DmDevices, name: str) -> None:
    a, b = devno(rig, disks(16)), devno(rig, disks(16))
    t = Table(Mirror(LEN, CoreLog(128, "nosync"), (a, b)))
    dmdev.create(name, t)
    text, line = dmdev.table(name), dmdev.status(name)
    capture("mirror_core", table=text, status=line, rendered=t.render(), legs=[a, b])
    assert Table.parse(text) == t
    assert text.strip() == t.render()
    st = MirrorStatus.parse(line)
    assert st == MirrorStatus((a, b), LEN // 128, LEN // 128, "AA", "core")
    assert st.synced and st.healthy and st.failed_legs == []


def test_mirror_disk_log_resyncs_leg0_to_leg1(rig: UmlHost, disks, dmdev: DmDevices, name: str) -> None:
    leg0, leg1, log = disks(16), disks(16), disks(1)
    rig.run(["dd", "if=/dev/urandom", f"of={leg0}", "bs=1M", "count=16", "oflag=direct"])
    zero(rig, log)
    a, b, lg = devno(rig, leg0), devno(rig, leg1), devno(rig, log)
    t = Table(Mirror(LEN, DiskLog(lg, 128), (a, b)))
    dmdev.create(name, t)
    text, first = dmdev.table(name), dmdev.status(name)
    assert Table.parse(text) == t
    assert text.strip() == t.render()
    st0 = MirrorStatus.parse(first)
    assert st0.regions == LEN // 128 and st0.log_kind == "disk" and st0.log_device == lg
    st = wait_status(dmdev, name, lambda s: s.synced, timeout=60)
    line = dmdev.status(name)
    capture("mirror_disk", table=text, status_first=first, status=line, rendered=t.render(),
            legs=[a, b], log=lg)
    st = MirrorStatus.parse(line)
    assert st == MirrorStatus((a, b), LEN // 128, LEN // 128, "AA", "disk", lg, "A")
    assert st.healthy and st.synced
    # leg 0 is the source of the resync
    assert rig.run(["cmp", leg0, leg1], check=False).rc == 0
    # the log on disk: magic "MiRr", version 2, nr_regions
    hdr = rig.run(["od", "-A", "n", "-t", "x4", "-N", "16", log]).out.split()
    assert hdr[:2] == ["4d695272", "00000002"] and int(hdr[2], 16) == LEN // 128


@pytest.mark.parametrize("kind", ["flakey", "error"])
def test_mirror_handle_errors_marks_failed_leg(rig: UmlHost, disks, dmdev: DmDevices, name: str,
                                               kind: str) -> None:
    a = devno(rig, disks(16))
    if kind == "flakey":
        under = devno(rig, disks(16))
        bad_text = f"0 {LEN} flakey {under} 0 0 5 1 error_writes"  # up 0 s, down 5 s: always down
        bad_obj = Table(Other(LEN, "flakey", (under, "0", "0", "5", "1", "error_writes")))
    else:
        bad_text = f"0 {LEN} error"
        bad_obj = Table(Other(LEN, "error"))
    bad = dmdev.create(f"{name}-bad", bad_text)
    bad_table = dmdev.table(f"{name}-bad")
    assert Table.parse(bad_table) == bad_obj
    t = Table(Mirror(LEN, CoreLog(128, "nosync"), (a, bad), handle_errors=True))
    dmdev.create(name, t)
    text, before = dmdev.table(name), dmdev.status(name)
    assert Table.parse(text) == t
    assert text.strip() == t.render()
    st = MirrorStatus.parse(before)
    assert st.legs == (a, bad) and st.health[0] == "A"
    if kind == "flakey":  # reads still work on a flakey error_writes leg
        assert st.health == "AA" and st.healthy

    # with handle_errors the failed write is held until userspace reconfigures the mirror
    job = rig.spawn(["dd", "if=/dev/urandom", f"of=/dev/mapper/{name}", "bs=4K", "count=1", "seek=1000",
                     "oflag=direct"], timeout=120)
    try:
        st = wait_status(dmdev, name, lambda s: s.health[1] != "A")
        after = dmdev.status(name)
        st = MirrorStatus.parse(after)
        assert st.health[0] == "A" and st.health[1] == "D"
        assert st.failed_legs == [1] and not st.healthy
        assert not job.done(), "the write should be held, not completed"
    finally:
        # a plain (flushing) suspend fails the held write with EIO and frees dd
        rig.run(["dmsetup", "suspend", name])
        res = job.wait(60)
        rig.run(["dmsetup", "resume", name])
    assert res.rc != 0 and "Input/output error" in res.err
    capture(f"mirror_failed_{kind}", table=text, status_before=before, status=after,
            bad_table=bad_table, rendered=t.render(), legs=[a, bad],
            status_after_resume=dmdev.status(name))
    # the failure sticks until the table is replaced
    assert MirrorStatus.parse(dmdev.status(name)).health[1] == "D"
