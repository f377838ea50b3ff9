"""Issue 2 in a real kernel: wrap, live era insertion, dirty tracking, abort."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ORACLE, python
from tests.kernel.steps import start_writer, stop_writer
from tests.rig.uml import UmlHost

pytestmark = pytest.mark.kernel
MiB = 1 << 20


def test_wrap_is_idempotent_and_linear(rig: UmlHost, disks, name: str) -> None:
    origin = disks(16)
    path = rig.dmmig("wrap", name, origin).out.strip()
    assert path == f"/dev/mapper/dmmig-{name}"
    assert rig.dmmig("wrap", name, origin).out.strip() == path
    maj_min = rig.run(["stat", "-L", "-c", "%t:%T", origin]).out.strip()
    major, minor = (int(x, 16) for x in maj_min.split(":"))
    assert rig.run(["dmsetup", "table", f"dmmig-{name}"]).out.split() == \
        ["0", str(16 * MiB // 512), "linear", f"{major}:{minor}", "0"]
    other = disks(16)
    r = rig.dmmig("wrap", name, other, check=False)
    assert r.rc == 3 and "already exists over" in r.err
    rig.dmmig("unwrap", name)


def test_prepare_then_abort_under_writer_loses_nothing(rig: UmlHost, disks, name: str) -> None:
    origin = disks(64, fill_seed=7)
    top = rig.dmmig("wrap", name, origin).out.strip()
    rec = f"/dev/shm/{name}.rec"
    w = start_writer(rig, top, rec)
    time.sleep(1)
    rig.dmmig("prepare", name)
    assert rig.run(["dmsetup", "table", f"dmmig-{name}-era"]).out.split()[2] == "era"
    time.sleep(1.5)
    rig.dmmig("checkpoint", name)
    dirty = json.loads(rig.dmmig("dirty", name, "--json").out)
    assert dirty["total_bytes"] > 0, "era saw none of the writer's writes"
    time.sleep(1)
    rig.dmmig("abort", name)
    time.sleep(1)
    summary = stop_writer(rig, w)
    assert summary["writes"] > 100
    # the oracle reads the origin itself, below everything dmmig made
    chk = rig.run([python(), ORACLE, "check", origin, "--seed", "7", "--record", rec], check=False)
    assert chk.rc == 0, chk.out
    assert rig.run(["dmsetup", "table", f"dmmig-{name}"]).out.split()[2] == "linear"
    assert rig.run(["dmsetup", "info", f"dmmig-{name}-era"], check=False).rc != 0
    rig.dmmig("unwrap", name)
    rig.run(["rm", "-f", rec, rec + ".started"])


def test_dirty_reports_exactly_the_blocks_written_since_checkpoint(rig: UmlHost, disks, name: str) -> None:
    origin = disks(64)
    top = rig.dmmig("wrap", name, origin).out.strip()
    rig.dmmig("prepare", name, "--block-size", "64K")
    # writes before the checkpoint must not show up
    rig.run(["dd", "if=/dev/urandom", f"of={top}", "bs=64K", "count=3", "seek=100", "oflag=direct"])
    era = int(rig.dmmig("checkpoint", name).out)
    bs = 64 * 1024
    # whole blocks 5 and 9..11, a 4 KiB write inside block 300, one spanning 511/512 (bytes)
    rig.run(["dd", "if=/dev/urandom", f"of={top}", "bs=64K", "count=1", "seek=5", "oflag=direct"])
    rig.run(["dd", "if=/dev/urandom", f"of={top}", "bs=64K", "count=3", "seek=9", "oflag=direct"])
    rig.run(["dd", "if=/dev/urandom", f"of={top}", "bs=4K", "count=1", f"seek={300 * 16 + 3}", "oflag=direct"])
    rig.run(["dd", "if=/dev/urandom", f"of={top}", "bs=4K", "count=2", f"seek={512 * 16 - 1}", "oflag=direct"])
    d = json.loads(rig.dmmig("dirty", name, "--since", str(era), "--json").out)
    assert d["block_bytes"] == bs
    assert d["extents"] == [[5 * bs, 6 * bs], [9 * bs, 12 * bs], [300 * bs, 301 * bs], [511 * bs, 513 * bs]]
    assert d["total_bytes"] == 7 * bs
    # everything since prepare includes the early write
    d_all = json.loads(rig.dmmig("dirty", name, "--json").out)
    assert [100 * bs, 103 * bs] in d_all["extents"]
    rig.dmmig("abort", name)
    rig.dmmig("unwrap", name)


def test_abort_after_kill_at_any_point_of_prepare(rig: UmlHost, disks, name: str) -> None:
    """SIGKILL dmmig prepare at staggered moments; status explains, abort cleans up."""
    origin = disks(64, fill_seed=3)
    rig.dmmig("wrap", name, origin)
    rec = f"/dev/shm/{name}.rec"
    w = start_writer(rig, f"/dev/mapper/dmmig-{name}", rec, seed=3)
    for delay in (0.05, 0.2, 0.4, 0.7, 1.0):
        job = rig.spawn([str(rig_dmmig()), "prepare", name])
        time.sleep(delay)
        job.signal(9)
        job.wait(60)
        st = json.loads(rig.dmmig("status", name, "--json").out)
        assert st["name"] == name
        rig.dmmig("abort", name)
        st = json.loads(rig.dmmig("status", name, "--json").out)
        assert st["journal"]["phase"] == "wrapped" and not st["problems"], st
        assert list(st["devices"]) == [f"dmmig-{name}"]
    stop_writer(rig, w)
    chk = rig.run([python(), ORACLE, "check", origin, "--seed", "3", "--record", rec], check=False)
    assert chk.rc == 0, chk.out
    rig.dmmig("unwrap", name)
    rig.run(["rm", "-f", rec, rec + ".started"])


def rig_dmmig() -> str:
    from tests.rig.uml import ROOT
    return str(ROOT / ".venv" / "bin" / "dmmig")
