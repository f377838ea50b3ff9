"""Issue 13 on two kernels: what the destination's agent accepts, and what it refuses before
anything changes: a disk someone else uses, one of another block size, a path outside its
confinement; what it assumes about a disk it created (never that an LV reads as zeros); and
the agent's record of an incoming disk (handed over only once the `add` got the yes).

The oracles are the writer's record and device contents read back on each host, never
dmmig's own view."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from dmmig.core import gate
from tests.conftest import ORACLE, python
from tests.kernel.steps import (
    DMMIG,
    ask,
    check,
    cleanup,
    copy_args,
    digest,
    migrate_to_mirror,
    start_writer,
    stop_writer,
    wait_leg_failed,
    world,
)
from tests.rig.output import summary
from tests.rig.pair import B_IP, SSH_OPTS
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20
STATE = "/run/dmmig"

# what a destination `add` decides (dmmig.core.gate.incoming: ask the source, or not)
INCOMING = "import sys\nfrom dmmig.core import gate\nprint(gate.incoming(sys.argv[1], sys.argv[2]))"

ZERO_BLOCKS = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
lo, hi = int(sys.argv[2]), int(sys.argv[3])
print(sum(os.pread(fd, 4096, off) != bytes(4096) for off in range(lo, hi, 4096)))
"""


def refused(a: UmlHost, b: UmlHost, args: list[str], code: int, *needles: str) -> str:
    before = world(a, b)
    r = a.dmmig(*args, check=False, timeout=120)
    assert r.rc == code, (r.rc, r.out, r.err)
    for n in needles:
        assert n in r.err, (n, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert world(a, b) == before, "a refused copy changed something"
    return r.err


# ---- item 2: only a sparse file dmmig just created reads as zeros ---------------------------------

@pytest.fixture
def lvm_b(pair: tuple[UmlHost, UmlHost]) -> Iterator[UmlHost]:
    """LVM on b. Its root is this machine's (hostfs): /etc/lvm, where LVM keeps its archive and
    backups (the agent's lvcreate too), becomes a tmpfs copy for the test, and udev's event
    autoactivation (69-lvm.rules, which runs vgchange) is turned off."""
    b = pair[1]
    b.sh("mkdir -p /run/udev/rules.d && echo '# dmmig test: no LVM autoactivation' > /run/udev/rules.d/69-lvm.rules"
         " && udevadm control --reload")
    b.sh("rm -rf /run/lvm-etc && cp -a /etc/lvm /run/lvm-etc && mount -t tmpfs -o mode=755 tmpfs /etc/lvm"
         " && cp -a /run/lvm-etc/. /etc/lvm/")
    try:
        yield b
    finally:
        b.sh("umount /etc/lvm; rm -rf /run/lvm-etc /run/udev/rules.d/69-lvm.rules; udevadm control --reload",
             check=False)


def test_a_created_lv_is_copied_in_full_not_assumed_zero(pair, pdisks, lvm_b, name: str) -> None:
    """A plain linear LV reuses the extents of a removed one and reads its old data: the zero
    half of the source must be written there, not skipped."""
    a, b = pair
    da, db = pdisks
    vg = f"vg{uuid.uuid4().hex[:6]}"
    pv = db(64)
    origin = da(32)
    # the source: its first 16 MiB the oracle's, the rest zeros
    view = f"view-{name}"
    a.run(["dmsetup", "create", view, "--table", f"0 {16 * 2048} linear {origin} 0"])
    try:
        a.run([python(), ORACLE, "fill", f"/dev/mapper/{view}", "--seed", "12"])
    finally:
        a.run(["dmsetup", "remove", view])
    try:
        b.run(["vgcreate", "--yes", vg, pv], timeout=120)
        b.run(["lvcreate", "--yes", "-L", "32M", "-n", "old", vg], timeout=120)
        b.run(["dd", "if=/dev/urandom", f"of=/dev/{vg}/old", "bs=1M", "count=32", "oflag=direct"])
        b.run(["lvremove", "--yes", f"{vg}/old"], timeout=120)
        new = f"/dev/{vg}/new{name}"
        a.dmmig("wrap", name, origin)
        a.dmmig("prepare", name)
        s = summary(a.dmmig(*copy_args(name, new, "--create")).out)
        assert b.run(["test", "-b", new], check=False).rc == 0, "the LV was not created"
        # the oracle's half, and the zero half, read back on b
        chk = b.run([python(), ORACLE, "check", new, "--seed", "12", "--blocks", "0:4096"], check=False)
        assert chk.rc == 0, chk.out
        stale = int(b.py(ZERO_BLOCKS, new, str(16 * MiB), str(32 * MiB)).out)
        assert stale == 0, f"{stale} blocks of the zero half hold the removed LV's data ({s})"
        assert digest(a, origin) == digest(b, new)
        assert s["skipped"] == 0, s  # nothing assumed zero on an LV
        a.dmmig("abort", name)
        # abort removes what dmmig created, an LV too
        assert b.run(["test", "-e", new], check=False).rc != 0, "abort left the created LV"
    finally:
        a.dmmig("abort", name, check=False)
        a.dmmig("unwrap", name, check=False)
        b.run(["vgremove", "--yes", "--force", vg], check=False, timeout=120)
        b.run(["pvremove", "--yes", pv], check=False, timeout=120)


# ---- item 4: handed over only once the `add` got the yes; a new migration starts afresh -----------

def test_a_yes_the_add_never_received_leaves_the_disk_incoming(pair, pdisks, name: str) -> None:
    """The destination's `add` gives up before the source's yes arrives: the disk is not handed
    over, so the next `add` asks again, and a disk that missed writes since is refused; the
    source's next answer catches it up."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=14), db(16)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    try:
        migrate_to_mirror(a, name, origin, dest)
        job = a.spawn([DMMIG, "handover", name, "--timeout", "60"])
        for _ in range(150):  # the source's agent on b waits for the question
            if b.run(["test", "-S", gate.socket_path(STATE, name)], check=False).rc == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the source's gate never listened on b: {job.wait(60)}")
        # every packet from b to a now takes 2 s: the source hears the question 2 s after the
        # `add` asked, and the `add` gives up after 1 s
        b.run(["modprobe", "--dirname=/run/mods", "sch_netem"])
        b.run(["tc", "qdisc", "add", "dev", "vec0", "root", "netem", "delay", "2000ms"])
        try:
            rc, rep = ask(b, name, 1)
            assert rc == 3 and "did not confirm" in rep["refused"], rep
            res = job.wait(120)
        finally:
            b.run(["tc", "qdisc", "del", "dev", "vec0", "root"], check=False)
        assert res.rc == 8 and "stopped waiting" in res.err, (res.rc, res.err)
        # not handed over: the next `add` asks
        assert b.py(INCOMING, STATE, name).out.strip() == "True"
        assert "not handed over" in b.dmmig("status", name).out
        # the guest writes on; the export stopped at the yes, so b misses these writes
        w = start_writer(a, top, rec, seed=14, rate="500", blocks="0:1024")
        wait_leg_failed(a, name)
        time.sleep(0.5)
        stop_writer(a, w)
        assert b.run([python(), ORACLE, "check", dest, "--seed", "14", "--record", rec], check=False).rc == 1
        rc, rep = ask(b, name, 1)  # nobody vouches: refused at the deadline (its length proves nothing)
        assert rc == 3 and "refusing a disk that may have missed writes" in rep["refused"], rep
        # the source answers the next question: it copies what b missed first
        job = a.spawn([DMMIG, "handover", name, "--json", "--timeout", "60"])
        rc, rep = ask(b, name, 35)
        res = job.wait(120)
        assert rc == 0 and rep["ok"] and res.rc == 0, (rep, res.err)
        assert summary(res.out)["caught_up_bytes"] > 0
        check(b, dest, 14, rec)
        assert digest(a, origin) == digest(b, dest)
        assert b.py(INCOMING, STATE, name).out.strip() == "False"  # handed over now
        a.dmmig("finish", name)
    finally:
        b.run(["tc", "qdisc", "del", "dev", "vec0", "root"], check=False)
        a.dmmig("abort", name, check=False)
    cleanup(a, b, name, rec)


def test_a_stale_handed_over_record_does_not_disable_the_next_gate(pair, pdisks, name: str) -> None:
    """Migration 1 into b is handed over, but its source never told b's agent to forget it
    (the agent was unreachable at finish). Migration 2 of the same disk into b must be asked
    for at its `add`, like any other."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=15), db(16)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    try:
        migrate_to_mirror(a, name, origin, dest)
        job = a.spawn([DMMIG, "handover", name, "--timeout", "60"])
        rc, rep = ask(b, name, 35)
        assert rc == 0 and rep["ok"] and job.wait(120).rc == 0, rep
        b.run(["mv", "/run/ssh/authorized_keys", "/run/ssh/authorized_keys.off"])
        try:
            r = a.dmmig("finish", name, check=False)
        finally:
            b.run(["mv", "/run/ssh/authorized_keys.off", "/run/ssh/authorized_keys"])
        assert r.rc == 8 and "left behind" in r.err, (r.rc, r.err)
        assert b.py(INCOMING, STATE, name).out.strip() == "False"  # b's stale record: handed over
        # migration 2 of the same disk onto the same path
        a.dmmig("prepare", name)
        a.dmmig(*copy_args(name, dest, "--converge", "1M"))
        a.dmmig("cutover", name, "--nbd-timeout", "3")
        assert b.py(INCOMING, STATE, name).out.strip() == "True", "the next migration's `add` would ask no gate"
        assert "not handed over" in b.dmmig("status", name).out
        # and it matters: b's disk misses the writes made after its export died
        w = start_writer(a, top, rec, seed=15, rate="500", blocks="0:1024")
        b.run(["pkill", "-9", "qemu-nbd"])
        wait_leg_failed(a, name)
        time.sleep(0.5)
        stop_writer(a, w)
        assert b.run([python(), ORACLE, "check", dest, "--seed", "15", "--record", rec], check=False).rc == 1
        rc, rep = ask(b, name, 1)  # nobody vouches
        assert rc == 3 and "refusing a disk that may have missed writes" in rep["refused"], rep
    finally:
        b.run(["mv", "/run/ssh/authorized_keys.off", "/run/ssh/authorized_keys"], check=False)
        a.dmmig("abort", name, check=False)
    check(a, origin, 15, rec)
    cleanup(a, b, name, rec)


def test_a_new_migration_after_finish_copies_everything_again(pair, pdisks, name: str) -> None:
    """`finish` (without --remove) leaves the disk wrapped, its journal naming the last copy.
    A new `prepare` makes a new era device: the copy state of the last migration (base done,
    era numbers) means nothing for it, and a copy must start with the base again."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=20), db(16)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    try:
        migrate_to_mirror(a, name, origin, dest)
        a.dmmig("finish", name)
        # the disk lives on here (a copy, not a move); the guest writes, then it is copied again
        a.run([python(), ORACLE, "write", top, "--seed", "20", "--record", rec, "--count", "500"])
        a.dmmig("prepare", name)
        s = summary(a.dmmig(*copy_args(name, dest)).out)
        assert s["read"] >= 16 * MiB, s  # the base, in full
        check(b, dest, 20, rec)
        assert digest(a, origin) == digest(b, dest)
    finally:
        a.dmmig("abort", name, check=False)
    cleanup(a, b, name, rec)


# ---- item 5: a destination someone else uses -------------------------------------------------------

@pytest.mark.parametrize("kind", ["device", "file"])
def test_a_destination_a_process_holds_open_is_refused(pair, pdisks, name: str, kind: str) -> None:
    """qemu (a device model) opens a disk without O_EXCL and registers no holder: the agent
    finds it among the processes' open files."""
    a, b = pair
    da, db = pdisks
    origin = da(16, fill_seed=16)
    dest = db(16) if kind == "device" else f"/dev/shm/held-{name}.img"
    if kind == "file":
        b.run(["truncate", "-s", "16M", dest])
    holder = b.spawn(["sh", "-c", f"exec 3<>{dest}; echo ready; exec sleep 120"])
    try:
        for _ in range(50):
            if b.sh(f"ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c -- '-> {dest}$'", check=False).out.strip() not in (
                    "", "0"):
                break
            time.sleep(0.1)
        a.dmmig("wrap", name, origin)
        a.dmmig("prepare", name)
        err = refused(a, b, copy_args(name, dest), 7, dest, "in use", "sleep")
        assert "pid" in err, err
    finally:
        holder.signal(9)
        holder.wait()
        a.dmmig("abort", name, check=False)
        a.dmmig("unwrap", name, check=False)
        if kind == "file":
            b.run(["rm", "-f", dest])


def test_the_destination_of_another_incoming_migration_is_refused(pair, pdisks, name: str) -> None:
    """Disk 1's copy onto D stopped (its export is gone, its record stays on b): disk 2 may
    not be copied onto D too."""
    a, b = pair
    da, db = pdisks
    o1, o2, dest = da(16, fill_seed=17), da(16, fill_seed=18), db(16)
    n2 = name + "x"
    a.dmmig("wrap", name, o1)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest))
    b.run(["pkill", "-9", "qemu-nbd"])
    a.dmmig("wrap", n2, o2)
    a.dmmig("prepare", n2)
    try:
        refused(a, b, copy_args(n2, dest), 7, dest, name)
        assert digest(b, dest) == digest(a, o1), "disk 1's destination was overwritten"
    finally:
        for n in (n2, name):
            a.dmmig("abort", n, check=False)
            a.dmmig("unwrap", n, check=False)


# ---- item 6: the logical block size --------------------------------------------------------------

def test_a_destination_with_another_logical_block_size_is_refused(pair, pdisks, name: str) -> None:
    """blkfront keeps its sector size across the resume: a 512-byte disk may not move onto a
    4096-byte one."""
    a, b = pair
    da, _ = pdisks
    origin = da(16, fill_seed=19)
    img = f"/dev/shm/4k-{name}.img"
    b.run(["truncate", "-s", "16M", img])
    dest = b.run(["losetup", "--find", "--show", "--sector-size", "4096", img]).out.strip()
    try:
        a.dmmig("wrap", name, origin)
        a.dmmig("prepare", name)
        refused(a, b, copy_args(name, dest), 3, dest, "logical block size", "4096", "512")
    finally:
        a.dmmig("abort", name, check=False)
        a.dmmig("unwrap", name, check=False)
        b.run(["losetup", "-d", dest])
        b.run(["rm", "-f", img])


# ---- item 10: the agent's confinement --------------------------------------------------------------

AGENT_CALLS = r"""
import json, sys
from dmmig.core.records import Destination
from dmmig.flows.session import Remote

dest, calls = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = Remote(Destination.from_json(dest, "the test's destination"))
out = []
try:
    for op, kw in calls:
        try:
            out.append({"ok": r.agent.call(op, **kw)})
        except Exception as e:
            out.append({"error": getattr(e, "message", str(e)), "kind": type(e).__name__})
finally:
    r.close()
print(json.dumps(out))
"""


def agent_calls(a: UmlHost, calls: list[tuple[str, dict]]) -> list[dict]:
    dest = {"host": B_IP, "user": "root", "port": 22, "known_hosts": SSH_OPTS[1], "identity": SSH_OPTS[3],
            "remote_dmmig": DMMIG, "transport": "ssh", "disk": ""}
    return list(json.loads(a.py(AGENT_CALLS, json.dumps(dest), json.dumps(calls)).out))


def test_the_agent_touches_only_disks_it_may(pair, pdisks, name: str) -> None:
    """Over the real SSH channel, as a source (or whoever holds its key) would: no digest of a
    file that is no disk being migrated, no prepare of a file outside the agent's roots (the
    rig's b allows /dev/shm), no create larger than the space there, no digest beyond the
    disk."""
    a, b = pair
    _, db = pdisks
    dest = db(4)
    huge = f"/dev/shm/huge-{name}.img"
    outside = f"/run/outside-{name}.img"
    try:
        rep = agent_calls(a, [
            ("digest", {"path": "/etc/shadow", "offset": 0, "length": 4096, "chunk": 4096}),
            ("prepare_disk", {"name": name + "p", "path": "/etc/passwd", "size": 512}),
            ("prepare_disk", {"name": name + "o", "path": outside, "size": 1 << 20, "create": True}),
            ("prepare_disk", {"name": name + "h", "path": huge, "size": 1 << 40, "create": True}),
            ("prepare_disk", {"name": name, "path": dest, "size": 4 * MiB}),
            ("digest", {"name": name, "path": dest, "offset": 0, "length": 8 * MiB, "chunk": MiB}),
            ("digest", {"name": name, "path": dest, "offset": 0, "length": 4 * MiB, "chunk": MiB}),
            ("stop", {"name": name}),
        ])
        assert "error" in rep[0] and "/etc/shadow" in rep[0]["error"], rep[0]
        assert "ok" not in rep[0]
        assert "error" in rep[1] and "/etc/passwd" in rep[1]["error"], rep[1]
        assert "error" in rep[2] and outside in rep[2]["error"], rep[2]
        assert "error" in rep[3] and "free" in rep[3]["error"], rep[3]
        assert "ok" in rep[4], rep[4]
        assert "error" in rep[5] and "beyond" in rep[5]["error"], rep[5]
        assert len(rep[6]["ok"]["digests"]) == 4, rep[6]
        for f in (huge, outside):
            assert b.run(["test", "-e", f], check=False).rc != 0, f"{f} was created"
        # nbd/ is the exports' root-only home: it stays, empty
        # (the generations other tests' finish kept, NAME.warm.json, are theirs until forget)
        left = [f for f in b.sh(f"ls {STATE} {STATE}/nbd 2>/dev/null; true").out.split()
                if not f.endswith((".lock", ":")) and f != "nbd"
                and not (f.endswith(".warm.json") and not f.startswith(f"{name}."))]
        assert left == [], f"a refused call left a record: {left}"
    finally:
        b.run(["rm", "-f", huge, outside])
        b.sh(f"rm -f {STATE}/{name}*.dest.json")
