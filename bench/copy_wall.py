"""The whole wall time of `dmmig copy` against nbdcopy, side by side in one rig run (two UML
kernels on a veth pair), as ratios (issue 14 part 4: fixed costs):

- anchor: `nbdcopy SRC nbd://b:10809/x` to a qemu-nbd export of the destination disk on b's
  address over plain TCP, started by hand with the options dmmig's exports use (directsync,
  --shared=8, so nbdcopy's default 4 connections); the issue's "nbdcopy to a qemu-nbd
  export". Also, as a second anchor, nbdcopy to dmmig's own export reached the way
  `--transport ssh` reaches it: OpenSSH running `dmmig agent relay NAME` on b, which relays to
  the export's root-only unix socket (the mirror leg's relay-mode tunnel; one NBD connection;
  nbdcopy's `[ CMD ]` is socket activation, not a command's stdin/stdout);
- a third anchor: nbdcopy to dmmig's own TLS export of --transport nbd, with that migration's
  client credentials (nbds://);
- `dmmig copy NAME root@b --dest-disk ... --json`, the whole process from exec to exit (Python's
  start included), over --transport ssh, --transport nbd (TLS) and --transport nbd --insecure,
  with the summary's breakdown of where the time went;
- an era round with 1% of a 1 GiB disk dirty (a second `dmmig copy`, whole wall time, and the
  round's own copy time) against that disk's base copy (the first `dmmig copy`).

Each row also says how many seconds of this machine's CPU both kernels used (each rig kernel is
one CPU; on a shared, loaded machine wall times drift 2-3x between runs, CPU seconds much less).

The 192 MiB source disk is half random data (its first half) and half zeros (its second half);
the 1 GiB one likewise. The kernels get 3 GiB each so that a 1 GiB /dev/shm disk fits (a
kernel's /dev/shm holds half its memory). Every dmmig run starts from a fresh `prepare` and an
existing (not created, so not known-zero) destination disk: zeros go as NBD write-zeroes, as
nbdcopy sends them.

With --base DIR (a tree holding an older dmmig/ package, e.g. `git archive COMMIT dmmig | tar -x
-C DIR`, under /var/tmp so that the kernels see it), the same rows also run that dmmig (on both
hosts, through DIR/bin/dmmig, which this bench writes) in the same run: before and after, side
by side on a machine whose speed drifts. --dmmig DIR likewise runs the version under test from
such a copy (the kernels run this checkout's files as they are at each command's start).

    .venv/bin/python -m bench.copy_wall [--reps N] [--base DIR]   (default 2 reps: rows alternate, best of N)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from bench import libraries
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, RigError, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
MIB = 1 << 20

# times ARGV from its exec to its exit inside the guest (the rig's own round trip left out)
TIMER = r"""
import subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
print(f"WALL {time.monotonic() - t:.3f}", file=sys.stderr)
sys.exit(r.returncode)
"""
OPENSSH = ["ssh", "-F", "none", "-T", "-e", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", "UserKnownHostsFile=/run/ssh/known_hosts", "-o", "IdentitiesOnly=yes", "-i", "/run/ssh/id_ed25519"]


def host_cpu(ifname: str) -> float:
    """CPU seconds (user+system, exited children included) this machine spent on the rig kernel
    whose command line names IFNAME (its veth end): every process of that kernel."""
    tot = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"ifname={ifname}".encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                tot += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
        except OSError:
            pass
    return tot / os.sysconf("SC_CLK_TCK")


VETH: list[str] = []  # the rig's two veth ends (a, b), once it runs: what host_cpu counts
CPU_LAST: list[tuple[float, float]] = []  # host CPU seconds of a and b during a row's first timed()


def timed(h: UmlHost, argv: list[str]) -> tuple[float, str]:
    c0 = [host_cpu(v) for v in VETH]
    r = h.run([PY, "-c", TIMER, *argv], timeout=900)
    if VETH and not CPU_LAST:  # the first since cpu_of cleared it: the row's own command
        CPU_LAST[:] = [(host_cpu(VETH[0]) - c0[0], host_cpu(VETH[1]) - c0[1])]
    wall = float(r.err.strip().splitlines()[-1].split()[1])
    return wall, r.out


def summary(out: str) -> dict[str, Any]:
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return [x for x in lines if x.get("event") == "summary"][-1]


def disks(a: UmlHost, b: UmlHost, name: str, mib: int) -> None:
    """Source: its first half random, its second half zeros; destination: an existing disk."""
    a.sh(f"dd if=/dev/urandom of=/dev/shm/{name} bs=1M count={mib // 2} status=none && "
         f"truncate -s {mib}M /dev/shm/{name} && losetup -f --show /dev/shm/{name} > /dev/shm/{name}.loop")
    b.sh(f"truncate -s {mib}M /dev/shm/{name} && losetup -f --show /dev/shm/{name} > /dev/shm/{name}.loop")


def loop(h: UmlHost, name: str) -> str:
    return h.run(["cat", f"/dev/shm/{name}.loop"]).out.strip()


def drop(a: UmlHost, b: UmlHost, name: str) -> None:
    for h in (a, b):
        h.sh(f"losetup -d $(cat /dev/shm/{name}.loop); rm -f /dev/shm/{name} /dev/shm/{name}.loop; true")


def nbdcopy_tcp(a: UmlHost, b: UmlHost, name: str) -> float:
    src, dst = loop(a, name), loop(b, name)
    b.run(["qemu-nbd", "--fork", "--pid-file=/run/bench-nbd.pid", "--persistent", "--shared=8", "--format=raw",
           "--cache=directsync", "--discard=unmap", f"--bind={B_IP}", "--port=10809", "--export-name=x", dst])
    try:
        return timed(a, ["nbdcopy", src, f"nbd://{B_IP}:10809/x"])[0]
    finally:
        b.sh("kill $(cat /run/bench-nbd.pid); while [ -e /proc/$(cat /run/bench-nbd.pid) ]; do sleep 0.1; done; true")


def nbdcopy_relay(a: UmlHost, src: str, name: str, dmmig: str) -> float | None:
    """nbdcopy over OpenSSH running `dmmig agent relay NAME` on b: the mirror leg's relay-mode
    tunnel (dmmig.adapters.tunnel's listener hands its one connection to ssh), so one NBD connection."""
    sock = "/run/bench-relay.sock"
    tree = os.path.dirname(os.path.dirname(dmmig)) if dmmig != DMMIG else str(ROOT)
    for attempt in (1, 2):
        job = a.spawn([PY, "-P", "-m", "dmmig.adapters.tunnel", "accept", sock, "--", *OPENSSH, f"root@{B_IP}",
                       dmmig, "agent", "relay", name], env={"PYTHONPATH": tree})
        a.sh(f"while [ ! -S {sock} ]; do sleep 0.05; done")
        try:
            return timed(a, ["nbdcopy", "-C", "1", src, f"nbd+unix:///{name}?socket={sock}"])[0]
        except RigError as e:
            print(f"nbdcopy through the relay failed (attempt {attempt}): {str(e)[-300:]}; the relay said: "
                  f"{job.wait().err[-1000:]}", file=sys.stderr)
            time.sleep(1)
        else:
            job.wait()
    return None


def nbdcopy_tls(a: UmlHost, src: str, name: str, dmmig: str) -> float:
    """nbdcopy to dmmig's own TLS export (--transport nbd), with this migration's client
    credentials: the same export, TLS and connection set-up as dmmig's copier."""
    dest = json.loads(a.run([dmmig, "status", name, "--json"]).out)["journal"]["dest"]
    exp = dest["export"]
    return timed(a, ["nbdcopy", src, f"nbds://{exp['addr']}:{exp['port']}/{name}?tls-certificates={dest['tls']}"])[0]


def dmmig_copy(a: UmlHost, b: UmlHost, name: str, transport: str, dmmig: str, *, anchor: bool = False
               ) -> tuple[float, dict[str, Any], float | None]:
    """(wall seconds, summary, nbdcopy to the same export the way dmmig reached it, if asked).
    TRANSPORT: ssh, nbd (TLS) or nbd-insecure."""
    src, dst = loop(a, name), loop(b, name)
    a.run([dmmig, "wrap", name, src])
    a.run([dmmig, "prepare", name])
    extra = {"ssh": [], "nbd": ["--transport", "nbd", "--nbd-address", B_IP],
             "nbd-insecure": ["--transport", "nbd", "--nbd-address", B_IP, "--insecure"]}[transport]
    try:
        wall, out = timed(a, [dmmig, "copy", name, f"root@{B_IP}", "--dest-disk", dst, "--remote-dmmig", dmmig,
                              *SSH_OPTS, "--json", *extra])
        s = summary(out)
        same = None
        if anchor and transport == "ssh":  # dmmig's export is still up (copied, not cut over)
            same = nbdcopy_relay(a, src, name, dmmig)
        elif anchor and transport == "nbd":
            same = nbdcopy_tls(a, src, name, dmmig)
        return wall, s, same
    finally:
        a.run([dmmig, "abort", name])
        a.run([dmmig, "unwrap", name])


def one_percent_round(a: UmlHost, b: UmlHost, name: str, mib: int, dmmig: str) -> dict[str, Any]:
    src, dst = loop(a, name), loop(b, name)
    a.run([dmmig, "wrap", name, src])
    a.run([dmmig, "prepare", name])
    try:
        base_wall, out = timed(a, [dmmig, "copy", name, f"root@{B_IP}", "--dest-disk", dst, "--remote-dmmig", dmmig,
                                   *SSH_OPTS, "--json"])
        base = summary(out)
        # 1% of the disk dirty, in 4 KiB writes kept inside its first 1% (spread over all of it,
        # they would dirty 16x as many 64 KiB era blocks)
        blocks = mib * 256 // 100
        a.run([PY, ORACLE, "write", f"/dev/mapper/dmmig-{name}", "--record", "/dev/shm/bench.rec",
               "--count", str(4 * blocks), "--blocks", f"0:{blocks}"], timeout=600)
        round_wall, out = timed(a, [dmmig, "copy", name, "--json"])
        rnd = summary(out)
        return {"base_wall": base_wall, "base": base, "round_wall": round_wall, "round": rnd}
    finally:
        a.run([dmmig, "abort", name])
        a.run([dmmig, "unwrap", name])
        a.sh("rm -f /dev/shm/bench.rec*")


def fmt_breakdown(s: dict[str, Any]) -> str:
    t = dict(s.get("timing") or {})
    if not t:
        return "(no breakdown in this version's summary)"
    over = t.pop("overlapped", None) or {}
    total = t.pop("total", 0)
    other = total - sum(t.values())
    nbd = s.get("nbd")
    return ((f"[{nbd['path']}, {nbd['connections']} connection(s)] " if nbd else "")
            + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) + f", other {other:.2f} (of {total:.2f})"
            + (f"; overlapped: {', '.join(f'{k} {v:.2f}' for k, v in over.items())}" if over else ""))


def wrapper(base: str) -> str:
    """DIR/bin/dmmig: the dmmig/ package in DIR, with this venv's Python (-P: not the one in the
    working directory)."""
    path = os.path.join(base, "bin", "dmmig")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nPYTHONPATH={base} exec {PY} -P -m dmmig \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--base", help="a directory holding an older dmmig/ package, run side by side")
    ap.add_argument("--dmmig", help="a directory holding the dmmig/ package under test (default: this "
                                    "checkout; a copy keeps edits made during the run out of it)")
    ap.add_argument("--no-big", action="store_true", help="skip the 1 GiB round")
    ap.add_argument("--transports", default="ssh,nbd,nbd-insecure", help="the dmmig rows to run (comma-separated)")
    args = ap.parse_args()
    size, big = 192, 1024
    versions = {"": wrapper(os.path.abspath(args.dmmig)) if args.dmmig else DMMIG,
                **({" (base)": wrapper(os.path.abspath(args.base))} if args.base else {})}
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"), mem="3G")
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}
    VETH[:] = [p.va, p.vb]

    def cpu_of(label: str, fn: Any) -> Any:
        """FN's result; the CPU of its first timed() command (the row's own, not an anchor's)."""
        CPU_LAST.clear()
        got = fn()
        cpu.setdefault(label, []).append(CPU_LAST[0] if CPU_LAST else (float("nan"), float("nan")))
        return got
    last: dict[str, dict[str, Any]] = {}
    rounds: dict[str, dict[str, Any]] = {}
    try:
        a, b = p.start()
        disks(a, b, "cw", size)
        for _ in range(args.reps):  # alternating: the rig's speed drifts (a shared machine)
            rows.setdefault("nbdcopy tcp", []).append(cpu_of("nbdcopy tcp", lambda: nbdcopy_tcp(a, b, "cw")))
            for v, dmmig in versions.items():
                for t in args.transports.split(","):
                    wall, s, same = cpu_of(f"dmmig copy {t}{v}",
                                           lambda t=t, dmmig=dmmig, v=v: dmmig_copy(a, b, "cw", t, dmmig, anchor=not v))
                    rows.setdefault(f"dmmig copy {t}{v}", []).append(wall)
                    last[f"{t}{v}"] = s
                    if same is not None or (not v and t in ("ssh", "nbd")):
                        label = {"ssh": "nbdcopy ssh relay", "nbd": "nbdcopy nbd TLS"}[t]
                        rows.setdefault(label, []).append(same if same is not None else float("nan"))
        drop(a, b, "cw")
        if not args.no_big:
            disks(a, b, "cwbig", big)
            for v, dmmig in versions.items():
                rounds[v] = one_percent_round(a, b, "cwbig", big, dmmig)
            drop(a, b, "cwbig")
    finally:
        p.stop()
    print(json.dumps({"rows": rows, "cpu": cpu, "last": last, "rounds": rounds}))
    anchor = min(rows["nbdcopy tcp"])
    print(f"disk {size} MiB (first half random, second half zeros), two UML kernels on a veth pair, "
          f"best of {args.reps}; {libraries()}")
    def best(k: str) -> float:
        return min((x for x in rows[k] if x == x), default=float("nan"))  # NaN: that run failed
    for k, v in rows.items():
        print(f"  {k:26} {best(k):6.2f}s  ({best(k) / anchor:.2f}x nbdcopy tcp)   runs: "
              + " ".join(f"{x:.2f}" for x in v)
              + ("   cpu a+b: " + " ".join(f"{x:.1f}+{y:.1f}" for x, y in cpu[k]) if k in cpu else ""))
    for mine, theirs in (("dmmig copy ssh", "nbdcopy ssh relay"), ("dmmig copy nbd", "nbdcopy nbd TLS"),
                         ("dmmig copy nbd-insecure", "nbdcopy tcp")):
        if mine not in rows:
            continue
        print(f"  {mine} / {theirs} (the same way to an export): {best(mine) / best(theirs):.2f}x")
    for k, s in last.items():
        print(f"  dmmig copy {k} (last run): copier {s['seconds']:.2f}s; {fmt_breakdown(s)}")
    for v, r1 in rounds.items():
        rb, rr = r1["base"], r1["round"]
        rnd = rr["rounds"][0] if rr.get("rounds") else {}
        print(f"disk {big} MiB, --transport ssh{v}: base copy {r1['base_wall']:.2f}s wall "
              f"(copier {rb['seconds']:.2f}s); "
              f"a round with 1% dirty ({rnd.get('dirty_bytes', 0) >> 10} KiB): {r1['round_wall']:.2f}s wall = "
              f"{100 * r1['round_wall'] / r1['base_wall']:.1f}% of the base copy's wall; the round itself (era "
              f"snapshot + copy) {rnd.get('era_seconds', 0) + rnd.get('seconds', 0):.2f}s = "
              f"{100 * (rnd.get('era_seconds', 0) + rnd.get('seconds', 0)) / r1['base_wall']:.1f}%")
        print(f"  round: {fmt_breakdown(rr)}")
        print(f"  base:  {fmt_breakdown(rb)}")


if __name__ == "__main__":
    main()
