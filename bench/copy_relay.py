"""The copier over `--transport ssh`'s path on this machine's own kernel (not the rig): a source
file read with O_DIRECT -> libnbd -> a socket pair -> a pump thread -> paramiko -> sshd on
127.0.0.1 -> a relay to qemu-nbd's unix socket (the destination agent's relay, in Python like it).

What it compares is the pump that moves the socket pair's bytes into the channel:
- paramiko's `Channel.sendall`, as dmmig pumped before: it re-slices its bytes after every packet
  (32 KiB), copying the rest each time, so its cost grows with the square of what one recv
  returns;
- dmmig's `ssh.pump_to_channel`: one reused buffer, a packet's worth per send, no copies;
each with the socket pair's default buffer (net.core.wmem_default, ~200 KiB here: one recv
returns at most that) and with 4 MiB (as on a host whose wmem_default is raised for fast links:
one recv returns up to the pump's 1 MiB).

Anchors in the same run: nbdcopy and the copier straight to the export's unix socket (no SSH).
Rows alternate, best of REPS.

    .venv/bin/python -m bench.copy_relay [--mib 512] [--reps 3]     (as root: sshd needs it)
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import nbd
import paramiko

from bench import libraries
from bench.ssh_send import Sshd
from dmmig.adapters import ssh
from dmmig.core.copier import Copier

MIB = 1 << 20
# the destination's relay: stdin/stdout to the export's socket, as `dmmig agent relay` does
RELAY = r"""
import mmap, os, socket, sys, threading
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
for opt in (32, 33):
    s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
def pump(src, dst, done):
    buf = mmap.mmap(-1, 1 << 20)
    with memoryview(buf) as whole:
        while n := os.readv(src, [buf]):
            v = whole[:n]
            while v:
                v = v[os.write(dst, v):]
    done()
threading.Thread(target=pump, args=(0, s.fileno(), lambda: s.shutdown(socket.SHUT_WR)), daemon=True).start()
pump(s.fileno(), 1, lambda: os.close(1))
"""


def export(d: str, size: int) -> tuple[subprocess.Popen[bytes], str]:
    dest, sock = f"/dev/shm/copy-relay-{os.getpid()}.img", f"{d}/nbd.sock"
    with open(dest, "wb") as f:
        f.truncate(size)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "--shared=4", "--cache=writeback", dest])
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise SystemExit("qemu-nbd did not start")
        time.sleep(0.05)
    return p, dest


def sendall_pump(sock: socket.socket, chan: paramiko.Channel) -> None:
    """The pump dmmig used before (dmmig/adapters/ssh.py up to this bench's commit)."""
    try:
        while data := sock.recv(1 << 20):
            chan.sendall(data)
    except ssh.TRANSPORT_ERRORS:
        pass
    finally:
        ssh.close_quietly(chan)


def back(chan: paramiko.Channel, sock: socket.socket) -> None:
    """The NBD replies (16 bytes each) to the client."""
    try:
        while data := chan.recv(1 << 20):
            sock.sendall(data)
    except ssh.TRANSPORT_ERRORS:
        pass
    finally:
        sock.close()


def through_ssh(s: Sshd, sock: str, src: str, size: int, pump: Callable[..., None], wide: bool) -> float:
    c = paramiko.SSHClient()
    c.load_host_keys(f"{s.d}/known_hosts")
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect("127.0.0.1", port=s.port, username="root", key_filename=f"{s.d}/id", allow_agent=False,
              look_for_keys=False)
    try:
        t = c.get_transport()
        assert t is not None
        ch = t.open_session()
        ch.exec_command(f"{sys.executable} -c '{RELAY}' {sock}")
        ours, theirs = socket.socketpair()  # as ssh.channel_socket makes it, with PUMP
        if wide:
            ours.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE
        threading.Thread(target=pump, args=(theirs, ch), daemon=True).start()
        threading.Thread(target=back, args=(ch, theirs), daemon=True).start()
        h = nbd.NBD()
        h.connect_socket(ours.detach())
        t0 = time.monotonic()
        Copier(src, h, dest_zero=False).copy([(0, size)])
        dt = time.monotonic() - t0
        h.shutdown()
        return dt
    finally:
        c.close()


def direct(sock: str, src: str, size: int) -> float:
    h = nbd.NBD()
    h.connect_unix(sock)
    t0 = time.monotonic()
    Copier(src, h, dest_zero=False).copy([(0, size)])
    dt = time.monotonic() - t0
    h.shutdown()
    return dt


def nbdcopy(sock: str, src: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", src, f"nbd+unix:///?socket={sock}"], check=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    size = a.mib * MIB
    d = tempfile.mkdtemp(prefix="dmmig-bench-relay-", dir="/var/tmp")  # on disk: O_DIRECT reads it
    src = f"{d}/src.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={a.mib}", "status=none"], check=True)
    os.sync()
    s = Sshd(d)
    p, dest = export(d, size)
    sk = f"{d}/nbd.sock"
    rows: dict[str, Callable[[], float]] = {
        "nbdcopy, straight to the export": lambda: nbdcopy(sk, src),
        "copier, straight to the export": lambda: direct(sk, src, size),
        "ssh, sendall pump, default buffer": lambda: through_ssh(s, sk, src, size, sendall_pump, False),
        "ssh, dmmig's pump, default buffer": lambda: through_ssh(s, sk, src, size, ssh.pump_to_channel, False),
        "ssh, sendall pump, 4 MiB buffer": lambda: through_ssh(s, sk, src, size, sendall_pump, True),
        "ssh, dmmig's pump, 4 MiB buffer": lambda: through_ssh(s, sk, src, size, ssh.pump_to_channel, True),
    }
    runs: dict[str, list[float]] = {k: [] for k in rows}
    try:
        for _ in range(a.reps):
            for k, f in rows.items():
                runs[k].append(f())
    finally:
        p.terminate()
        p.wait(10)
        s.stop()
        os.unlink(dest)
        shutil.rmtree(d)
    anchor = min(runs["copier, straight to the export"])
    print(f"{a.mib} MiB of random data read with O_DIRECT from /var/tmp, best of {a.reps}; "
          f"{libraries()}; {os.cpu_count()} CPUs")
    for k, v in runs.items():
        best = min(v)
        print(f"  {k:40s} {best:6.2f} s  {size / best / MIB:6.1f} MiB/s  ({best / anchor:.2f}x the copier "
              f"straight)   runs: {' '.join(f'{x:.2f}' for x in v)}")
    for buf in ("default", "4 MiB"):
        old, new = min(runs[f"ssh, sendall pump, {buf} buffer"]), min(runs[f"ssh, dmmig's pump, {buf} buffer"])
        print(f"  {buf} buffer: dmmig's pump / sendall pump = {new / old:.2f}x the time")


if __name__ == "__main__":
    main()
