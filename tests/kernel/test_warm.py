"""Issue 16 part 1 on two kernels: after a move a -> b (manual verbs), the copy back b -> a
sends only what b wrote since (warm), and anything that breaks the proof makes it a full copy."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import ORACLE, python
from tests.kernel.steps import DMMIG, copy_args, digest, start_writer, stop_writer
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


def to_b(a: UmlHost, b: UmlHost, name: str, origin: str, dest: str, rec: str) -> None:
    """a -> b under a writer on a, by the manual verbs; the writer stops before finish (the
    operator stops the disk's users on a), and b wraps its disk (its users start there)."""
    top = f"/dev/mapper/dmmig-{name}"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w = start_writer(a, top, rec, seed=SEED, rate="1000", blocks="0:4096")
    a.dmmig(*copy_args(name, dest, "--converge", "1M", "--max-rounds", "4"))
    a.dmmig("cutover", name, "--json")
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
