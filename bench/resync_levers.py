"""What makes dm-mirror's resync to an NBD leg fast: the levers of issue 14, side by side in
one rig run, on hand-built tables (no dmmig flow around them, so only the kernel is timed).

For each link (as is, then +RTT by netem) and each way to reach the export (ssh: OpenSSH's
-L unix-socket forward with a command, as dmmig's tunnel; nbd: plain TCP), the anchor is
`nbdcopy` of the same delta over the same path; then for each (region size, number of mirror
targets side by side, nbd-client connections) the whole top table is built over leg 0 = the
source disk and leg 1 = the export, with a disk log per target marking the delta's regions
out of sync, and the time until every target is in sync is taken.

CONNS above 1 changes nothing in the rig: its kernels have one CPU, so the nbd device has one
blk-mq hardware queue and the driver sends every request on its first connection (design.md,
Resync speed).

    [CONFIGS=KIB:PARTS:CONNS,...] .venv/bin/python -m bench.resync_levers [SIZE_MIB [DELAYS [PATTERNS [HOWS]]]]
    (default 96 0,2ms half,all ssh,tls,tcp; a delay of 0 is the link as is)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from tests.rig.pair import B_IP, Pair
from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
SSH = ["ssh", "-T", "-i", "/run/ssh/id_ed25519", "-o", "UserKnownHostsFile=/run/ssh/known_hosts",
       "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
DELAYS: list[str | None] = []
PATTERNS: list[str] = []
HOWS: list[str] = []
# (region KiB, mirror targets, nbd connections)
CONFIGS = ([tuple(int(x) for x in c.split(":")) for c in os.environ["CONFIGS"].split(",")] if os.environ.get("CONFIGS")
           else [(64, 1, 1), (64, 4, 1), (64, 16, 1), (64, 16, 4), (64, 32, 1), (1024, 4, 1), (1024, 16, 1),
                 (4096, 4, 1)])

BUILD = r"""
import os, sys, time, subprocess
from dmmig.core import mirrorlog
size, region_kib, k, pattern = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
src, leg = "/dev/loop0", "/dev/nbd0"
sectors = size * 2048
rs = region_kib * 2
blocks = sectors // 128
dirty_blocks = range(0, blocks, 2) if pattern == "half" else range(blocks)
seg = -(-sectors // k // rs) * rs          # each target covers whole regions
lines, logs, want_out = [], [], 0
for i in range(k):
    start = i * seg
    length = min(seg, sectors - start)
    if length <= 0:
        break
    nr = mirrorlog.region_count(length, rs)
    out = sorted({(b * 128 - start) // rs for b in dirty_blocks if start <= b * 128 < start + length})
    path = f"/dev/shm/log-{os.getpid()}-{i}"
    with open(path, "wb") as f:
        f.write(mirrorlog.render(nr, out))
    dev = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True, check=True).stdout.strip()
    logs.append(dev)
    want_out += len(out)
    lines.append(f"{start} {length} mirror disk 2 {dev} {rs} 2 {src} {start} {leg} {start} 2 handle_errors keep_log")
t0 = time.monotonic()  # create = load + resume: the disk logs are read at the resume
subprocess.run(["dmsetup", "create", "lever", "--table", "\n".join(lines)], check=True)
first = subprocess.run(["dmsetup", "status", "lever"], capture_output=True, text=True, check=True).stdout
seen_out = sum(int(b) - int(a) for a, b in (l.split()[6].split("/") for l in first.splitlines()))
while True:
    st = subprocess.run(["dmsetup", "status", "lever"], capture_output=True, text=True, check=True).stdout
    done = all(a == b for a, b in (l.split()[6].split("/") for l in st.splitlines()))
    if done:
        break
    if "D" in "".join(l.split()[8] for l in st.splitlines()):
        print("LEG FAILED", st); break
    time.sleep(0.02)
dt = time.monotonic() - t0
subprocess.run(["dmsetup", "remove", "lever"], check=True)
for d in logs:
    subprocess.run(["losetup", "-d", d], check=True)
for i in range(len(logs)):
    os.unlink(f"/dev/shm/log-{os.getpid()}-{i}")
# what the destination must now hold: the source's bytes on every region resynced, zeros elsewhere
import hashlib
h = hashlib.sha256()
dirty_regions = {b * 128 // rs for b in dirty_blocks}
with open(src, "rb") as f:
    for r in range(-(-sectors // rs)):
        n = min(rs, sectors - r * rs) * 512
        h.update(f.read(n) if r in dirty_regions else (f.seek(n, 1), bytes(n))[1])
print(f"{want_out}/{seen_out}", dt, h.hexdigest())
"""


TLS = ["--enable-tls", "--cacertfile", "/run/tls/ca-cert.pem", "--certfile", "/run/tls/client-cert.pem",
       "--keyfile", "/run/tls/client-key.pem", "--tlshostname", B_IP]


def attach(a: UmlHost, how: str, conns: int) -> None:
    where = {"ssh": ["-u", "/run/t.sock"], "tcp": [B_IP, "10809"], "tls": [B_IP, "10810", *TLS]}[how]
    a.run(["nbd-client", "-N", "e", *where, "/dev/nbd0", "-b", "512", "-t", "10",
           *(["-C", str(conns)] if conns > 1 else [])])


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 96
    global DELAYS, PATTERNS
    DELAYS = [None if d == "0" else d for d in sys.argv[2].split(",")] if len(sys.argv) > 2 else [None, "2ms"]
    PATTERNS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["half", "all"]
    global HOWS
    HOWS = sys.argv[4].split(",") if len(sys.argv) > 4 else ["ssh", "tls", "tcp"]
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        for h in (a, b):
            h.run(["modprobe", "--dirname=/run/mods", "sch_netem"])
            h.run(["modprobe", "--dirname=/run/mods", "nbd"], check=False)
        a.sh(f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={size} status=none && losetup /dev/loop0 /dev/shm/src")
        b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst && mkdir -p -m 700 /run/x")
        b.run(["qemu-nbd", "--fork", "--persistent", "--shared=16", "--format=raw", "--cache=directsync",
               "--export-name=e", "--socket=/run/x/e.sock", "/dev/loop0"])
        b.run(["qemu-nbd", "--fork", "--persistent", "--shared=16", "--format=raw", "--cache=directsync",
               "--export-name=e", f"--bind={B_IP}", "--port=10809", "/dev/loop0"])
        # --transport nbd: TLS with this run's x509 set (dmmig.adapters.tlscreds, as a migration makes it)
        a.sh("mkdir -p -m 700 /run/tls")
        a.py("import sys; from dmmig.adapters import tlscreds; tlscreds.make('/run/tls', sys.argv[1])", B_IP,
             cwd=str(ROOT))
        b.sh("mkdir -p -m 700 /run/tls")
        for f in a.sh("ls /run/tls").out.split():
            b.run(["sh", "-c", f"cat > /run/tls/{f}"], input=a.run(["cat", f"/run/tls/{f}"]).out.encode())
        b.run(["qemu-nbd", "--fork", "--persistent", "--shared=16", "--format=raw", "--cache=directsync",
               "--export-name=e", f"--bind={B_IP}", "--port=10810", "--object",
               "tls-creds-x509,id=t,dir=/run/tls,endpoint=server,verify-peer=on", "--tls-creds=t", "/dev/loop0"])
        tun = a.spawn([*SSH, "-L", "/run/t.sock:/run/x/e.sock", f"root@{B_IP}", "exec sleep infinity"])
        for _ in range(100):
            if a.run(["test", "-S", "/run/t.sock"], check=False).rc == 0:
                break
            time.sleep(0.1)
        print(f"disk {size} MiB; delta 'half' = every other 64 KiB block ({size // 2} MiB), 'all' = every block")
        for delay in DELAYS:
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "add", "dev", "vec0", "root", "netem", "delay", delay])
            rtt = a.sh(f"ping -c 5 -i 0.2 -q {B_IP} | tail -1").out.strip()
            print(f"link {'+' + delay + ' each way' if delay else 'as is'}: {rtt}")
            for how in HOWS:
                uri = {"ssh": "nbd+unix:///e?socket=/run/t.sock", "tcp": f"nbd://{B_IP}:10809/e",
                       "tls": f"nbds://{B_IP}:10810/e?tls-certificates=/run/tls&tls-hostname={B_IP}"}[how]
                t0 = time.monotonic()
                a.run(["nbdcopy", "--destination-is-zero", "/dev/loop0", uri])
                anchor = size / (time.monotonic() - t0)
                print(f"  {how}: nbdcopy whole disk {anchor:6.2f} MiB/s (anchor)")
                for pattern in PATTERNS:
                    for kib, k, conns in CONFIGS:
                        b.run(["dd", "if=/dev/zero", "of=/dev/loop0", "bs=1M", f"count={size}", "oflag=direct"])
                        attach(a, how, conns)
                        try:
                            out = a.py(BUILD, str(size), str(kib), str(k), pattern, cwd=str(ROOT)).out.split()
                        finally:
                            a.run(["nbd-client", "-d", "/dev/nbd0"], check=False)
                        dt, want = float(out[-2]), out[-1]
                        marked, seen = out[-3].split("/")
                        got = b.sh("sha256sum /dev/loop0").out.split()[0]
                        ok = "" if got == want else "  DESTINATION WRONG"
                        delta = size // 2 if pattern == "half" else size
                        rate = delta / dt
                        print(f"    {pattern:4s} region {kib:5d} KiB x{k:2d} targets, {conns} conn: {dt:6.2f} s, "
                              f"delta {rate:6.2f} MiB/s = {rate / anchor:.2f}x nbdcopy{ok}"
                              + ("" if marked == seen else f"  KERNEL SAW {seen} OUT OF SYNC, NOT {marked}"))
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "del", "dev", "vec0", "root"])
        tun.signal(15)
    finally:
        p.stop()


if __name__ == "__main__":
    main()
