"""Issue 16 part 1 on two kernels: after a move a -> b (manual verbs), the copy back b -> a
sends only what b wrote since (warm), and anything that breaks the proof makes it a full copy."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ORACLE, python
from tests.kernel.steps import DMMIG, copy_args, digest, hand_over, inject, start_writer, stop_writer, wait_leg_failed
from tests.rig.output import summary
from tests.rig.pair import A_IP, AGENT_CONF, AGENT_CONF_TEXT, SSH_OPTS, sshd_config
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20
BS = 4096  # the oracle's block
SEED = 41
B_BLOCKS = (4096, 4608)  # b's writer: 2 MiB at 16 MiB, away from a's (the first 16 MiB)
ZEROS_AT, ZEROS = 24 * MiB, 256 << 10  # b's all-zero write, where a's writer never wrote
W = (B_BLOCKS[1] - B_BLOCKS[0]) * BS + ZEROS  # what b writes: all a warm copy may send


@pytest.fixture
def back(pair: tuple[UmlHost, UmlHost]) -> Iterator[None]:
    """An sshd on a, and b's key and a's host key for it: the way back b -> a."""
    a, b = pair
    cfg = (sshd_config(A_IP).replace("/run/ssh/", "/run/ssh-back/").replace("/run/sshd.pid", "/run/sshd-back.pid"))
    a.sh("mkdir -p -m 700 /run/ssh-back /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /run/ssh-back/host_ed25519")
    a.run(["sh", "-c", "cat > /run/ssh-back/sshd_config"], input=cfg.encode())
    a.run(["sh", "-c", f"cat > {AGENT_CONF}"], input=AGENT_CONF_TEXT.encode())
    b.sh("test -e /run/ssh/id_ed25519 || ssh-keygen -q -t ed25519 -N '' -f /run/ssh/id_ed25519")
    pub = b.run(["cat", "/run/ssh/id_ed25519.pub"]).out
    a.run(["sh", "-c", "cat > /run/ssh-back/authorized_keys"], input=pub.encode())
    key = a.run(["cat", "/run/ssh-back/host_ed25519.pub"]).out.split()
    b.run(["sh", "-c", "cat > /run/ssh/known_hosts"], input=f"{A_IP} {key[0]} {key[1]}\n".encode())
    a.run(["/usr/sbin/sshd", "-f", "/run/ssh-back/sshd_config"])
    try:
        yield
    finally:
        a.sh("kill $(cat /run/sshd-back.pid); rm -rf /run/ssh-back /run/sshd-back.pid", check=False)


def back_args(name: str, dest: str, *extra: str) -> list[str]:
    return ["copy", name, f"root@{A_IP}", "--dest-disk", dest, "--remote-dmmig", DMMIG, *SSH_OPTS, "--json",
            "--converge", "1M", *extra]


def to_mirror(a: UmlHost, name: str, origin: str, dest: str, rec: str) -> object:
    """a's disk to the mirror under a writer on a (its first 16 MiB), by the manual verbs:
    wrap, prepare, copy, cutover. Returns the writer, still writing."""
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w = start_writer(a, f"/dev/mapper/dmmig-{name}", rec, seed=SEED, rate="1000", blocks="0:4096")
    a.dmmig(*copy_args(name, dest, "--converge", "1M", "--max-rounds", "4"))
    a.dmmig("cutover", name, "--json")
    return w


def to_b(a: UmlHost, b: UmlHost, name: str, origin: str, dest: str, rec: str) -> None:
    """a -> b under a writer on a, by the manual verbs; the writer stops before finish (the
    operator stops the disk's users on a), and b wraps its disk (its users start there)."""
    w = to_mirror(a, name, origin, dest, rec)
    assert stop_writer(a, w)["writes"] > 100
    fin = a.dmmig("finish", name, "--remove")
    assert "recorded generation" in fin.out, fin.out
    assert "destination: recorded generation" in fin.out, fin.out
    wrap = b.dmmig("wrap", name, dest)
    assert "warm: era tracks every write" in wrap.err, wrap.err
    # b's era is not confined to one discard unit per piece (a's was): a discard there makes the
    # way back cold anyway, and the guest would pay the split for as long as it runs on b
    q = "/sys/class/block/$(basename $(readlink -f {}))/queue/discard_max_bytes"
    lim = b.sh(f"cat {q.format(dest)} {q.format(f'/dev/mapper/dmmig-{name}-era')}").out.split()
    assert lim[0] == lim[1], lim
    st = json.loads(b.dmmig("status", name, "--json").out)
    assert st["warm"]["role"] == "took-over" and st["warm"]["tracking"]["era_metadata_bytes"] > 0, st["warm"]


def write_on_b(b: UmlHost, name: str, rec: str) -> dict:
    """W bytes' worth of blocks on b through its top: the oracle's writer over 2 MiB, half of
    its 4 KiB writes all zeros, then 256 KiB of zeros in a row where a's disk holds data (a
    guest's choice: a warm copy that skipped zero blocks would leave a's data there). REC and
    REC.zeros: their records."""
    top = f"/dev/mapper/dmmig-{name}"
    w = start_writer(b, top, rec, seed=SEED, count="600", zeros="0.5", blocks=f"{B_BLOCKS[0]}:{B_BLOCKS[1]}")
    w.wait(120)  # type: ignore[attr-defined]
    out = json.loads(b.run(["cat", rec]).out)
    assert out["writes"] == 600 and out["zero"], out
    lo = ZEROS_AT // BS
    z = start_writer(b, top, rec + ".zeros", seed=SEED, count=str(ZEROS // BS), zeros="1", sequential="",
                     blocks=f"{lo}:{lo + ZEROS // BS}")
    z.wait(120)  # type: ignore[attr-defined]
    assert len(json.loads(b.run(["cat", rec + ".zeros"]).out)["zero"]) == ZEROS // BS
    return out


def forget_records(a: UmlHost, *records: str) -> None:
    a.run(["rm", "-f", *(r + x for r in records for x in ("", ".started", ".zeros", ".zeros.started"))])


def oracle(h: UmlHost, dev: str, *records: str) -> None:
    argv = [python(), ORACLE, "check", dev, "--seed", str(SEED)]
    for r in records:
        argv += ["--record", r]
    res = h.run(argv, check=False)
    assert res.rc == 0, res.out


def finish_back(a: UmlHost, b: UmlHost, name: str) -> None:
    """cutover and finish on b (the manual verbs), verify first; then nothing of dmmig stays."""
    b.dmmig("cutover", name, "--json")
    v = summary(b.dmmig("verify", name, "--json").out)
    assert v["mismatches"] == [], v
    fin = b.dmmig("finish", name, "--remove")
    assert "recorded generation" in fin.out, fin.out
    # the next generation, the other way round; forget drops it on both hosts
    assert "forgot the generation" in a.dmmig("forget", name).out
    assert "forgot the generation" in b.dmmig("forget", name).out


def test_copy_back_sends_only_what_b_wrote(pair, pdisks, back, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    rec_a, rec_b = f"{a.shared}/{name}.reca", f"{a.shared}/{name}.recb"
    to_b(a, b, name, origin, dest, rec_a)
    write_on_b(b, name, rec_b)
    dry = b.dmmig("copy", name, "--dry-run").out
    assert "warm:" in dry and "MiB to send" in dry, dry
    s = summary(b.dmmig(*back_args(name, origin)).out)
    print(f"[warm] W={W} read={s['read']} sent={s['sent']} zeroed={s['zeroed']} seconds={s['seconds']:.2f}: "
          f"{s['warm']}")
    assert s["warm"].startswith("warm: "), s["warm"]
    # only b's blocks (64 KiB era blocks, aligned with b's writes: no rounding): nothing else read,
    # sent or zeroed; the zeros written as zeros (NBD write-zeroes)
    assert s["base"] is None, s
    assert 0 < s["read"] <= W and s["sent"] + s["zeroed"] <= W and s["zeroed"] >= ZEROS, s
    finish_back(a, b, name)
    oracle(a, origin, rec_a, rec_b, rec_b + ".zeros")  # every acknowledged write, zeros included
    assert digest(a, origin) == digest(b, dest)
    forget_records(a, rec_a, rec_b)


def test_a_write_behind_dmmigs_back_on_a_makes_it_a_full_copy(pair, pdisks, back, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    rec_a, rec_b = f"{a.shared}/{name}.reca", f"{a.shared}/{name}.recb"
    to_b(a, b, name, origin, dest, rec_a)
    write_on_b(b, name, rec_b)
    # straight to a's kept disk, past everything of dmmig's, where b wrote nothing: a warm copy
    # would leave it there
    a.run(["dd", "if=/dev/urandom", f"of={origin}", "bs=4K", "count=1", "seek=9000", "oflag=direct"])
    s = summary(b.dmmig(*back_args(name, origin)).out)
    print(f"[cold] read={s['read']} sent={s['sent']} zeroed={s['zeroed']} seconds={s['seconds']:.2f}: {s['warm']}")
    assert s["warm"].startswith("cold: full copy, because on the destination, "), s["warm"]
    assert "written since" in s["warm"], s["warm"]
    assert s["base"]["read"] == 64 * MiB, s
    finish_back(a, b, name)
    oracle(a, origin, rec_a, rec_b, rec_b + ".zeros")
    assert digest(a, origin) == digest(b, dest)
    forget_records(a, rec_a, rec_b)


def test_a_replaced_destination_disk_gets_a_full_copy(pair, pdisks, back, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    other = da(64)
    rec_a, rec_b = f"{a.shared}/{name}.reca", f"{a.shared}/{name}.recb"
    to_b(a, b, name, origin, dest, rec_a)
    write_on_b(b, name, rec_b)
    s = summary(b.dmmig(*back_args(name, other)).out)
    assert s["warm"].startswith("cold: full copy, because on the destination, the generation names "), s["warm"]
    assert s["base"]["read"] == 64 * MiB, s
    b.dmmig("cutover", name, "--json")
    v = summary(b.dmmig("verify", name, "--json").out)
    assert v["mismatches"] == [], v
    b.dmmig("finish", name, "--remove")
    oracle(a, other, rec_a, rec_b, rec_b + ".zeros")
    a.dmmig("forget", name)
    b.dmmig("forget", name)
    forget_records(a, rec_a, rec_b)


def test_a_write_past_era_on_b_makes_it_a_full_copy(pair, pdisks, back, name: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    rec_a, rec_b = f"{a.shared}/{name}.reca", f"{a.shared}/{name}.recb"
    to_b(a, b, name, origin, dest, rec_a)
    write_on_b(b, name, rec_b)
    # straight to b's disk, below its era device: era never saw it, so only the counters can tell
    b.run(["dd", "if=/dev/urandom", f"of={dest}", "bs=4K", "count=1", "seek=9000", "oflag=direct"])
    dry = b.dmmig("copy", name, "--dry-run").out
    assert "cold: full copy, because the origin" in dry and "written past the era device" in dry, dry
    s = summary(b.dmmig(*back_args(name, origin)).out)
    assert s["warm"].startswith("cold: full copy, because the origin "), s["warm"]
    assert s["base"]["read"] == 64 * MiB, s
    st = json.loads(b.dmmig("status", name, "--json").out)
    assert st["warm"]["tracking"]["decision"] == s["warm"], st["warm"]
    b.dmmig("cutover", name, "--json")
    v = summary(b.dmmig("verify", name, "--json").out)
    assert v["mismatches"] == [], v
    b.dmmig("finish", name, "--remove")
    assert digest(a, origin) == digest(b, dest)  # the stray block too
    a.dmmig("forget", name)
    b.dmmig("forget", name)
    forget_records(a, rec_a, rec_b)


@pytest.mark.parametrize("leg", ["healthy", "failed"])
def test_the_gates_yes_records_the_generation_so_the_way_back_is_warm(pair, pdisks, back, name: str,
                                                                      leg: str) -> None:
    """`dmmig migrate`'s way (Xen): no finish, the handover gate's yes hands the disk over.
    With the top suspended and the mirror provably intact, the yes records a's half and b's
    agent its half as the export stops; b's wrap (block-dmmig's add) tracks before anything
    opens the disk, and the copy back sends only what b wrote. A leg that failed after the
    sync (the gate caught up instead) records none: the way back is a full copy."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    rec_a, rec_b = f"{a.shared}/{name}.reca", f"{a.shared}/{name}.recb"
    top = f"/dev/mapper/dmmig-{name}"
    w = to_mirror(a, name, origin, dest, rec_a)
    if leg == "failed":
        inject(b, "kill-server", None)
        wait_leg_failed(a, name)
    assert stop_writer(a, w)["writes"] > 100  # the guest is suspended when `add` asks

    def last_write() -> None:
        # as on Xen, where the guest writes until xl suspends it: a write just before the gate,
        # so both files' ctimes are fresh in its window (block 7 written again as it is)
        a.run(["dd", f"if={top}", f"of={top}", "bs=4096", "count=1", "skip=7", "seek=7",
               "iflag=direct", "oflag=direct", "conv=notrunc", "status=none"])
    h = hand_over(a, b, name, before_ask=last_write)
    print(f"[warm] gate ({leg}): suspended {h['seconds'] * 1000:.0f} ms, caught up {h['caught_up_bytes']}, "
          f"steps (ms) {h.get('steps_ms')}")
    a.dmmig("finish", name, "--remove")
    wrap = b.dmmig("wrap", name, dest)
    if leg == "failed":
        assert h.get("generation") is None and h["caught_up_bytes"] > 0, h
        assert b.run(["test", "-e", f"/run/dmmig/{name}.warm.json"], check=False).rc != 0
        assert a.run(["test", "-e", f"/run/dmmig/{name}.warm.json"], check=False).rc != 0
        assert "warm" not in wrap.err, wrap.err
        b.dmmig("unwrap", name)
        forget_records(a, rec_a)
        return
    kept = json.loads(a.run(["cat", f"/run/dmmig/{name}.warm.json"]).out)
    assert kept["role"] == "kept" and kept["generation"] == h["generation"], (kept, h)
    assert kept["fence"].get("settled", True) is True, kept  # taken in the window, settled after it
    assert "warm: era tracks every write" in wrap.err, wrap.err
    write_on_b(b, name, rec_b)
    s = summary(b.dmmig(*back_args(name, origin)).out)
    print(f"[warm] gate's generation: W={W} read={s['read']} sent={s['sent']} zeroed={s['zeroed']}: {s['warm']}")
    assert s["warm"].startswith("warm: ") and s["base"] is None, s
    assert 0 < s["read"] <= W and s["sent"] + s["zeroed"] <= W, s
    finish_back(a, b, name)
    oracle(a, origin, rec_a, rec_b, rec_b + ".zeros")
    assert digest(a, origin) == digest(b, dest)
    forget_records(a, rec_a, rec_b)


# block-dmmig's remove (entry/hotplug.py) and `dmmig migrate` (_finish_source) both end a
# handed-over disk on the source with this call
FINISH_HANDED_OVER = r"""
import json, sys
from dmmig.entry.hotplug import make_stack
from dmmig.errors import DmmigError
from dmmig.flows.finish import finish_handed_over
try:
    done = finish_handed_over(make_stack(sys.argv[1]), sys.argv[2], node=None, params=sys.argv[3], close_wait_s=10)
except DmmigError as e:
    print(json.dumps({"error": e.message}))
    sys.exit(3)
print(json.dumps({"done": done}))
"""
HOLD = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
open(sys.argv[2], "w").close()
time.sleep(600)
"""


def test_the_gates_generation_survives_a_finish_on_a_that_failed_partway(pair, pdisks, name: str) -> None:
    """On Xen, after the gate's yes, block-dmmig's remove on a finishes the disk
    (finish_handed_over) within libxl's budget, and `dmmig migrate` finishes whatever it left
    with the same call. A remove that fails partway (here the era device is held open, so its
    removal fails; on Xen the script's 26 s deadline at load, or libxl's kill at 40 s) leaves the
    journal in phase finishing, or wrapped with the mirror's record (and its handover) reset.
    The second finish must keep the generation the gate recorded: it did drop it, as if the
    migration had recorded none (the Xen warm test found no NAME.warm.json on a)."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(64, fill_seed=SEED), db(64)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest, "--converge", "1M", "--max-rounds", "4"))
    a.dmmig("cutover", name, "--json")
    h = hand_over(a, b, name)
    assert h.get("generation"), h
    ready = f"/run/{name}.held"
    holder = a.spawn([python(), "-c", HOLD, f"/dev/mapper/dmmig-{name}-era", ready])
    try:
        for _ in range(100):
            if a.run(["test", "-e", ready], check=False).rc == 0:
                break
            time.sleep(0.1)
        first = a.py(FINISH_HANDED_OVER, "/run/dmmig", name, origin, check=False)  # block-dmmig's remove
        assert first.rc == 3 and f"dmmig-{name}-era" in first.out, first
    finally:
        holder.signal(signal.SIGTERM)
        holder.wait(30)  # type: ignore[attr-defined]
        a.run(["rm", "-f", ready])
    assert json.loads(a.run(["cat", f"/run/dmmig/{name}.json"]).out)["phase"] == "finishing"
    second = a.py(FINISH_HANDED_OVER, "/run/dmmig", name, origin, check=False)  # dmmig migrate's
    assert second.rc == 0, second
    got = a.run(["cat", f"/run/dmmig/{name}.warm.json"], check=False)
    assert got.rc == 0, ("the gate's generation is gone after the second finish", second.out)
    kept = json.loads(got.out)
    assert kept["role"] == "kept" and kept["generation"] == h["generation"], kept
    assert a.run(["test", "-e", f"/run/dmmig/{name}.json"], check=False).rc != 0  # finished
    b.dmmig("abort", name)  # what migrate's stop_remote does: b forgets the incoming disk (it stays)
    for host in (a, b):
        host.dmmig("forget", name)
