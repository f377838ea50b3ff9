"""The guest's write latency through the mirror's NBD leg, by tunnel, side by side in one rig
run (two UML kernels on a veth pair): serial O_DIRECT pwrites of 4 KiB and 64 KiB, p50/p99.

Rows, all to the same kind of export (dmmig's: qemu-nbd directsync on a unix socket on b):
- local:   the source's own disk (a loop device over /dev/shm) - the anchor;
- -tt:     the tunnel dmmig used before issue 13 (`ssh -tt -L ... 'exec sleep infinity'`), here
           forwarding to the export's unix socket, to /dev/nbdX;
- forward: dmmig's tunnel now (`ssh -T -L ... -- HOST dmmig agent hold NAME`), to /dev/nbdX;
- relay:   dmmig's tunnel where forwarding is refused (a unix socket whose connection becomes
           ssh's stdin/stdout; `dmmig agent relay NAME` on b), to /dev/nbdX;
- mirror forward / relay / nbd TLS / nbd plain: the top device while mirroring (dmmig cutover
           after `copy --tunnel ...` or `--transport nbd [--insecure]`), what the guest sees: both
           legs, each write acknowledged by both hosts (nbd TLS: through nbd-client's GnuTLS proxy);
           x1: the mirror as one dm-mirror target (before issue 14), x16/x32: sets of 16 and 32
           side by side (`cutover --resync-parts`; dmmig's default: 16 over ssh, 32 over nbd);
- ... Nagle on: the same mirror, the same connections, with Nagle's algorithm turned back on
           for the sockets qemu-nbd accepted on b (what qemu-nbd 7.2 does by itself; dmmig now
           hands it a listener with TCP_NODELAY, dmmig/adapters/listen.py): the cause of the ~45 ms cells.
           Each dm-mirror target flushes every leg after its log records regions as clean
           (dm-log disk_flush -> dm-raid1 mirror_flush), and with several targets that NBD flush is
           in flight next to the guest's next write (another target's); qemu-nbd's second reply
           then waits for the client's delayed ACK (40 ms) under Nagle.
Columns: p50/p99 per block size, `slow`: the share of writes of 35 ms or more (the delayed-ACK
mode), `fl/w`: NBD flushes per write on the leg. Ratios are against the local disk and against
-tt, measured in the same run.

    .venv/bin/python -m bench.leg_latency [WRITES]      (default 400 per row and size)
    ROWS=nbd .venv/bin/python -m bench.leg_latency      (only the local anchor and the nbd rows)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
SIZE_MIB = 64
# the top's mirror as one dm-mirror target (as before issue 14) and as sets side by side
PARTS = {"ssh": (1, 16), "nbd": (1, 16, 32)}

WRITER = r"""
import json, mmap, os, random, statistics, sys, time
dev, n = sys.argv[1], int(sys.argv[2])
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
out = {}
for bs in (4096, 65536):
    buf = mmap.mmap(-1, bs)
    buf[:] = os.urandom(bs)
    rnd = random.Random(bs)
    lat = []
    for i in range(n + 20):
        off = rnd.randrange(size // bs) * bs
        t = time.perf_counter()
        os.pwrite(fd, buf, off)
        if i >= 20:   # warm-up
            lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    out[bs] = {"p50": statistics.median(lat), "p99": lat[int(len(lat) * 0.99) - 1],
               "slow": sum(x >= 35 for x in lat) / len(lat)}
os.close(fd)
print(json.dumps(out))
"""

# a tunnel of the given mode to disk NAME's export on b, through dmmig's own code (or the old argv)
TUNNEL = r"""
import json, sys
from dmmig.adapters import tunnel
from dmmig.adapters.runner import SubprocessRunner
mode, name, local, remote, log = sys.argv[1:6]
dest = json.loads(sys.argv[6])
r = SubprocessRunner()
if mode == "tt":   # before issue 13: a pty, and a command that ends with the pty's hangup
    argv = ["ssh", "-F", "none", "-tt", "-p", str(dest["port"]), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={dest['known_hosts']}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "StreamLocalBindMask=0177", "-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote}",
            "-o", "IdentitiesOnly=yes", "-i", dest["identity"], "-E", log, f"{dest['user']}@{dest['host']}",
            "exec sleep infinity"]
    pid = r.spawn(argv, logfile=log)
    import os, time
    while not os.path.exists(local):
        time.sleep(0.05)
else:  # tunnel.start reads the destination's attributes (agentcmd.Target)
    from types import SimpleNamespace
    pid = tunnel.start(r, mode, SimpleNamespace(**dest), name, local, remote, log)
print(pid)
"""


# on b: Nagle on (0) or off (1) for every socket qemu-nbd PID accepted on PORT, through its
# own file table (pidfd_getfd): the same connections, only TCP_NODELAY changes
NAGLE = r"""
import ctypes, os, socket, sys
pid, port, val = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
pidfd, n = os.pidfd_open(pid), 0
for fd in os.listdir(f"/proc/{pid}/fd"):
    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
        continue
    ours = libc.syscall(438, pidfd, int(fd), 0)
    if ours < 0:
        sys.exit(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
    s = socket.socket(fileno=ours)
    if (s.family == socket.AF_INET and s.getsockname()[1] == port
            and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, val)
        n += 1
    s.close()
print(n)
"""


def flushes(a: UmlHost, dev: str) -> int:
    """Flush requests completed by DEV (/sys/block/X/stat: the 16th field, flush I/Os)."""
    return int(a.run(["cat", f"/sys/block/{os.path.basename(dev)}/stat"]).out.split()[15])


def write_latency(a: UmlHost, dev: str, n: int, leg: str | None = None) -> dict:
    f0 = flushes(a, leg) if leg else 0
    r = {int(k): v for k, v in json.loads(a.run([PY, "-c", WRITER, dev, str(n)]).out).items()}
    if leg:
        r[0] = (flushes(a, leg) - f0) / (2 * (n + 20))
    return r


def leg(a: UmlHost, mode: str, name: str, remote_sock: str, n: int) -> dict:
    dest = {"host": B_IP, "user": "root", "port": 22, "known_hosts": "/run/ssh/known_hosts",
            "identity": "/run/ssh/id_ed25519", "remote_dmmig": DMMIG, "remote_state_dir": None}
    local, log = f"/run/bench-{mode}.sock", f"/run/bench-{mode}.log"
    pid = a.run([PY, "-c", TUNNEL, mode, name, local, remote_sock, log, json.dumps(dest)]).out.strip()
    try:
        a.run(["nbd-client", "-N", name, "-u", local, "/dev/nbd0", "-b", "512", "-t", "30"])
        try:
            return write_latency(a, "/dev/nbd0", n)
        finally:
            a.run(["nbd-client", "-d", "/dev/nbd0"])
    finally:
        a.sh(f"kill {pid}; rm -f {local} {log}; true")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    only_nbd = os.environ.get("ROWS") == "nbd"
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    rows: dict[str, dict] = {}
    top = "/dev/mapper/dmmig-lat"
    try:
        a, b = p.start()
        a.sh(f"truncate -s {SIZE_MIB}M /dev/shm/src && losetup /dev/loop0 /dev/shm/src")
        b.sh(f"truncate -s {SIZE_MIB}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
        try:
            rows["local"] = write_latency(a, "/dev/loop0", n)
            a.dmmig("wrap", "lat", "/dev/loop0")
            a.dmmig("prepare", "lat")
            mirrors = [("mirror nbd TLS", ["--transport", "nbd", "--nbd-address", B_IP]),
                       ("mirror nbd plain", ["--transport", "nbd", "--nbd-address", B_IP, "--insecure"])]
            if not only_nbd:
                a.dmmig("copy", "lat", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG,
                        *SSH_OPTS)
                sock = json.loads(a.dmmig("status", "lat", "--json").out)["journal"]["dest"]["export"]["socket"]
                for mode in ("tt", "forward", "relay"):
                    rows[{"tt": "-tt"}.get(mode, mode)] = leg(a, mode, "lat", sock, n)
                mirrors = [("mirror forward", ["--tunnel", "forward"]), ("mirror relay", ["--tunnel", "relay"]),
                           *mirrors]
            for row, extra in mirrors:
                nbd = "nbd" in row
                if nbd:   # another transport: another destination record
                    a.dmmig("abort", "lat")
                    a.dmmig("prepare", "lat")
                a.dmmig("copy", "lat", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG,
                        *SSH_OPTS, *extra)
                for parts in PARTS["nbd" if nbd else "ssh"]:  # a rerun of cutover starts again from linear over era
                    a.dmmig("cutover", "lat", "--resync-parts", str(parts))
                    if not nbd:
                        rows[f"{row} x{parts}"] = write_latency(a, top, n)
                        continue
                    j = json.loads(a.dmmig("status", "lat", "--json").out)["journal"]
                    dev, exp = j["mirror"]["nbd"], j["dest"]["export"]
                    rows[f"{row} x{parts}"] = write_latency(a, top, n, dev)
                    conns = b.run([PY, "-c", NAGLE, str(exp["pid"]), str(exp["port"]), "0"]).out.strip()
                    rows[f"{row} x{parts} Nagle on"] = dict(write_latency(a, top, n, dev), conns=conns)
                    b.run([PY, "-c", NAGLE, str(exp["pid"]), str(exp["port"]), "1"])
            a.dmmig("finish", "lat")
            a.dmmig("unwrap", "lat")
        finally:
            a.sh(f"{DMMIG} abort lat; {DMMIG} unwrap lat; losetup -d /dev/loop0; rm -f /dev/shm/src; true")
            b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst; true")
    finally:
        p.stop()
    print(f"serial O_DIRECT pwrite latency, ms ({n} writes per cell), two UML kernels on a veth pair")
    print(f"{'':30} {'4K p50':>7} {'4K p99':>7} {'slow':>5} {'64K p50':>7} {'64K p99':>7} {'slow':>5} {'fl/w':>5}"
          "   64K p50 vs local, vs -tt")
    for k, r in rows.items():
        print(f"{k:30} {r[4096]['p50']:7.2f} {r[4096]['p99']:7.2f} {r[4096]['slow']:5.0%}"
              f" {r[65536]['p50']:7.2f} {r[65536]['p99']:7.2f} {r[65536]['slow']:5.0%}"
              + (f" {r[0]:5.2f}" if 0 in r else f" {'':5}")
              + f"   {r[65536]['p50'] / rows['local'][65536]['p50']:6.1f}x"
              + (f" {r[65536]['p50'] / rows['-tt'][65536]['p50']:5.2f}x" if "-tt" in rows else "")
              + (f"   ({r['conns']} connections toggled)" if "conns" in r else ""))


if __name__ == "__main__":
    main()
