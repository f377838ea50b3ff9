"""The copier's way to the export, before and after issue 13, side by side in one rig run (two
UML kernels on a veth pair), as ratios:

- direct-tcpip: before - paramiko's TCP forward to qemu-nbd on b's 127.0.0.1 (any local user
  there could connect to that export);
- relay: now - a paramiko exec channel running `dmmig agent relay NAME` on b, which relays to
  the export's root-only unix socket (works with a key that allows no forwarding);
- openssh forward / openssh relay: the mirror leg's OpenSSH tunnel in either mode, libnbd on its
  local socket (a candidate for the copier: C on both ends in forward mode);
- dmmig copy (its copier's time) over ssh (relay), and over --transport nbd with TLS and with
  --insecure.

The first two copy the same random disk with dmmig's own Copier, from one Python process on a,
to the same kind of qemu-nbd export (directsync) of a disk of the same size on b.

    .venv/bin/python -m bench.copy_channel [SIZE_MIB]      (default 128)
"""
from __future__ import annotations

import json
import sys
import tempfile

from tests.rig.output import summary
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")

COPY = r"""
import json, socket, sys, threading, time
from dmmig.adapters import nbd
from dmmig.core.copier import Copier
from types import SimpleNamespace

from dmmig.adapters.agentcmd import agent_argv
from dmmig.adapters.ssh import Endpoint, connect, relay_socket
how, src, name, port, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
c = connect(Endpoint(sys.argv[6], "root", 22, "/run/ssh/known_hosts", "/run/ssh/id_ed25519"))
dest = SimpleNamespace(host=sys.argv[6], user="root", port=22, known_hosts="/run/ssh/known_hosts",  # an agentcmd.Target
                       identity="/run/ssh/id_ed25519", remote_dmmig=sys.argv[7], remote_state_dir=None)
pid = None
if how == "relay":
    sock, _ = relay_socket(c, agent_argv(dest, "relay", name))
elif how.startswith("openssh"):   # dmmig's OpenSSH tunnel (the mirror leg's), libnbd on its local socket
    from dmmig.adapters import tunnel
    from dmmig.adapters.runner import SubprocessRunner
    local = "/run/bench-copy.sock"
    pid = tunnel.start(SubprocessRunner(), how.split()[1], dest, name, local, sys.argv[8], "/run/bench-copy.log")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(local)
else:   # the pre-issue-13 path: direct-tcpip to the export's TCP port on b's loopback
    chan = c.get_transport().open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0))
    sock, theirs = socket.socketpair()
    def up():
        while d := theirs.recv(1 << 20):
            chan.sendall(d)
    def down():
        while d := chan.recv(1 << 20):
            theirs.sendall(d)
        theirs.close()   # the server's EOF: libnbd's shutdown waits for it
    threading.Thread(target=up, daemon=True).start()
    threading.Thread(target=down, daemon=True).start()
h = nbd.open_client(sock, export=name)
t = time.monotonic()
cnt = Copier(src, h, dest_zero=False).copy([(0, size)])
secs = time.monotonic() - t
h.shutdown()
if pid:
    tunnel.stop(pid, "/run/bench-copy.log", local)
print(json.dumps({"seconds": secs, "sent": cnt.sent}))
"""


def channel_copy(a: UmlHost, how: str, name: str, port: int, size: int, sock: str) -> float:
    r = json.loads(a.run([PY, "-c", COPY, how, "/dev/loop0", name, str(port), str(size), B_IP, DMMIG, sock]).out)
    assert r["sent"] == size, r
    return float(r["seconds"])


def dmmig_copy(a: UmlHost, *extra: str) -> float:
    a.dmmig("prepare", "cc")
    try:
        s = summary(a.dmmig("copy", "cc", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG,
                            *SSH_OPTS, "--json", "--max-rounds", "1", *extra).out)
        assert s["sent"] >= s["read"] > 0, s
        return float(s["seconds"])   # the copier's own time, as in the channel rows
    finally:
        a.dmmig("abort", "cc")


def main() -> None:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    size = size_mib << 20
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    res: dict[str, float] = {}
    try:
        a, b = p.start()
        a.sh(f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={size_mib} status=none "
             "&& losetup /dev/loop0 /dev/shm/src")
        b.sh(f"truncate -s {size_mib}M /dev/shm/dst /dev/shm/dst2 && losetup /dev/loop0 /dev/shm/dst "
             "&& losetup /dev/loop1 /dev/shm/dst2")
        try:
            a.dmmig("wrap", "cc", "/dev/loop0")
            res["dmmig copy, ssh (relay)"] = dmmig_copy(a)   # also starts the export the relay row uses
            a.dmmig("prepare", "cc")
            a.dmmig("copy", "cc", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG, *SSH_OPTS,
                    "--max-rounds", "1")
            b.run(["qemu-nbd", "--fork", "--pid-file=/run/bench-nbd.pid", "--persistent", "--shared=8", "--format=raw",
                   "--cache=directsync", "--bind=127.0.0.1", "--port=10809", "--export-name=cc", "/dev/loop1"])
            sock = json.loads(a.dmmig("status", "cc", "--json").out)["journal"]["dest"]["export"]["socket"]
            try:
                for _ in range(2):   # alternating, twice: the rig's speed drifts
                    for how in ("direct-tcpip", "relay", "openssh forward", "openssh relay"):
                        res.setdefault(how, 1e9)
                        res[how] = min(res[how], channel_copy(a, how, "cc", 10809, size, sock))
            finally:
                b.sh("kill $(cat /run/bench-nbd.pid); true")
            a.dmmig("abort", "cc")
            res["dmmig copy, nbd TLS"] = dmmig_copy(a, "--transport", "nbd", "--nbd-address", B_IP)
            res["dmmig copy, nbd --insecure"] = dmmig_copy(a, "--transport", "nbd", "--nbd-address", B_IP, "--insecure")
            a.dmmig("unwrap", "cc")
        finally:
            a.sh(f"{DMMIG} abort cc; {DMMIG} unwrap cc; losetup -d /dev/loop0; rm -f /dev/shm/src; true")
            b.sh("losetup -d /dev/loop0 /dev/loop1; rm -f /dev/shm/dst /dev/shm/dst2; true")
    finally:
        p.stop()
    print(f"copy of {size_mib} MiB of random data, two UML kernels on a veth pair (best of 2 for the channel rows)")
    base = res["direct-tcpip"]
    for k, secs in res.items():
        print(f"  {k:28} {secs:6.2f}s  {size_mib / secs:6.1f} MiB/s  {secs / base:5.2f}x the direct-tcpip time")


if __name__ == "__main__":
    main()
