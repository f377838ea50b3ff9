"""`dmmig migrate` on real Xen: two Xen hosts (QEMU, socket network), a running PVH guest on a
block-dmmig disk that exists only on host a.

Two independent writers share the disk, in separate block ranges. The guest itself writes
through blkfront (tests/xenrig/guest_tool.c: each block names its seq; each completed write is
an ACK line on its console) all the way through the copy, the cutover, xl's suspend and its
resume on b. In dom0 the project's oracle (tests/tools/oracle.py) writes on the very device
blkback serves (/dev/mapper/dmmig-NAME), so at a far higher rate it takes the guest's path
through era and the mirror; it records every write the kernel acknowledged. Afterwards b's disk
is checked block by block against both records, and against a's disk as the guest left it at
its suspend. The ACKs' timestamps measure the downtime the guest saw."""
from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rig.uml import ROOT
from tests.xenrig import pattern
from tests.xenrig.domu import DomU, check_disk
from tests.xenrig.host import XenHost
from tests.xenrig.pair import A_IP, B_IP, SSH_OPTS, XenPair

pytestmark = pytest.mark.xen
PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
MIB = 1 << 20
STATE = "/run/dmmig"  # the rig's agent and the pair's sshd both set DMMIG_STATE_DIR to it


@pytest.fixture
def pair(xen_pair: XenPair) -> Iterator[tuple[XenHost, XenHost]]:
    """Both hosts with block-dmmig installed; afterwards neither may hold anything of dmmig."""
    a, b = xen_pair.a, xen_pair.b
    assert a is not None and b is not None
    for h in (a, b):
        h.install_block_script()
    yield a, b
    for h in (a, b):
        assert leftovers(h) == {"dm": [], "state": [], "qemu-nbd": [], "nbd": []}, h.name


def leftovers(h: XenHost) -> dict[str, list[str]]:
    dm = [ln.split()[0] for ln in h.run(["dmsetup", "ls"]).out.splitlines() if ln.startswith("dmmig-")]
    # every file below the state dir (exports' sockets and TLS keys are in its root-only nbd/,
    # which stays, empty, once made)
    state = h.sh(f"cd {STATE} 2>/dev/null && find . -mindepth 1 ! -type d", check=False).out.split()
    return {"dm": dm, "state": [f.removeprefix("./") for f in state if not f.endswith(".lock")],
            "qemu-nbd": h.sh("pgrep -a qemu-nbd", check=False).out.split("\n")[:-1],
            "nbd": h.sh("grep -l . /sys/block/nbd*/pid 2>/dev/null", check=False).out.split()}


def sha256(h: XenHost, path: str, offset: int, length: int) -> str:
    return h.py("import hashlib, sys; f = open(sys.argv[1], 'rb'); f.seek(int(sys.argv[2])); "
                "print(hashlib.sha256(f.read(int(sys.argv[3]))).hexdigest())",
                path, str(offset), str(length)).out.strip()


def oracle(h: XenHost, cmd: str, path: str, seed: int, *args: str) -> dict[str, Any] | None:
    """The oracle's fill or check of PATH; a file in /dev/shm (tmpfs: no O_DIRECT) through a
    loop device of its own."""
    loop = h.run(["losetup", "--find", "--show", path]).out.strip() if path.startswith("/dev/shm/") else None
    try:
        r = h.run([PY, ORACLE, cmd, loop or path, "--seed", str(seed), *args], check=False, timeout=600)
    finally:
        if loop:
            h.run(["losetup", "-d", loop])
    assert r.rc in (0, 1) if cmd == "check" else r.rc == 0, r
    return dict(json.loads(r.out)) if cmd == "check" else None


def oracle_check(h: XenHost, dev: str, seed: int, record: str, blocks: str | None = None) -> dict[str, Any]:
    res = oracle(h, "check", dev, seed, "--record", record, *(["--blocks", blocks] if blocks else []))
    assert res is not None
    return res


def start_writer(h: XenHost, dev: str, seed: int, record: str, blocks: str) -> Any:
    job = h.spawn([PY, ORACLE, "write", dev, "--seed", str(seed), "--record", record, "--blocks", blocks,
                   "--rate", "100"], timeout=1200)
    deadline = time.monotonic() + 60
    while h.run(["test", "-e", record + ".started"], check=False).rc != 0:
        assert time.monotonic() < deadline and not job.done(), "the oracle writer did not start"
        time.sleep(0.5)
    return job


def stop_writer(job: Any) -> dict[str, Any]:
    job.signal(signal.SIGTERM)
    r = job.wait(120)
    assert r.rc == 0, r  # no write failed
    return dict(json.loads(r.out))


def wait_table(h: XenHost, dev: str, target: str, timeout: float, job: Any) -> None:
    """Until DEV's table is TARGET; fails at once if JOB (dmmig migrate) ended first."""
    deadline = time.monotonic() + timeout
    while f" {target} " not in h.run(["dmsetup", "table", dev], check=False).out:
        if job.done():
            r = job.wait(10)
            pytest.fail(f"dmmig migrate ended (rc {r.rc}) before {dev} was a {target}:\n{r.err[-6000:]}\n"
                        f"{r.out[-3000:]}")
        assert time.monotonic() < deadline, f"{dev} is not a {target} after {timeout}s"
        time.sleep(0.5)


def step(what: str) -> None:
    """Where a long test is (seen with -s): these tests take minutes each."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def clean_up(a: XenHost, b: XenHost, guest: str, disk: str, img: str, dm: str | None = None) -> None:
    """Whatever a failed test left: the guest, dmmig's stack, the test's dm device and loops."""
    for h in (a, b):
        h.run(["xl", "destroy", guest], check=False)
    for h in (a, b):
        h.run([DMMIG, "abort", disk], check=False)
        h.run([DMMIG, "forget", disk], check=False)  # a generation a handover recorded
        h.run([DMMIG, "unwrap", "--force", disk], check=False)
        if dm:
            h.run(["dmsetup", "remove", dm], check=False)
        h.sh(f"losetup -j {img} | cut -d: -f1 | xargs -r -n1 losetup -d", check=False)
        h.run(["rm", "-f", img, f"{STATE}/{disk}.dest.json"], check=False)


def wait_migrate(job: Any, a: XenHost, b: XenHost, guest: str, timeout: float) -> Any:
    """The dmmig migrate job's Result. If it overruns: what both hosts are doing, then the
    job is interrupted for its own output, and the test fails with all of it."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            seen = [f"--- {h.name}: {title} ---\n{h.sh(cmd, check=False, timeout=60).out}"
                    for h in (a, b) for title, cmd in (
                        ("processes",
                         "ps -eo pid,ppid,stat,etime,wchan:24,args --sort=pid | grep -v ' \\[' | tail -40"),
                        ("xl list", "xl list"), ("dm", "dmsetup status"),
                        ("hotplug log", "tail -20 /var/log/xen/xen-hotplug.log"),
                        ("xl log", f"tail -20 /var/log/xen/xl-{guest}.log"))]
            job.signal(signal.SIGINT)
            r = job.wait(120)
            pytest.fail(f"dmmig migrate still running after {timeout:.0f}s\n" + "\n".join(seen) +
                        f"\n--- dmmig migrate (interrupted) ---\nrc {r.rc}\n{r.out[-3000:]}\n{r.err[-5000:]}")
        time.sleep(2)
    return job.wait(60)


def events(out: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def migrate_argv(name: str, *extra: str) -> list[str]:
    return [DMMIG, "migrate", name, B_IP, "--create", "--remote-dmmig", DMMIG, *SSH_OPTS, *extra]


def writing_guest(host: XenHost, name: str, target: str, seed: int, start: int, count: int) -> DomU:
    """The guest: its disk is TARGET through block-dmmig; every 200 ms it writes the next of
    blocks START..START+COUNT (4 KiB, O_DIRECT|O_DSYNC) and prints the ACK."""
    return DomU(host, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={target}",
                job=["workload", str(seed), "/dev/xvda", str(start), str(count), "200"])


def guest_acks_on_disk(h: XenHost, dev: str, seed: int, console: str) -> dict[str, Any]:
    """Every write the guest's console acknowledged is on DEV."""
    return check_disk(h, "acks", dev, str(seed), stdin=console)


def guest_seqs(h: XenHost, dev: str, seed: int, start: int, count: int) -> list[int | None]:
    """The seq each of the guest's blocks START.. holds on DEV."""
    return list(check_disk(h, "seqs", dev, str(seed), str(start), str(count))["seqs"])


def test_dmmig_migrate_moves_a_running_guest_and_its_local_disk(pair: tuple[XenHost, XenHost], xen_pair: XenPair,
                                                                xen_report: dict[str, Any]) -> None:
    a, b = pair
    name, seed, gseed = "xrdm", 31, 32
    img, rec = f"/dev/shm/{name}.img", f"/run/{name}.rec"
    disk = f"shm-{name}.img"
    top = f"/dev/mapper/dmmig-{disk}"
    # 64 MiB = 16384 blocks of 4 KiB: the oracle writes 0..2047, the guest 12288..12543. The
    # oracle's 8 MiB are 128 mirror regions, nearly all dirty at the cutover: the kernel resyncs
    # one region at a time, ~0.1 s each under emulation (32 MiB of them took 56 s)
    gstart, gcount = 12288, 256
    a.run(["truncate", "-s", "64M", img])
    step("fill")
    oracle(a, "fill", img, seed)  # every block: the oracle's seq 0
    vm = writing_guest(a, name, img, gseed, gstart, gcount)
    try:
        residual = xen_pair.sync_clocks()
        assert abs(residual["offset_ns"]) < 20_000_000, residual
        step("create")
        vm.create()
        vm.wait_console(r"XENRIG-ACK 30 ", timeout=180)
        step("dry run")

        # --dry-run: the plan, and nothing changes on either host
        r = a.run(migrate_argv(name, "--dry-run"), timeout=120)
        assert f"xvda: {img} as dmmig disk {disk}, {64 * MIB} bytes" in r.out, r
        assert f"destination {B_IP}:{img} (created (--create))" in r.out, r
        assert "mirror disk 2 <log 0> 128 2" in r.out and "16 dm-mirror targets side by side" in r.out, r
        assert b.sh(f"test -e {img}", check=False).rc != 0
        assert [ln.split()[0] for ln in a.run(["dmsetup", "ls"]).out.splitlines()] == [f"dmmig-{disk}"]

        step("writer")
        writer = start_writer(a, top, seed, rec, "0:2048")
        step("migrate")
        t = time.monotonic()
        job = a.spawn(migrate_argv(name, "--json", "--", "-e"), timeout=1200)
        # the oracle writes through the copy rounds, the cutover and 5 s of mirroring, then lets
        # go of the top device long before xl suspends the guest (memory takes ~50 s); the
        # guest writes throughout
        wait_table(a, f"dmmig-{disk}", "mirror", 600, job)
        time.sleep(5)
        wrote = stop_writer(writer)
        step(f"writer stopped: {wrote}")
        r = wait_migrate(job, a, b, name, 420)
        step(f"migrate done: {r.rc}")
        total_s = time.monotonic() - t
        assert r.rc == 0, r
        [summary] = [e for e in events(r.out) if e["event"] == "summary"]
        assert vm.domid(a) is None and vm.domid(b) is not None

        # on b: block-dmmig wrapped the disk as an ordinary, not migrating disk, whose writes era
        # tracks from the handover on (a migration back sends only those)
        entry = json.loads(b.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "prepared" and entry["copy"]["warm"] and not entry.get("dest"), entry
        on_a = pattern.acks(vm.console(a))
        last_on_a = max(x.seq for x in on_a)
        vm.wait_console(rf"XENRIG-ACK {last_on_a + 30} ", host=b, timeout=180)  # alive on b, writing
        b.run(["xl", "pause", name])
        console = vm.console(a) + vm.console(b)
        gap = pattern.largest_gap(pattern.merge(on_a, pattern.acks(vm.console(b))))
        assert last_on_a - 5 <= gap.after_seq <= last_on_a + 5, (gap, last_on_a)

        # b's disk, block by block. The guest's range: every write it acknowledged, on a or on b
        got = guest_acks_on_disk(b, top, gseed, console)
        assert got["ok"], got
        # ... and what a's disk held when the guest stopped there, or a later write of b's
        at_suspend = guest_seqs(a, img, gseed, gstart, gcount)
        now_b = guest_seqs(b, top, gseed, gstart, gcount)
        behind = [(gstart + i, x, y) for i, (x, y) in enumerate(zip(at_suspend, now_b))
                  if x is not None and (y is None or y < x)]
        assert not behind, behind[:10]
        assert sum(x is not None for x in at_suspend) >= min(gcount, last_on_a), at_suspend
        # the oracle's range: the fill and every write the kernel acknowledged on a; the rest of
        # the disk: the fill
        b.write_file(rec, a.run(["cat", rec]).out)
        ok = oracle_check(b, top, seed, rec, "0:12288")
        assert ok["mismatches"] == 0 and ok["written_blocks"] > 100, ok
        for h in (a, b):
            h.write_file(rec + ".none", json.dumps({"last": {}}))
        assert oracle_check(b, top, seed, rec + ".none", f"{gstart + gcount}:16384")["mismatches"] == 0
        on_b = pattern.acks(vm.console(b))
        vm.destroy(b)
        assert oracle_check(a, img, seed, rec, "0:12288")["mismatches"] == 0
        # the checks are not blind: a's disk against the fill alone differs where the oracle
        # wrote; the guest's blocks on b are not a's at its suspend where b wrote them again
        assert oracle_check(a, img, seed, rec + ".none", "0:2048")["mismatches"] > 0
        assert any(x != y for x, y in zip(at_suspend, now_b))
        # the source let go of everything: no top device, no loop device over the file
        assert a.run(["losetup", "-j", img]).out.strip() == ""

        d = summary["disks"][disk]
        xen_report["dmmig migrate (64 MiB disk, 128 MiB guest): total s / to mirror s / xl migrate s / finish s"] = (
            round(total_s, 1), summary["to_mirror_seconds"], summary["xl"]["seconds"], d["finish"]["seconds"])
        # the rest of total: the plan (probing b over SSH), the gate's session around xl, the
        # CLI's start and exit (Python in emulated dom0)
        xen_report["dmmig migrate: plan s / gate session around xl s / CLI start+exit s"] = (
            summary["plan_seconds"], round(summary["xl"]["wall_seconds"] - summary["xl"]["seconds"], 1),
            round(total_s - summary["seconds"] - summary["plan_seconds"], 1))
        xen_report["dmmig migrate: guest-visible downtime ms (wall, monotonic)"] = (
            round(gap.real_ms), round(gap.mono_ms))
        xen_report["dmmig migrate: cutover suspend ms / gate suspend ms / gate caught up bytes"] = (
            round(d["cutover"]["suspended_seconds"] * 1000), round(d["handover"]["seconds"] * 1000),
            d["handover"]["caught_up_bytes"])
        xen_report["dmmig migrate: base+rounds copy s / regions resynced by the kernel / resync s"] = (
            round(d["copy"]["seconds"], 1), d["cutover"]["resync_regions"], d["cutover"]["resync_seconds"])
        xen_report["dmmig migrate: oracle writes during copy+cutover, slowest ms / guest writes acked"] = (
            wrote["writes"], wrote["max_latency_ms"], len(pattern.merge(on_a, on_b)))
    finally:
        clean_up(a, b, name, disk, img)
        for h in (a, b):
            h.run(["rm", "-f", rec, rec + ".started", rec + ".none"], check=False)


def _wait_incoming(b: XenHost, name: str, timeout: float, job: Any) -> None:
    """Until xl migrate-receive created the domain on b (it is then copying memory)."""
    deadline = time.monotonic() + timeout
    while b.run(["xl", "domid", f"{name}--incoming"], check=False).rc != 0:
        assert not job.done(), job.wait(10)
        assert time.monotonic() < deadline, f"no {name}--incoming on b after {timeout}s"
        time.sleep(0.5)


def test_gate_refuses_a_disk_whose_leg_broke_and_the_guest_stays(pair: tuple[XenHost, XenHost],
                                                                  xen_report: dict[str, Any]) -> None:
    """The destination's disk starts failing writes while xl migrate copies memory: the next
    write fails the mirror's leg, the gate's catch-up cannot write either, the source answers
    no, b's block-dmmig add fails, xl migrate fails and the guest resumes on a, whose disk has
    every write acknowledged to the guest or to the oracle; dmmig aborts on both hosts."""
    a, b = pair
    name, seed, gseed = "xrgate", 47, 48
    # 32 MiB = 8192 blocks of 4 KiB: the oracle writes 0..1023 (64 regions to resync), the guest 6144..6399
    gstart, gcount = 6144, 256
    img, rec = f"/dev/shm/{name}.img", f"/run/{name}.rec"
    dev = f"/dev/mapper/{name}"         # the same path on both hosts: a dm device of the test's
    disk = f"mapper-{name}"
    sectors = 32 * MIB // 512
    for h in (a, b):
        h.run(["truncate", "-s", "32M", img])
        loop = h.run(["losetup", "--find", "--show", img]).out.strip()
        h.run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {loop} 0"])
    oracle(a, "fill", dev, seed)
    vm = writing_guest(a, name, dev, gseed, gstart, gcount)
    try:
        vm.create()
        vm.wait_console(r"XENRIG-ACK 30 ", timeout=180)
        writer = start_writer(a, f"/dev/mapper/dmmig-{disk}", seed, rec, "0:1024")
        job = a.spawn(migrate_argv(name, "--", "-e"), timeout=1200)
        _wait_incoming(b, name, 900, job)
        # b's disk fails every write from now on; the writer's next write fails the leg
        b.run(["dmsetup", "load", name, "--table", f"0 {sectors} error"])
        b.run(["dmsetup", "suspend", name])
        b.run(["dmsetup", "resume", name])
        t = time.monotonic()
        r = wait_migrate(job, a, b, name, 420)
        assert r.rc == 8, r  # the destination refused: exit code REMOTE
        assert "the handover gate refused" in r.err and "resumed on this host" in r.err, r
        assert vm.domid(b) is None and vm.domid(a) is not None
        last = max(x.seq for x in pattern.acks(vm.console(a)))
        vm.wait_console(rf"XENRIG-ACK {last + 30} ", timeout=180)  # running again, on a
        hotplug_b = b.sh("cat /var/log/xen/xen-hotplug.log", check=False).out
        assert "refused the handover" in hotplug_b, hotplug_b[-2000:]
        # dmmig aborted: a's disk is wrapped again, linear over the origin
        entry = json.loads(a.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "wrapped", entry
        wrote = stop_writer(writer)
        console = vm.console(a)
        vm.destroy()
        # every write acknowledged to the guest and to the oracle is on a's disk
        got = guest_acks_on_disk(a, dev, gseed, console)
        assert got["ok"], got
        ok = oracle_check(a, dev, seed, rec, "0:6144")
        assert ok["mismatches"] == 0 and ok["written_blocks"] > 100, ok
        xen_report["gate refusal: dmmig migrate exit after the break s / oracle writes"] = (
            round(time.monotonic() - t, 1), wrote["writes"])
    finally:
        clean_up(a, b, name, disk, img, dm=name)
        for h in (a, b):
            h.run(["rm", "-f", rec, rec + ".started"], check=False)


def test_dmmig_migrate_moves_a_guest_with_two_disks(pair: tuple[XenHost, XenHost], xen_report: dict[str, Any]) -> None:
    """Two block-dmmig disks of one running guest move together (their copies and cutovers run
    in parallel threads of one dmmig), each written in dom0 through blkback's device by its own
    oracle writer until it mirrors, the guest writing to xvda throughout; on b both disks hold
    every acknowledged write."""
    a, b = pair
    name, gseed = "xr2d", 52
    imgs = [f"/dev/shm/{name}{i}.img" for i in (0, 1)]
    disks = [f"shm-{name}{i}.img" for i in (0, 1)]  # block-dmmig's names for them
    tops = [f"/dev/mapper/dmmig-{d}" for d in disks]
    recs = [f"/run/{name}{i}.rec" for i in (0, 1)]
    seeds = [53, 54]
    # 32 MiB = 8192 blocks: the oracles write 0..1023 of each disk, the guest xvda's 6144..6399
    gstart, gcount = 6144, 256
    for img, seed in zip(imgs, seeds):
        a.run(["truncate", "-s", "32M", img])
        oracle(a, "fill", img, seed)
    vm = DomU(a, name, disk=[f"vdev=xvda,access=rw,script=block-dmmig,target={imgs[0]}",
                             f"vdev=xvdb,access=rw,script=block-dmmig,target={imgs[1]}"],
              job=["workload", str(gseed), "/dev/xvda", str(gstart), str(gcount), "200"])
    try:
        step("create")
        vm.create()
        vm.wait_console(r"XENRIG-ACK 30 ", timeout=180)
        writers = [start_writer(a, top, seed, rec, "0:1024") for top, seed, rec in zip(tops, seeds, recs)]
        step("migrate")
        t = time.monotonic()
        job = a.spawn(migrate_argv(name, "--json", "--", "-e"), timeout=1200)
        for d in disks:
            wait_table(a, f"dmmig-{d}", "mirror", 600, job)
        time.sleep(3)
        wrote = [stop_writer(w) for w in writers]
        r = wait_migrate(job, a, b, name, 480)
        step(f"migrate done: {r.rc}")
        assert r.rc == 0, r
        assert vm.domid(a) is None and vm.domid(b) is not None
        on_a = pattern.acks(vm.console(a))
        vm.wait_console(rf"XENRIG-ACK {max(x.seq for x in on_a) + 20} ", host=b, timeout=180)
        b.run(["xl", "pause", name])
        got = guest_acks_on_disk(b, tops[0], gseed, vm.console(a) + vm.console(b))
        assert got["ok"], got
        for top, seed, rec in zip(tops, seeds, recs):
            b.write_file(rec, a.run(["cat", rec]).out)
            ok = oracle_check(b, top, seed, rec, "0:6144")
            assert ok["mismatches"] == 0 and ok["written_blocks"] > 50, ok
        [summary] = [e for e in events(r.out) if e["event"] == "summary"]
        xen_report["dmmig migrate, two disks: total s / to mirror s / oracle writes per disk"] = (
            round(time.monotonic() - t, 1), summary["to_mirror_seconds"], [w["writes"] for w in wrote])
        vm.destroy(b)
    finally:
        for h in (a, b):
            h.run(["xl", "destroy", name], check=False)
        for d, img in zip(disks, imgs):
            clean_up(a, b, name, d, img)
        for h in (a, b):
            h.run(["rm", "-f", *recs, *(r + ".started" for r in recs)], check=False)


def test_a_config_with_other_disks_is_refused_before_anything_changes(pair: tuple[XenHost, XenHost],
                                                                       xen_report: dict[str, Any]) -> None:
    """`-- -C CONFIG` makes xl migrate start the guest on b with CONFIG's disks: dmmig compares
    them (parsed by libxl itself, `xl -N create`) with the running domain's, and refuses other
    disks before anything changes. Before, such a config was passed to xl unchecked, after the
    whole copy and cutover of disks the guest would then not use."""
    a, b = pair
    name = "xrcfg"
    img, other = f"/dev/shm/{name}.img", f"/dev/shm/{name}-other.img"
    disk = f"shm-{name}.img"
    a.run(["truncate", "-s", "16M", img])
    vm = DomU(a, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={img}", job=["idle"])
    wrong = f"/run/xenrig/{name}-other.cfg"
    try:
        vm.create()
        a.write_file(wrong, vm.config().replace(f"target={img}", f"target={other}"))
        # libxl's own view of the config, as dmmig reads it (tests/unit's sample has this shape)
        xen_report["xl -N create (a config with a block-dmmig disk)"] = a.run(["xl", "-N", "create", wrong]).out
        before = (a.run(["dmsetup", "table"]).out, a.sh(f"ls {STATE}", check=False).out,
                  b.sh(f"ls {STATE}; ls /dev/shm", check=False).out)
        r = a.run(migrate_argv(name, "--", "-C", wrong), check=False, timeout=300)
        assert r.rc == 3, r
        assert f"-C {wrong} does not describe {name}'s disks: xvda: target {other} in {wrong}, {img} running" \
            in r.err, r.err
        assert (a.run(["dmsetup", "table"]).out, a.sh(f"ls {STATE}", check=False).out,
                b.sh(f"ls {STATE}; ls /dev/shm", check=False).out) == before
        # the domain's own config passes the same check
        r = a.run(migrate_argv(name, "--dry-run", "--", "-C", vm.cfg_path), check=False, timeout=300)
        assert r.rc == 0 and f"xvda: {img} as dmmig disk {disk}" in r.out, r
    finally:
        clean_up(a, b, name, disk, img)
        a.run(["rm", "-f", wrong], check=False)


def test_dmmig_migrate_back_sends_only_what_the_guest_wrote_there(pair: tuple[XenHost, XenHost],
                                                                   xen_report: dict[str, Any]) -> None:
    """Issue 16 part 1 on Xen: `dmmig migrate` a -> b under writers, W written on b (an oracle in
    dom0 through blkback's device, and the guest), then `dmmig migrate` b -> a: the gate's yes
    recorded a generation on both hosts (a's fencing the image file itself once its loop device
    went), b's block-dmmig add put era under the top before blkback opened it, so the way back
    sends only the blocks written on b: no base pass, its first round <= W rounded to era blocks.
    On a, block by block: every write the guest acknowledged (on a, on b, on a again) and every
    write either oracle's kernel acknowledged; the rest of the disk the fill."""
    a, b = pair
    name, seed, gseed = "xrwarm", 61, 62
    img, rec_a, rec_b = f"/dev/shm/{name}.img", f"/run/{name}.rec", f"/run/{name}-b.rec"
    disk = f"shm-{name}.img"
    top = f"/dev/mapper/dmmig-{disk}"
    # 32 MiB = 8192 blocks of 4 KiB: a's oracle writes 0..1023, b's 2048..2559, the guest 6144..6399
    gstart, gcount, b_blocks = 6144, 256, (2048, 2560)
    a.run(["truncate", "-s", "32M", img])
    oracle(a, "fill", img, seed)
    vm = writing_guest(a, name, img, gseed, gstart, gcount)
    try:
        step("create")
        vm.create()
        vm.wait_console(r"XENRIG-ACK 20 ", timeout=180)
        writer = start_writer(a, top, seed, rec_a, "0:1024")
        step("migrate a -> b")
        job = a.spawn(migrate_argv(name, "--json", "--", "-e"), timeout=1200)
        wait_table(a, f"dmmig-{disk}", "mirror", 600, job)
        time.sleep(3)
        stop_writer(writer)
        r = wait_migrate(job, a, b, name, 420)
        assert r.rc == 0, r
        assert vm.domid(a) is None and vm.domid(b) is not None
        [there] = [e for e in events(r.out) if e["event"] == "summary"]
        step(f"on b: {there['disks'][disk]['handover']}")
        # both halves of one generation: a's fences the file itself (its loop device is gone)
        got = a.run(["cat", f"{STATE}/{disk}.warm.json"], check=False)
        assert got.rc == 0, ("a's half is gone", there["disks"][disk].get("finish"),
                             a.sh(f"grep -a -e {name} -e generation /var/log/xen/xen-hotplug.log | tail -30",
                                  check=False).out)
        kept = json.loads(got.out)
        took = json.loads(b.run(["cat", f"{STATE}/{disk}.warm.json"]).out)
        assert kept["role"] == "kept" and kept["path"] == img and kept["fence"]["device"] is None, kept
        assert took["role"] == "took-over" and took["tracking"] and took["generation"] == kept["generation"], took
        assert there["disks"][disk]["handover"]["generation"] == kept["generation"], there
        assert a.run(["losetup", "-j", img]).out.strip() == ""
        entry = json.loads(b.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "prepared" and entry["copy"]["warm"]["generation"] == kept["generation"], entry
        assert "warm: era tracks every write" in b.sh("cat /var/log/xen/xen-hotplug.log").out

        step("W on b")
        last_on_a = max(x.seq for x in pattern.acks(vm.console(a)))
        wb = b.spawn([PY, ORACLE, "write", top, "--seed", str(seed), "--record", rec_b,
                      "--blocks", f"{b_blocks[0]}:{b_blocks[1]}", "--count", "600"], timeout=600)
        assert wb.wait(300).rc == 0
        vm.wait_console(rf"XENRIG-ACK {last_on_a + 30} ", host=b, timeout=180)
        back = [DMMIG, "migrate", name, A_IP, "--remote-dmmig", DMMIG, *SSH_OPTS]
        r = b.run([*back, "--dry-run"], timeout=180)
        assert "warm: " in r.out and "MiB to send" in r.out, r.out
        step("migrate b -> a")
        job = b.spawn([*back, "--json", "--", "-e"], timeout=1200)
        r = wait_migrate(job, b, a, name, 600)
        assert r.rc == 0, r
        assert vm.domid(b) is None and vm.domid(a) is not None
        [summary] = [e for e in events(r.out) if e["event"] == "summary"]
        c = summary["disks"][disk]["copy"]
        step(f"copy back: {json.dumps({k: c[k] for k in ('warm', 'read', 'sent', 'zeroed', 'base', 'rounds')})}")
        era_block = entry["block_sectors"] * 512
        w = (b_blocks[1] - b_blocks[0]) * 4096 + gcount * 4096  # b's oracle's range and the guest's
        assert c["warm"].startswith("warm:"), c
        assert c["base"] is None, c
        # the first round: what b wrote since the generation (both ranges are era-block aligned;
        # one more era block each for the rounding the test does not rely on)
        assert 0 < c["rounds"][0]["read"] <= w + 2 * era_block, c
        # later rounds: only the guest still writes
        assert all(x["read"] <= gcount * 4096 + era_block for x in c["rounds"][1:]), c

        # on a, block by block
        console = vm.console(a) + vm.console(b)
        vm.wait_console(rf"XENRIG-ACK {max(x.seq for x in pattern.acks(console)) + 10} ", host=a, timeout=180)
        a.run(["xl", "pause", name])
        console = vm.console(a) + vm.console(b)
        got = guest_acks_on_disk(a, top, gseed, console)
        assert got["ok"], got
        a.write_file(rec_b, b.run(["cat", rec_b]).out)
        ok = oracle(a, "check", top, seed, "--record", rec_a, "--record", rec_b, "--blocks", f"0:{gstart}")
        assert ok is not None and ok["mismatches"] == 0 and ok["written_blocks"] > 400, ok
        a.write_file(rec_a + ".none", json.dumps({"last": {}}))
        assert oracle_check(a, top, seed, rec_a + ".none", f"{gstart + gcount}:8192")["mismatches"] == 0
        # the check is not blind: b's range differs from the fill on a
        assert oracle_check(a, top, seed, rec_a + ".none", f"{b_blocks[0]}:{b_blocks[1]}")["mismatches"] > 0
        xen_report["warm way back (32 MiB disk): first round read / W / all rounds read / cold would read"] = (
            c["rounds"][0]["read"], w, c["read"], 32 * MIB)
        xen_report["warm way back: gate suspend ms a->b / b->a"] = (
            round(there["disks"][disk]["handover"]["seconds"] * 1000),
            round(summary["disks"][disk]["handover"]["seconds"] * 1000))
        vm.destroy(a)
        # the generation the way back recorded on b (b kept its disk)
        assert b.run([DMMIG, "forget", disk], check=False).rc == 0
    finally:
        clean_up(a, b, name, disk, img)
        for h in (a, b):
            h.run(["rm", "-f", rec_a, rec_b, rec_a + ".started", rec_b + ".started", rec_a + ".none"], check=False)


# LVM of the test's own (tests/kernel/test_adopt.py's Vg): its configuration in a directory of
# its own (LVM_SYSTEM_DIR: nothing of /etc/lvm is read or written), one loop device PV
LVM_CONF = """devices {{ filter = [ "a|^{pv}$|", "r|.*|" ] global_filter = [ "a|^{pv}$|", "r|.*|" ]
  obtain_device_list_from_udev = 0 use_devicesfile = 0 }}
global {{ use_lvmlockd = 0 }}
backup {{ backup = 0 archive = 0 backup_dir = "{d}/backup" archive_dir = "{d}/archive" }}
activation {{ monitoring = 0 }}
"""


def make_lv(h: XenHost, vg: str, lv: str, mib: int) -> str:
    """/dev/VG/LV of MIB MiB on H, in a VG on a loop device over /dev/shm; udev's LVM
    autoactivation (69-lvm.rules, which would run vgchange with /etc/lvm) masked meanwhile."""
    d = f"/dev/shm/lvm-{vg}"
    h.sh("mkdir -p /run/udev/rules.d && echo '# dmmig test: no LVM autoactivation' > /run/udev/rules.d/69-lvm.rules"
         " && udevadm control --reload")
    h.run(["truncate", "-s", f"{mib + 8}M", f"{d}.pv"])
    pv = h.run(["losetup", "--find", "--show", f"{d}.pv"]).out.strip()
    h.run(["mkdir", "-p", d])
    h.write_file(f"{d}/lvm.conf", LVM_CONF.format(pv=pv, d=d))
    env = {"LVM_SYSTEM_DIR": d}
    h.run(["lvm", "pvcreate", "--yes", pv], env=env)
    h.run(["lvm", "vgcreate", vg, pv], env=env)
    h.run(["lvm", "lvcreate", "--yes", "-n", lv, "-L", f"{mib}M", vg], env=env)
    h.run(["lvm", "vgmknodes", vg], env=env)  # /dev/VG/LV, whether or not udev made it
    return f"/dev/{vg}/{lv}"


def remove_lv(h: XenHost, vg: str) -> None:
    d = f"/dev/shm/lvm-{vg}"
    env = {"LVM_SYSTEM_DIR": d}
    h.run(["lvm", "vgchange", "-an", vg], env=env, check=False)
    h.run(["lvm", "vgremove", "--yes", "-f", vg], env=env, check=False)
    h.sh(f"losetup -j {d}.pv | cut -d: -f1 | xargs -r -n1 losetup -d; rm -rf {d} {d}.pv "
         "/run/udev/rules.d/69-lvm.rules; udevadm control --reload", check=False)


def test_dmmig_migrate_adopts_a_phy_lv_on_the_stock_block_script(pair: tuple[XenHost, XenHost],
                                                                 xen_report: dict[str, Any]) -> None:
    """Issue 16 part 2: a guest started with `phy:/dev/VG/LV` (xl's stock block script, no
    block-dmmig anywhere in its config) is moved by `dmmig migrate` as it writes. dmmig adopts
    the LV (its table under dmmig's top, live), copies and mirrors it, and hands xl migrate
    (-C) the domain's config with that disk on block-dmmig, so b's add asks the handover gate.
    The guest's writes and those of an oracle writing in dom0 through the LV itself are all
    on b; a's LV has its own table back and every write of its time on a."""
    a, b = pair
    name, seed, gseed = "xradopt", 61, 62
    vg, lvname = "xrvg", "vm"
    disk = f"{vg}-{lvname}"           # block-dmmig's and dmmig's name for /dev/xrvg/vm
    rec = f"/run/{name}.rec"
    # 32 MiB = 8192 blocks of 4 KiB: the oracle writes 0..1023, the guest 6144..6399
    gstart, gcount = 6144, 256
    lv = make_lv(a, vg, lvname, 32)
    assert make_lv(b, vg, lvname, 32) == lv
    own_table = a.run(["dmsetup", "table", disk]).out
    oracle(a, "fill", lv, seed)
    vm = DomU(a, name, disk=f"phy:{lv},xvda,w",
              job=["workload", str(gseed), "/dev/xvda", str(gstart), str(gcount), "200"])
    try:
        step("create")
        vm.create()
        vm.wait_console(r"XENRIG-ACK 30 ", timeout=180)
        assert "script" not in vm.config()  # the stock block script: dmmig never touched this domain

        step("dry run")
        r = a.run(migrate_argv(name, "--dry-run", "--config", vm.cfg_path), timeout=300)
        assert f"xvda: {lv} (script /etc/xen/scripts/block): adopted first, live, as dmmig disk {disk}" in r.out, r
        assert f"xl migrate -C: {vm.cfg_path} with xvda on script=block-dmmig" in r.out, r
        assert f"script=block-dmmig,target={lv}' ]" in r.out, r
        assert not [ln for ln in a.run(["dmsetup", "ls"]).out.splitlines() if ln.startswith("dmmig-")]
        assert a.run(["dmsetup", "table", disk]).out == own_table

        step("writer")
        writer = start_writer(a, lv, seed, rec, "0:1024")  # through the LV: the path blkback takes
        step("migrate")
        t = time.monotonic()
        job = a.spawn(migrate_argv(name, "--json", "--config", vm.cfg_path, "--", "-e"), timeout=1200)
        wait_table(a, f"dmmig-{disk}", "mirror", 600, job)
        time.sleep(3)
        wrote = stop_writer(writer)
        r = wait_migrate(job, a, b, name, 480)
        step(f"migrate done: {r.rc}")
        assert r.rc == 0, r
        assert vm.domid(a) is None and vm.domid(b) is not None
        [summary] = [e for e in events(r.out) if e["event"] == "summary"]

        # on b the guest runs on block-dmmig (its add asked the gate): dmmig-DISK over the LV
        entry = json.loads(b.run(["cat", f"{STATE}/{disk}.json"]).out)  # only block-dmmig's add writes it
        assert entry["phase"] == "wrapped", entry
        on_a = pattern.acks(vm.console(a))
        vm.wait_console(rf"XENRIG-ACK {max(x.seq for x in on_a) + 20} ", host=b, timeout=180)
        b.run(["xl", "pause", name])
        top_b = f"/dev/mapper/dmmig-{disk}"
        got = guest_acks_on_disk(b, top_b, gseed, vm.console(a) + vm.console(b))
        assert got["ok"], got
        b.write_file(rec, a.run(["cat", rec]).out)
        ok = oracle_check(b, top_b, seed, rec, "0:6144")
        assert ok["mismatches"] == 0 and ok["written_blocks"] > 50, ok

        # a: the LV has its own table back, dmmig's devices are gone, every write is on it
        assert a.run(["dmsetup", "table", disk]).out == own_table
        assert not [ln for ln in a.run(["dmsetup", "ls"]).out.splitlines() if ln.startswith("dmmig-")]
        assert oracle_check(a, lv, seed, rec, "0:6144")["mismatches"] == 0
        on_b = pattern.acks(vm.console(b))
        gap = pattern.largest_gap(pattern.merge(on_a, on_b))
        d = summary["disks"][disk]
        xen_report["dmmig migrate, adopted phy: LV (32 MiB): total s / to mirror s / xl migrate s / finish s"] = (
            round(time.monotonic() - t, 1), summary["to_mirror_seconds"], summary["xl"]["seconds"],
            d["finish"]["seconds"])
        xen_report["dmmig migrate, adopted LV: guest downtime ms / oracle writes / guest writes acked"] = (
            round(gap.real_ms), wrote["writes"], len(pattern.merge(on_a, on_b)))
        vm.destroy(b)
    finally:
        for h in (a, b):
            h.run(["xl", "destroy", name], check=False)
        for h in (a, b):
            h.run([DMMIG, "abort", disk], check=False)
            h.run([DMMIG, "unwrap", "--force", disk], check=False)
            h.run(["rm", "-f", rec, rec + ".started", f"{STATE}/{disk}.dest.json"], check=False)
            remove_lv(h, vg)
