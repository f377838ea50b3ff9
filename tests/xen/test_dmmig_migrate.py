"""`dmmig migrate` on real Xen: two Xen hosts (QEMU, socket network), a guest writing through
blkback on a block-dmmig disk that exists only on host a. The oracle is the guest's own record:
every write it printed an ACK for (O_DIRECT|O_DSYNC, so completed on the backend) must be on
the disk of the host where the guest runs afterwards; the rest of the disk (never written by
the guest) must be byte-identical on both hosts."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rig.uml import ROOT
from tests.xenrig import pattern
from tests.xenrig.domu import DomU
from tests.xenrig.host import XenHost
from tests.xenrig.pair import B_IP, SSH_OPTS, XenPair

pytestmark = pytest.mark.xen
PY = str(ROOT / ".venv" / "bin" / "python")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
SCRIPT = ROOT / "hotplug" / "block-dmmig"
MIB = 1 << 20
STATE = "/run/dmmig"  # the rig's agent and the pair's sshd both set DMMIG_STATE_DIR to it


@pytest.fixture
def pair(xen_pair: XenPair) -> Iterator[tuple[XenHost, XenHost]]:
    """Both hosts with block-dmmig installed; afterwards neither may hold anything of dmmig."""
    a, b = xen_pair.a, xen_pair.b
    assert a is not None and b is not None
    for h in (a, b):
        h.run(["install", "-D", "-m", "0755", str(SCRIPT), "/etc/xen/scripts/block-dmmig"])
        h.run(["mkdir", "-p", "/var/log/xen"])
    yield a, b
    for h in (a, b):
        assert leftovers(h) == {"dm": [], "state": [], "qemu-nbd": [], "nbd": []}, h.name


def leftovers(h: XenHost) -> dict[str, list[str]]:
    dm = [ln.split()[0] for ln in h.run(["dmsetup", "ls"]).out.splitlines() if ln.startswith("dmmig-")]
    state = h.sh(f"ls {STATE} 2>/dev/null", check=False).out.split()
    return {"dm": dm, "state": [f for f in state if not f.endswith(".lock") and f != "gate.sock"],
            "qemu-nbd": h.sh("pgrep -a qemu-nbd", check=False).out.split("\n")[:-1],
            "nbd": h.sh("grep -l . /sys/block/nbd*/pid 2>/dev/null", check=False).out.split()}


def sha256(h: XenHost, path: str, offset: int, length: int) -> str:
    return h.py("import hashlib, sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2])); "
                "print(hashlib.sha256(f.read(int(sys.argv[3]))).hexdigest())", path, str(offset), str(length)).out.strip()


def holds_acks(h: XenHost, path: str, seed: int, acks: list[pattern.Ack]) -> dict[str, Any]:
    """pattern's own check, in dom0: every block holds at least the last seq acked for it."""
    r = h.run([PY, "-m", "tests.xenrig.pattern", "acks", path, str(seed)], cwd=str(ROOT), check=False,
              input="".join(f"XENRIG-ACK {a.seq} {a.block} 0 0\n" for a in acks).encode())
    assert r.rc in (0, 1), r
    return dict(json.loads(r.out))


def events(out: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def migrate_argv(name: str, *extra: str) -> list[str]:
    return [DMMIG, "migrate", name, B_IP, "--create", "--remote-dmmig", DMMIG, *SSH_OPTS, *extra]


def test_dmmig_migrate_moves_a_writing_guest_and_its_local_disk(pair: tuple[XenHost, XenHost], xen_pair: XenPair,
                                                                 xen_report: dict[str, Any]) -> None:
    a, b = pair
    name, seed = "xrdm", 31
    img = f"/dev/shm/{name}.img"
    disk = f"shm-{name}.img"
    # 64 MiB: the guest writes blocks 0..255 (1 MiB); 1..33 MiB hold data only a has
    a.run(["truncate", "-s", "64M", img])
    a.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "seek=1", "count=32", "conv=notrunc", "status=none"])
    vm = DomU(a, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={img}",
              job=["workload", str(seed), "/dev/xvda", "0", "256", "10"])
    try:
        residual = xen_pair.sync_clocks()
        assert abs(residual["offset_ns"]) < 20_000_000, residual
        vm.create()
        vm.wait_console(r"XENRIG-ACK 200 ", timeout=180)

        # --dry-run: the plan, and nothing changes on either host
        r = a.run(migrate_argv(name, "--dry-run"), timeout=120)
        assert f"xvda: {img} as dmmig disk {disk}, {64 * MIB} bytes" in r.out, r
        assert f"destination {B_IP}:{img} (created (--create))" in r.out, r
        assert "mirror disk 2 <log loop> 128 2" in r.out, r
        assert b.sh(f"test -e {img}", check=False).rc != 0
        assert [ln.split()[0] for ln in a.run(["dmsetup", "ls"]).out.splitlines()] == [f"dmmig-{disk}"]

        t = time.monotonic()
        r = a.run(migrate_argv(name, "--json", "--", "-e"), timeout=900, check=False)
        total_s = time.monotonic() - t
        assert r.rc == 0, r
        [summary] = [e for e in events(r.out) if e["event"] == "summary"]
        assert vm.domid(a) is None and vm.domid(b) is not None

        # on b: block-dmmig wrapped the disk as an ordinary, not migrating disk
        entry = json.loads(b.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "wrapped", entry
        last_on_a = max(x.seq for x in pattern.acks(vm.console(a)))
        vm.wait_console(rf"XENRIG-ACK {last_on_a + 200} ", host=b, timeout=180)
        on_a, on_b = pattern.acks(vm.console(a)), pattern.acks(vm.console(b))
        gap = pattern.largest_gap(pattern.merge(on_a, on_b))
        assert last_on_a - 5 <= gap.after_seq <= last_on_a + 5, (gap, last_on_a)
        vm.destroy(b)

        # every write acked anywhere is on b's disk (a's writes went through the mirror);
        # a's own disk has every write acked while the guest ran there
        ok = holds_acks(b, img, seed, on_a + on_b)
        assert ok["ok"], ok
        ok = holds_acks(a, img, seed, on_a)
        assert ok["ok"], ok
        # the oracle is not blind: a's disk lacks what the guest wrote on b
        assert not holds_acks(a, img, seed, on_b)["ok"]
        # what the guest never wrote is the same on both hosts, random data and zeroes
        assert sha256(a, img, MIB, 63 * MIB) == sha256(b, img, MIB, 63 * MIB)
        # the source let go of everything: no loop device over the file
        assert a.run(["losetup", "-j", img]).out.strip() == ""

        d = summary["disks"][disk]
        xen_report["dmmig migrate (64 MiB disk, 128 MiB guest): total s / to mirror s / xl migrate s"] = (
            round(total_s, 1), summary["to_mirror_seconds"], summary["xl"]["seconds"])
        xen_report["dmmig migrate: guest-visible downtime ms (wall, monotonic)"] = (
            round(gap.real_ms), round(gap.mono_ms))
        xen_report["dmmig migrate: cutover suspend ms / gate suspend ms / gate caught up bytes"] = (
            round(d["cutover"]["suspended_seconds"] * 1000), round(d["handover"]["seconds"] * 1000),
            d["handover"]["caught_up_bytes"])
    finally:
        for h in (a, b):
            h.run(["xl", "destroy", name], check=False)
        for h in (a, b):
            h.run([DMMIG, "abort", disk], check=False)
            h.run([DMMIG, "unwrap", "--force", disk], check=False)
            h.sh(f"losetup -j {img} | cut -d: -f1 | xargs -r -n1 losetup -d", check=False)
            h.run(["rm", "-f", img, f"{STATE}/{disk}.dest.json"], check=False)


def _wait_incoming(b: XenHost, name: str, timeout: float) -> None:
    """Until xl migrate-receive created the domain on b (it is then copying memory)."""
    deadline = time.monotonic() + timeout
    while b.run(["xl", "domid", f"{name}--incoming"], check=False).rc != 0:
        assert time.monotonic() < deadline, f"no {name}--incoming on b after {timeout}s"
        time.sleep(0.5)


def test_gate_refuses_a_disk_whose_leg_broke_and_the_guest_stays(pair: tuple[XenHost, XenHost],
                                                                  xen_report: dict[str, Any]) -> None:
    """The destination's disk starts failing writes while xl migrate copies memory: the next
    guest write fails the mirror's leg, the gate's catch-up cannot write either, the source
    answers no, b's block-dmmig add fails, xl migrate fails and the guest resumes on a with
    every acknowledged write; dmmig aborts on both hosts."""
    a, b = pair
    name, seed = "xrgate", 47
    img = f"/dev/shm/{name}.img"
    dev = f"/dev/mapper/{name}"         # the same path on both hosts: a dm device of the test's
    disk = f"mapper-{name}"
    sectors = 32 * MIB // 512
    loops: dict[str, str] = {}
    for h in (a, b):
        h.run(["truncate", "-s", "32M", img])
        loops[h.name] = h.run(["losetup", "--find", "--show", img]).out.strip()
        h.run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {loops[h.name]} 0"])
    vm = DomU(a, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={dev}",
              job=["workload", str(seed), "/dev/xvda", "0", "256", "10"])
    try:
        vm.create()
        vm.wait_console(r"XENRIG-ACK 100 ", timeout=180)
        job = a.spawn(migrate_argv(name, "--", "-e"), timeout=900)
        _wait_incoming(b, name, 600)
        # b's disk fails every write from now on (the guest is still running on a)
        b.run(["dmsetup", "load", name, "--table", f"0 {sectors} error"])
        b.run(["dmsetup", "suspend", name])
        b.run(["dmsetup", "resume", name])
        t = time.monotonic()
        r = job.wait(900)
        assert r.rc == 8, r  # the destination refused: exit code REMOTE
        assert "the handover gate refused" in r.err and "resumed on this host" in r.err, r
        assert vm.domid(b) is None and vm.domid(a) is not None
        last = max(x.seq for x in pattern.acks(vm.console(a)))
        vm.wait_console(rf"XENRIG-ACK {last + 100} ", timeout=180)  # running again, on a
        hotplug_b = b.sh("cat /var/log/xen/xen-hotplug.log", check=False).out
        assert "refused the handover" in hotplug_b, hotplug_b[-2000:]
        # dmmig aborted: a's disk is wrapped again, linear over the origin
        entry = json.loads(a.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "wrapped", entry
        vm.destroy()
        ok = holds_acks(a, dev, seed, pattern.acks(vm.console(a)))
        assert ok["ok"], ok
        xen_report["gate refusal: dmmig migrate exit after the break s"] = round(time.monotonic() - t, 1)
    finally:
        for h in (a, b):
            h.run(["xl", "destroy", name], check=False)
        for h in (a, b):
            h.run([DMMIG, "abort", disk], check=False)
            h.run([DMMIG, "unwrap", "--force", disk], check=False)
            h.run(["dmsetup", "remove", name], check=False)
            if h.name in loops:
                h.run(["losetup", "-d", loops[h.name]], check=False)
            h.run(["rm", "-f", img, f"{STATE}/{disk}.dest.json"], check=False)
