"""Issue 4 on two kernels: cutover to dm-mirror, leg failures, finish, verify.

The oracle is the writer's own record (tests/tools/oracle.py) read back on the destination,
and digests of whole devices; never dmmig's own view."""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.kernel.steps import (
    DMMIG,
    check,
    cleanup,
    copy_args,
    digest,
    inject,
    migrate_to_mirror,
    retarget,
    start_writer,
    status,
    statuses,
    stop_writer,
    wait_leg_failed,
    wait_resumed,
)
from tests.rig.output import summary
from tests.rig.pair import B_IP
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20
BLOCK = 64 << 10  # era block = mirror region


def test_full_migration_under_writer(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=21), db(64)
    top = f"/dev/mapper/dmmig-{name}"
    rec1, rec2 = f"{a.shared}/{name}.rec1", f"{a.shared}/{name}.rec2"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w1 = start_writer(a, top, rec1, seed=21, rate="1000", blocks="0:2048")
    a.dmmig(*copy_args(name, dest, "--converge", "1M", "--max-rounds", "4"))
    cut = summary(a.dmmig("cutover", name, "--json").out)   # the writer keeps writing across it
    st = status(a, name)
    assert st["journal"]["phase"] == "mirroring"
    m = st["devices"][f"dmmig-{name}"]["mirror"]
    assert m["healthy"] and m["in_sync"] == m["regions"] == 64 * MiB // BLOCK, m
    # at a glance, from the kernel's own tables and status lines
    row = next(ln for ln in a.dmmig("status").out.splitlines() if ln.startswith(name + " "))
    assert row.split()[1] == "mirroring" and "mirrored, in sync (16 parts)" in row and row.endswith(" ok"), row
    assert "more line(s), one per mirror part" in a.dmmig("status", name).out
    # the export acknowledges only stable writes (O_DSYNC): no flush is sent to the leg, neither by
    # the resync's log flushes nor while the writer writes through the mirror
    leg = os.path.basename(st["journal"]["mirror"]["nbd"])
    cache = a.run(["cat", f"/sys/block/{leg}/queue/write_cache"]).out.strip()
    # a second writer only in mirror mode, on blocks nobody wrote before: they can reach the
    # destination through the mirror and nothing else (no copy runs after the cutover)
    w2 = start_writer(a, top, rec2, seed=21, rate="1000", blocks="8192:10240")
    time.sleep(2)
    stop_writer(a, w2)
    stop_writer(a, w1)
    flushes = int(a.run(["cat", f"/sys/block/{leg}/stat"]).out.split()[15])
    assert (flushes, cache) == (0, "write through"), "flushes reached the NBD leg"
    v = a.dmmig("verify", name, "--json", check=False)
    assert v.rc == 0 and summary(v.out)["mismatches"] == [], v.out
    check(b, dest, 21, rec1, rec2)
    assert digest(a, origin) == digest(b, dest)
    assert cut["suspended_seconds"] < 5, cut
    fin = a.dmmig("finish", name)
    assert "linear over its origin" in fin.out
    st = status(a, name)
    assert st["journal"]["phase"] == "wrapped" and list(st["devices"]) == [f"dmmig-{name}"], st
    check(a, origin, 21, rec1, rec2)  # the source still holds everything too
    cleanup(a, b, name, rec1, rec2)


def test_writes_between_the_era_query_and_the_swap_reach_the_destination(pair, pdisks, name: str) -> None:
    """The cutover's second step (cutover._add_regions): a write that lands after its era query
    and before its swap is on leg 0 only and marked in no log; only the second query and swap
    hand it to the kernel's resync. The writer goes through the blocks in turn and writes each
    once, so no later write through the mirror carries a block over instead (the random writer
    of test_full_migration_under_writer rewrites them, and hid a cutover without that step).
    The cutover waits on the destination (its connection, export, tunnel, NBD attach) between
    the query and the swap: hundreds of the writer's writes fall in there."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=23), db(64)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    w = start_writer(a, top, rec, seed=23, rate="300", blocks="0:16384", sequential="")
    cut = summary(a.dmmig("cutover", name, "--json").out)
    done = stop_writer(a, w)
    assert done["writes"] < 16384, done  # no block written twice
    check(b, dest, 23, rec)  # every acknowledged write is on the destination
    assert len(cut["pauses"]) == 2, cut  # and some of them came between the query and the swap
    a.dmmig("finish", name)
    check(a, origin, 23, rec)
    cleanup(a, b, name, rec)


@pytest.mark.parametrize("transport", ["ssh", "nbd"])
def test_cutover_asks_the_destination_when_the_copys_export_is_gone(pair, pdisks, name: str, transport: str) -> None:
    """The cutover first attaches the export the copy left running (--transport ssh: through
    its tunnel; nbd: over TCP with TLS), without a call to the agent; when that export is gone
    (its qemu-nbd died), it asks the agent, which starts it again, and goes on (ssh: with a
    fresh tunnel): the resync reaches the destination."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=6), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest, *(["--transport", "nbd", "--nbd-address", B_IP] if transport == "nbd" else [])))
    a.py(WRITE_BLOCKS, top, f"0:{32 * MiB}:{2 * BLOCK}")  # every other region: 16 MiB to resync
    pid = b.run(["cat", f"/run/dmmig/{name}.qemu-nbd.pid"]).out.strip()
    b.run(["kill", pid])
    for _ in range(100):
        if b.run(["kill", "-0", pid], check=False).rc != 0:
            break
        time.sleep(0.1)
    cut = summary(a.dmmig("cutover", name, "--json").out)
    assert "wait for the destination" in cut["seconds"], cut  # it asked the agent
    assert cut["resync_regions"] == 256, cut
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name)


# 4 KiB random blocks: arguments DEV OFFSET... [DEV OFFSET...]: a path starts the next device's
# offsets, each OFF or START:STOP:STEP (the rig's console loses bytes of very long lines)
WRITE_BLOCKS = r"""
import mmap, os, sys
buf = mmap.mmap(-1, 4096)
fd = -1
for a in sys.argv[1:]:
    if a.startswith("/"):
        if fd >= 0:
            os.close(fd)
        fd = os.open(a, os.O_WRONLY | os.O_DIRECT)
        continue
    for off in (range(*map(int, a.split(":"))) if ":" in a else [int(a)]):
        buf[:] = os.urandom(4096)
        os.pwrite(fd, buf, off)
os.close(fd)
"""

DIGEST_AT = r"""
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(" ".join(hashlib.sha256(os.pread(fd, 4096, int(o))).hexdigest()[:16] for o in sys.argv[2:]))
"""


def test_resync_covers_exactly_what_was_written_after_the_last_round(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, under = da(32, fill_seed=3), db(32)
    # the destination disk is a dm device of the test's own on b, so its writes can be slowed
    # down after the copy: then the kernel's resync is surely still running at dmmig's first look
    slow = f"dl-{name}"
    b.run(["dmsetup", "create", slow, "--table", f"0 {32 * 2048} linear {under} 0"])
    dest = f"/dev/mapper/{slow}"
    try:
        a.dmmig("wrap", name, origin)
        a.dmmig("prepare", name)
        before = summary(a.dmmig(*copy_args(name, dest)).out)
        # after the last round: 4 KiB writes into regions 3, 10 and 11 (two in 11, one at its end)
        offs = [3 * BLOCK + 4096, 10 * BLOCK, 11 * BLOCK, 12 * BLOCK - 4096]
        a.py(WRITE_BLOCKS, f"/dev/mapper/dmmig-{name}", *map(str, offs))
        src = a.py(DIGEST_AT, origin, *map(str, offs)).out.split()
        assert b.py(DIGEST_AT, dest, *map(str, offs)).out.split() != src  # not on b yet
        # every write to b's disk now waits 3 s (reads do not): far longer than from the
        # mirror's resume to dmmig's first status (0.1-0.5 s in the rig), far shorter than the
        # leg's NBD timeout
        retarget(b, slow, "delay {under} 0 0 {under} 0 3000")
        cut = summary(a.dmmig("cutover", name, "--json").out)
        assert cut["resync_regions"] == 3 and cut["resync_bytes"] == 3 * BLOCK, cut
        # the parts are cut where the delta lies: each of the three in a part of its own, recovered
        # at once (equal parts of 2 MiB put all three in the first, one after the other)
        assert cut["resync_regions_most_in_a_part"] == 1, cut
        # and so are the targets the kernel runs (its table, not dmmig's count): three lines
        spans = [tuple(map(int, ln.split()[:2])) for ln in
                 a.run(["dmsetup", "table", f"dmmig-{name}"]).out.splitlines()]
        lines = {next(i for i, (s, n) in enumerate(spans) if s <= r * BLOCK // 512 < s + n) for r in (3, 10, 11)}
        assert len(lines) == 3, spans
        # the kernel's own view of the log we wrote, at dmmig's first look after the resume:
        # those 3 regions out of sync, never more
        assert cut["kernel_out_of_sync_first_seen"] == 3, cut
        # and the log it rewrote since parses with our reader: every region in sync now
        logs = status(a, name)["journal"]["mirror"]["log_devs"]
        parsed = json.loads(a.py("import json, sys\nfrom dmmig.core import mirrorlog\n"
                                 "print(json.dumps([mirrorlog.parse(mirrorlog.read(d, 4096)) "
                                 "for d in sys.argv[1:]]))", *logs).out)
        assert sum(nr for nr, _ in parsed) == 32 * MiB // BLOCK and all(not d for _, d in parsed), parsed
        st = status(a, name)
        assert st["journal"]["mirror"]["resync_ranges"] == [[3, 4], [10, 12]], st["journal"]["mirror"]
        # nothing but the kernel's resync moved them: no copy ran after `before`
        assert st["journal"]["copy"]["rounds"][-1]["read"] == before["rounds"][-1]["read"]
        assert b.py(DIGEST_AT, dest, *map(str, offs)).out.split() == src
        assert digest(a, origin) == digest(b, dest)
        a.dmmig("finish", name)
        cleanup(a, b, name)
    finally:
        b.run(["dmsetup", "remove", slow], check=False)


def repair(b: UmlHost, how: str, flakey: str | None) -> None:
    if how == "link-down":
        b.run(["ip", "link", "set", "vec0", "up"])
        for _ in range(50):
            if b.run(["ping", "-c1", "-W1", "192.168.200.1"], check=False).rc == 0:
                break
    elif how == "flakey":
        assert flakey
        retarget(b, flakey, "linear {under} 0")
    # kill-server: nothing; the next copy restarts the export


@pytest.mark.parametrize("how", ["kill-server", "link-down", "flakey"])
def test_leg_failure_loses_nothing_then_catch_up_then_abort(pair, pdisks, name: str, how: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=9), db(32)
    flakey = None
    if how == "flakey":  # a dm device of the test's own under the export on b
        flakey = f"fl-{name}"
        b.run(["dmsetup", "create", flakey, "--table", f"0 {32 * 2048} linear {dest} 0"])
        dest = f"/dev/mapper/{flakey}"
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    try:
        migrate_to_mirror(a, name, origin, dest)
        for round_ in (1, 2):
            # disjoint blocks per round: each record is then the whole truth for its blocks
            w = start_writer(a, top, f"{rec}{round_}", seed=9, rate="500",
                             blocks=f"{2048 * (round_ - 1)}:{2048 * round_}")
            time.sleep(1)
            # failed_at is stamped by a's clock: compare it with a's, never with this machine's
            t_fail = float(a.run(["date", "+%s.%N"]).out)
            inject(b, how, flakey)
            st = wait_leg_failed(a, name)
            time.sleep(1)
            stop_writer(a, w)  # asserts the writer never saw an error
            m = st["devices"][f"dmmig-{name}"]["mirror"]
            assert m["failed_at"] >= t_fail and "failed since" in " ".join(st["problems"]), (t_fail, st)
            check(a, origin, 9, *(f"{rec}{i}" for i in range(1, round_ + 1)))  # nothing lost on the source
            repair(b, how, flakey)
            if round_ == 1:  # catch up: copy what era recorded since the cutover, then mirror again
                a.dmmig("copy", name)
                cut = summary(a.dmmig("cutover", name, "--json", "--nbd-timeout", "3").out)
                # at most the writer's 128 regions: era is re-read one era back (writes in flight
                # at the last round's snapshot), so the kernel may resend the last round's blocks
                assert cut["resync_regions"] <= 2048 * 4096 // BLOCK, cut
                check(b, dest, 9, f"{rec}1")
                assert digest(a, origin) == digest(b, dest)
            else:  # give up: back to linear over the origin, nothing left on either host
                a.dmmig("abort", name)
                st = status(a, name)
                assert st["journal"]["phase"] == "wrapped" and list(st["devices"]) == [f"dmmig-{name}"]
                check(a, origin, 9, f"{rec}1", f"{rec}2")
        cleanup(a, b, name, f"{rec}1", f"{rec}2")
    finally:
        repair(b, how, flakey)
        if flakey:
            b.run(["dmsetup", "remove", flakey], check=False)


KILL_WHEN_FILE = r"""
import os, signal, subprocess, sys, time
path, argv = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while p.poll() is None:
    if os.path.exists(path):
        p.send_signal(signal.SIGKILL)
        print("killed")
        break
    time.sleep(0.005)
print("rc", p.wait())
"""


def test_sigkill_during_cutover_then_abort_or_rerun(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=4), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    dm = os.path.basename(a.run(["readlink", "-f", top]).out.strip())
    w = start_writer(a, top, rec, seed=4, rate="500", blocks="0:4096")
    # 1) killed once its leg is up and its logs exist, about to swap: the cutover has no
    # suspended window of its own (each swap is one resume ioctl), so the guest's disk never
    # waits on dmmig; abort finds the leg, the tunnel and the log devices and removes them
    r = a.py(KILL_WHEN_FILE, f"/run/dmmig/{name}.mirror-log", DMMIG, "cutover", name)
    assert "killed" in r.out, r.out
    wait_resumed(a, dm)
    st = status(a, name)
    assert st["problems"], st
    a.dmmig("abort", name)
    assert not a.run(["losetup", "-j", f"/run/dmmig/{name}.mirror-log"]).out.strip()
    assert stop_writer(a, w)["max_latency_ms"] < 15000
    check(a, origin, 4, rec)
    st = status(a, name)
    assert st["journal"]["phase"] == "wrapped" and list(st["devices"]) == [f"dmmig-{name}"], st
    # 2) killed while the kernel resyncs: a rerun completes it
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    a.py(WRITE_BLOCKS, top, f"0:{512 * BLOCK}:{2 * BLOCK}")  # every other region: 16 MiB to resync
    throttle = "/sys/module/dm_mirror/parameters/raid1_resync_throttle"
    a.sh(f"echo 1 > {throttle}")  # 1% of kcopyd's pace: the kill surely lands mid-resync
    try:
        job = a.spawn([DMMIG, "cutover", name])
        for _ in range(200):
            st = status(a, name)
            if st["journal"].get("mirror", {}).get("era"):
                break
            time.sleep(0.05)
        job.signal(9)
        job.wait()
        m = status(a, name)["devices"][f"dmmig-{name}"]["mirror"]
        assert m["in_sync"] < m["regions"], m
    finally:
        a.sh(f"echo 100 > {throttle}")
    a.dmmig("cutover", name)
    st = status(a, name)
    assert st["journal"]["phase"] == "mirroring" and st["devices"][f"dmmig-{name}"]["mirror"]["healthy"]
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)


def test_verify_names_a_corrupted_block(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=6), db(32)
    migrate_to_mirror(a, name, origin, dest)
    assert a.dmmig("verify", name).rc == 0
    b.py(WRITE_BLOCKS, dest, str(5 * MiB + 12288))  # behind the mirror's back, on b
    r = a.dmmig("verify", name, "--chunk", "64K", "--json", check=False)
    assert r.rc == 9, (r.rc, r.err)
    assert summary(r.out)["mismatches"] == [{"offset": 5 * MiB, "length": 64 << 10}], r.out
    assert "MISMATCH bytes 5242880-5308416" in a.dmmig("verify", name, "--chunk", "64K", check=False).out
    a.dmmig("abort", name)
    cleanup(a, b, name)


def test_parallel_cutovers_each_get_their_own_nbd_device(pair, pdisks, name: str) -> None:
    """Four cutovers at once, three times over (a rerun of cutover drops the leg and attaches a
    new one): each must get its own /dev/nbdX and every leg must stay healthy. Before,
    free_device() checked but did not reserve: two cutovers could pick the same device, and the
    loser's rollback detached the winner's leg."""
    a, b = pair
    da, db = pdisks
    names = [f"{name}{i}" for i in range(4)]
    origins = [da(8, fill_seed=40 + i) for i in range(4)]
    dests = [db(8) for _ in range(4)]
    for n, o, d in zip(names, origins, dests):
        a.dmmig("wrap", n, o)
        a.dmmig("prepare", n)
        a.dmmig(*copy_args(n, d))
    try:
        for rnd in range(3):
            jobs = [a.spawn([DMMIG, "cutover", n, "--json", "--nbd-timeout", "3"]) for n in names]
            res = [j.wait(300) for j in jobs]
            failed = {n: r.err.strip()[-400:] for n, r in zip(names, res) if r.rc != 0}
            assert not failed, f"round {rnd + 1}: cutovers failed: {failed}"
            devs = [summary(r.out)["nbd"] for r in res]
            assert len(set(devs)) == len(devs), f"round {rnd + 1}: one nbd device for two legs: {devs}"
            for n, dev in zip(names, devs):
                assert a.run(["test", "-e", f"/sys/block/{dev[5:]}/pid"], check=False).rc == 0, \
                    f"round {rnd + 1}: {n}'s leg {dev} was detached"
            # a leg detached under the mirror fails only at its next write: write (every disk, one
            # process), then look (every disk, one status)
            a.py(WRITE_BLOCKS, *(x for n in names for x in (f"/dev/mapper/dmmig-{n}", str(4096 * (rnd + 1)))))
            sts = statuses(a)
            for n in names:
                m = sts[n]["devices"][f"dmmig-{n}"]["mirror"]
                assert m["healthy"] and m["in_sync"] == m["regions"], (rnd + 1, n, m)
        for o, d in zip(origins, dests):
            assert digest(a, o) == digest(b, d)
    finally:  # the aborts at once too (each stops its own export on b); the leak check follows
        for j in [a.spawn([DMMIG, "abort", n]) for n in names]:
            j.wait(300)
        for n in names:
            a.dmmig("unwrap", n, check=False)
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0
