"""The handover gate on two kernels, without Xen: the destination asks exactly as its block
script's `add` will (dmmig.core.gate.ask), the source answers with `dmmig handover`. The oracle is
the writer's record read back on the destination."""
from __future__ import annotations

import json
import time

import pytest

from dmmig.core import gate
from tests.conftest import python
from tests.kernel.steps import (
    ASK,
    DMMIG,
    ask,
    check,
    cleanup,
    digest,
    hand_over,
    inject,
    migrate_to_mirror,
    start_writer,
    status,
    stop_writer,
    wait_leg_failed,
)
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]


@pytest.mark.parametrize("leg", ["healthy", "failed"])
def test_gate_vouches_for_the_disk_and_frees_it(pair, pdisks, name: str, leg: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=8), db(32)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    migrate_to_mirror(a, name, origin, dest)
    w = start_writer(a, top, rec, seed=8, rate="500", blocks="0:2048")
    time.sleep(1)
    if leg == "failed":  # after the sync and before the handover: the destination misses writes
        inject(b, "kill-server", None)
        wait_leg_failed(a, name)
        time.sleep(1)
    stop_writer(a, w)  # the guest is suspended now, as when `add` runs on the destination
    s = hand_over(a, b, name)
    assert (s["caught_up_bytes"] > 0) == (leg == "failed"), s
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0  # the export is gone: the disk is free
    check(b, dest, 8, rec)          # every acknowledged write is on the destination
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)


def test_gate_refuses_when_no_source_vouches(pair, pdisks, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=5), db(16)
    migrate_to_mirror(a, name, origin, dest)
    t = time.monotonic()
    # nobody runs `dmmig handover` on the source: the ask keeps trying until its deadline, then
    # refuses (how long that deadline is proves nothing more)
    rc, rep = ask(b, name, 1)
    assert rc == 3 and "refusing a disk that may have missed writes" in rep["refused"], rep
    assert time.monotonic() - t < 30
    # a source that waits, but for another disk, leaves this one's `add` to time out; the
    # source's wait counts from its gate's listen, and outlasts the 1 s ask below with room
    job = a.spawn([DMMIG, "handover", name, "--timeout", "10"])
    # the source's agent on b listens once SSH and the agent are up: seconds in a loaded rig
    # (a fixed 3 s once asked before it listened, and got 'no dmmig source is waiting')
    for _ in range(100):
        if b.run(["test", "-S", gate.socket_path("/run/dmmig", name)], check=False).rc == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the source's gate never listened on b: {job.wait(60)}")
    rc, rep = ask(b, "not-" + name, 1)
    assert rc == 3 and "no dmmig source is waiting to hand over not-" in rep["refused"], rep
    res = job.wait(60)
    assert res.rc == 8 and "did not ask" in res.err, res.err
    a.dmmig("abort", name)
    cleanup(a, b, name)


LISTENING_GATES = r"""
import sys
# /proc/net/unix: a listening socket has flags 00010000; its path stays listed after an unlink
n = sum(1 for ln in open("/proc/net/unix").read().splitlines()[1:]
        if len(ln.split()) >= 8 and ln.split()[3] == "00010000" and ln.split()[7].startswith(sys.argv[1])
        and "gate" in ln.split()[7])
print(n)
"""


def wait_listening(b: UmlHost, n: int, jobs: list) -> None:
    """Until N gate sockets listen in b's state dir (whatever their names)."""
    for _ in range(150):
        if int(b.py(LISTENING_GATES, "/run/dmmig/").out) >= n:
            return
        assert not any(j.done() for j in jobs), [j.wait(5) for j in jobs if j.done()]
        time.sleep(0.2)
    raise AssertionError(f"{n} gates never listened on b")


def test_two_handovers_into_one_host_each_get_their_own_question(pair, pdisks, name: str) -> None:
    """Two disks, two `dmmig handover` on a, so two agents on b, both waiting at once: each
    destination `add` must reach the agent waiting for its disk. Before, the second agent
    unlinked the first one's gate.sock and took both questions: one `add` got no answer."""
    a, b = pair
    da, db = pdisks
    names = [f"{name}a", f"{name}b"]
    seeds = [31, 32]
    origins = [da(16, fill_seed=s) for s in seeds]
    dests = [db(16), db(16)]
    recs = [f"{a.shared}/{n}.rec" for n in names]
    for n, o, d in zip(names, origins, dests):
        migrate_to_mirror(a, n, o, d)
    writers = [start_writer(a, f"/dev/mapper/dmmig-{n}", r, seed=s, rate="300", blocks="0:4096")
               for n, r, s in zip(names, recs, seeds)]
    time.sleep(1)
    for w in writers:
        stop_writer(a, w)
    jobs = [a.spawn([DMMIG, "handover", n, "--json", "--timeout", "60"]) for n in names]
    wait_listening(b, 2, jobs)  # both agents wait at once before either destination asks
    asks = [b.spawn([python(), "-c", ASK, "/run/dmmig", n, "25"]) for n in names]
    got = [j.wait(60) for j in asks]
    res = [j.wait(120) for j in jobs]
    for n, g, r in zip(names, got, res):
        assert g.rc == 0 and json.loads(g.out)["ok"], (n, g.out, g.err)
        assert r.rc == 0, (n, r.err)
    for n, o, d, s, r in zip(names, origins, dests, seeds, recs):
        check(b, d, s, r)  # every acknowledged write of each disk is on its own destination
        assert digest(a, o) == digest(b, d)
        a.dmmig("finish", n)
        cleanup(a, b, n, r)
    assert b.sh("ls /run/dmmig | grep gate.sock; true").out == ""  # both gates closed


CAP = 12.0  # gate.SUSPEND_CAP_S: the longest the source's top device may stay suspended


def test_a_link_that_black_holes_during_the_gate_never_freezes_the_disk_beyond_the_cap(
        pair, pdisks, name: str) -> None:
    """The link drops every packet from a to b (no RST, no FIN, as a black-holed route) while
    the source answers the gate: the leg has failed, so it must catch up over the network,
    and nothing comes back. Before, the agent calls had no deadline: the top device stayed
    suspended until TCP gave up (~15 min). Now it resumes at the cap, the answer is no, the
    destination refuses, and the guest's disk (a's) has every acknowledged write."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=12), db(32)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    migrate_to_mirror(a, name, origin, dest)  # NBD timeout 3 s
    a.run(["modprobe", "--dirname=/run/mods", "sch_netem"])
    w = start_writer(a, top, rec, seed=12, rate="200", blocks="0:2048")
    job = a.spawn([DMMIG, "handover", name, "--json", "--timeout", "90"])
    wait_listening(b, 1, [job])
    try:
        a.run(["tc", "qdisc", "add", "dev", "vec0", "root", "netem", "loss", "100%"])
        wait_leg_failed(a, name)  # the leg's requests timed out: the writer goes on on a's disk
        asked = b.spawn([python(), "-c", ASK, "/run/dmmig", name, "30"])  # b's answer still reaches a
        t = time.monotonic()
        while not job.done() and time.monotonic() - t < CAP + 20:
            time.sleep(0.5)
        assert job.done(), (f"`dmmig handover` still runs {CAP + 20:.0f}s after the destination asked, "
                            "with the top device suspended: no deadline on the agent calls")
        res = job.wait(10)
    finally:
        a.run(["tc", "qdisc", "del", "dev", "vec0", "root"], check=False)
    assert res.rc == 8 and "refused" in res.err, (res.rc, res.err)
    got = asked.wait(60)
    assert got.rc == 3, got.out  # the destination never had a yes: its add refuses
    s = stop_writer(a, w)
    h = status(a, name)["journal"]["mirror"]["handover"]
    print(f"\n[gate] suspended {h['seconds']:.2f}s (cap {CAP:.0f}s); writer max latency {s['max_latency_ms']:.0f} ms, "
          f"{s['writes_over_5ms']} writes over 5 ms; why: {h['why']}")
    assert not h["ok"] and h["seconds"] <= CAP + 1, h
    assert s["max_latency_ms"] <= (CAP + 3) * 1000, s  # the guest's view: never frozen past the cap
    check(a, origin, 12, rec)  # nothing lost on the disk that owns the guest
    a.dmmig("abort", name)
    cleanup(a, b, name, rec)
    assert gate.SUSPEND_CAP_S == CAP
