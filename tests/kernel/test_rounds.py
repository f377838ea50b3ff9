"""Whatever the guest writes reaches the destination, in the copy rounds and at the cutover:
zeros on a destination dmmig created, and writes still in flight while a round reads their
block (slow storage). The oracle is the writer's own record, read back on the destination."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ORACLE, python
from tests.kernel.steps import (
    DMMIG,
    KILL_WHEN_SUSPENDED,
    check,
    cleanup,
    copy_args,
    digest,
    start_writer,
    stop_writer,
    wait_resumed,
)
from tests.rig.output import summary

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20


def check_file(h, path: str, seed: int, rec: str) -> None:
    """The oracle reads with O_DIRECT, which tmpfs refuses: read the file through a loop device."""
    loop = h.run(["losetup", "--find", "--show", path]).out.strip()
    try:
        check(h, loop, seed, rec)
    finally:
        h.run(["losetup", "-d", loop])


def test_zeros_the_guest_writes_after_the_base_copy_reach_a_created_destination(pair, pdisks, name: str) -> None:
    """A destination dmmig created reads as zeros, so the first base pass may skip zero blocks;
    nothing after it may: the guest zeroing a block the base pass copied must reach it."""
    a, b = pair
    da, _ = pdisks
    origin = da(16, fill_seed=31)         # every block holds data (the oracle's seq 0)
    dest = f"/dev/shm/{name}.img"
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    base = summary(a.dmmig(*copy_args(name, dest, "--create")).out)
    assert base["sent"] >= 16 * MiB - 64 * 1024, base  # the data went over, nothing was zero
    # the guest zeroes the first 2 MiB (every block, in turn: whole 64 KiB chunks become zero,
    # as a guest's mkfs/discard would), and writes data and zeros at random over the next 2 MiB
    w = start_writer(a, top, rec, seed=31, blocks="0:512", zeros="1", sequential="", count="512")
    assert w.wait(120).rc == 0
    w = start_writer(a, top, rec, seed=31, blocks="512:1024", zeros="0.5", count="3000", resume="")
    assert w.wait(120).rc == 0
    s = summary(a.dmmig("copy", name, "--json").out)     # the rounds
    assert s["rounds"][0]["dirty_bytes"] >= 4 * MiB - 64 * 1024, s
    check_file(b, dest, 31, rec)
    assert digest(a, origin) == digest(b, dest)
    # the cutover's resync and the mirror carry zeros too (the kernel copies what it reads)
    w = start_writer(a, top, rec, seed=31, blocks="1024:1536", zeros="1", sequential="", count="512",
                     resume="")
    assert w.wait(120).rc == 0
    a.dmmig("cutover", name, "--json")
    w = start_writer(a, top, rec, seed=31, blocks="1536:2048", zeros="0.5", count="1000", resume="")
    assert w.wait(120).rc == 0
    check_file(b, dest, 31, rec)
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)
    b.run(["rm", "-f", dest])


def test_a_write_in_flight_across_rounds_is_never_missed(pair, pdisks, name: str) -> None:
    """Era tags a write when it reaches the era target, before the origin has it. A write still
    in flight while two rounds read its block (slow storage: multipath failover, a busy RAID)
    must still reach the destination: here every write to the origin takes 20 s (dm-delay),
    far longer than a round, and a cutover follows once it has landed."""
    a, b = pair
    da, db = pdisks
    loop, dest = da(16, fill_seed=41), db(16)
    slow = f"dl-{name}"
    a.run(["dmsetup", "create", slow, "--table", f"0 {16 * 2048} delay {loop} 0 0 {loop} 0 20000"])
    origin = f"/dev/mapper/{slow}"
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    try:
        a.dmmig("wrap", name, origin)
        a.dmmig("prepare", name)
        a.dmmig(*copy_args(name, dest))                  # base and rounds: nothing written yet
        t0 = time.monotonic()
        w = start_writer(a, top, rec, seed=41, blocks="100:101", count="1")   # in flight for 20 s
        # two rounds while it is in flight: the block is dirty in both, then the delta stops
        # shrinking (or, with a drain before each snapshot, the first round waits for it)
        s = summary(a.dmmig("copy", name, "--json", "--converge", "0", "--max-rounds", "2").out)
        assert w.wait(60).rc == 0, "the delayed write failed"
        assert time.monotonic() - t0 >= 19, "the write was not held in flight"
        a.dmmig("cutover", name, "--json", "--nbd-timeout", "30")
        check(b, dest, 41, rec)
        assert digest(a, loop) == digest(b, dest), s
        a.dmmig("finish", name)
        cleanup(a, b, name, rec)
    finally:
        a.run(["dmsetup", "remove", slow], check=False)


def test_oracle_sees_zero_writes(pair, pdisks, name: str) -> None:
    """The checker is not blind to zeros: a zero write the destination missed is reported."""
    a, _ = pair
    da, _ = pdisks
    dev = da(4, fill_seed=5)
    rec = f"{a.shared}/{name}.rec"
    w = start_writer(a, dev, rec, seed=5, blocks="0:16", zeros="1", sequential="", count="16")
    assert w.wait(60).rc == 0
    check(a, dev, 5, rec)
    a.run([python(), ORACLE, "fill", dev, "--seed", "5"])      # the zeros are gone again
    r = a.run([python(), ORACLE, "check", dev, "--seed", "5", "--record", rec], check=False)
    assert r.rc == 1 and "want zeros" in r.out, r.out
    a.run(["rm", "-f", rec, rec + ".started"])


@pytest.mark.parametrize("how", ["sigkill", "leg-fails"])
def test_a_resync_cut_short_then_rerun_or_catch_up_loses_nothing(pair, pdisks, name: str, how: str) -> None:
    """The cutover hands the last delta to the kernel's resync. If that resync is cut short
    (dmmig killed, or the leg failing mid-resync), the regions it had not copied yet must be
    found again by the rerun (or the catch-up copy), even when era moved on in between: here
    `dmmig dirty` (an operator's look at the delta, which rolls the era over) runs between the
    last round and the cutover."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=4), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    # every other 64 KiB region of the first 16 MiB: 128 regions for the kernel to resync
    w = start_writer(a, top, rec, seed=4, blocks="0:4096", count="2000")
    assert w.wait(120).rc == 0
    a.dmmig("dirty", name)
    throttle = "/sys/module/dm_mirror/parameters/raid1_resync_throttle"
    a.sh(f"echo 1 > {throttle}")  # 1% of kcopyd's pace: the cut surely lands mid-resync
    try:
        job = a.spawn([DMMIG, "cutover", name, "--nbd-timeout", "3"])
        for _ in range(400):
            st = json.loads(a.dmmig("status", name, "--json").out)
            if st["journal"].get("mirror", {}).get("era"):
                break
            time.sleep(0.05)
        m = st["devices"][f"dmmig-{name}"].get("mirror")
        assert m and m["in_sync"] < m["regions"], st
        if how == "sigkill":
            job.signal(9)
            job.wait()
        else:
            b.run(["pkill", "-9", "qemu-nbd"])
            r = job.wait(120)
            assert r.rc == 8 and "failed during the resync" in r.err, (r.rc, r.err)
    finally:
        a.sh(f"echo 100 > {throttle}")
    if how == "leg-fails":
        a.dmmig("copy", name, "--json")           # catch-up: back to linear over era, resend
    a.dmmig("cutover", name)
    check(b, dest, 4, rec)
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)


def test_dmmig_killed_inside_a_rounds_suspended_window_leaves_the_disk_running(pair, pdisks, name: str) -> None:
    """Each round suspends the top device for its snapshot: a dmmig SIGKILLed right then must
    not leave the guest's disk frozen (its guard resumes it), and a rerun completes the copy."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=7), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    dm = a.run(["readlink", "-f", top]).out.strip().rsplit("/", 1)[1]
    w = start_writer(a, top, rec, seed=7, rate="300", blocks="0:2048")
    r = a.py(KILL_WHEN_SUSPENDED, dm, DMMIG, *copy_args(name, dest))
    assert "killed while suspended" in r.out, r.out
    wait_resumed(a, dm)
    st = json.loads(a.dmmig("status", name, "--json").out)
    assert any("the guard resumed it" in p for p in st["problems"]), st["problems"]
    a.dmmig(*copy_args(name, dest))
    a.dmmig("cutover", name)
    slow = stop_writer(a, w)
    assert slow["max_latency_ms"] < 15000, slow
    check(b, dest, 7, rec)
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)
