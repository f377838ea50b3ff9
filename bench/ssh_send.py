"""What paramiko's sending costs on this machine's own kernel (not the rig): the copier's data over
`--transport ssh` goes through a paramiko exec channel (dmmig/adapters/ssh.py relay_socket).

A throwaway sshd on 127.0.0.1 (a random port, keys in a temporary directory); each row sends MIB
MiB through one exec channel to `cat > /dev/null` there, same cipher and MAC for every row
(aes128-ctr, hmac-sha2-256: paramiko's first choice against OpenSSH's server):

- anchor: OpenSSH's client (`ssh -c aes128-ctr -m hmac-sha2-256`), fed from /dev/zero;
- paramiko as installed, its own `packet.asbytes` (paramiko < 3 formats every Message's repr on
  the send path: see dmmig/adapters/ssh.py);
- paramiko with dmmig's shim, as dmmig sends.

Rows alternate, best of REPS; each paramiko row also says the CPU seconds the sender used.

    .venv/bin/python -m bench.ssh_send [--mib 256] [--reps 3]     (as root: sshd needs it)
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import paramiko
import paramiko.packet

STOCK = paramiko.packet.asbytes
import dmmig.adapters.ssh  # noqa: E402,F401 - installs the shim (paramiko < 3)

SHIM = paramiko.packet.asbytes
MIB = 1 << 20
CIPHER, MAC = "aes128-ctr", "hmac-sha2-256"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    def __init__(self, d: str) -> None:
        self.d = d
        self.port = free_port()
        for k in ("host", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/{k}"], check=True)
        shutil.copy(f"{d}/id.pub", f"{d}/authorized_keys")
        with open(f"{d}/sshd_config", "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile "
                    f"{d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    f"UsePAM no\nStrictModes no\nPidFile none\n")
        with open(f"{d}/host.pub") as f:
            key = " ".join(f.read().split()[:2])
        with open(f"{d}/known_hosts", "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {key}\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        self.p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", f"{d}/sshd_config"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.p.poll() is not None:
                    raise SystemExit("sshd did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(10)


def openssh(s: Sshd, n: int) -> tuple[float, float]:
    argv = ["ssh", "-F", "none", "-T", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={s.d}/known_hosts",
            "-o", "StrictHostKeyChecking=yes", "-i", f"{s.d}/id", "-p", str(s.port), "-c", CIPHER, "-m", MAC,
            "root@127.0.0.1", "cat > /dev/null"]
    with open("/dev/zero", "rb") as z:
        src = subprocess.Popen(["head", "-c", str(n)], stdin=z, stdout=subprocess.PIPE)
        t = time.monotonic()
        subprocess.run(argv, stdin=src.stdout, check=True)
        dt = time.monotonic() - t
        src.wait()
    return dt, float("nan")


def paramiko_send(s: Sshd, n: int, asbytes: object) -> tuple[float, float]:
    paramiko.packet.asbytes = asbytes
    c = paramiko.SSHClient()
    try:
        c.load_host_keys(f"{s.d}/known_hosts")
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.connect("127.0.0.1", port=s.port, username="root", key_filename=f"{s.d}/id", allow_agent=False,
                  look_for_keys=False, disabled_algorithms={"ciphers": [x for x in paramiko.Transport._preferred_ciphers
                                                                        if x != CIPHER]})
        t = c.get_transport()
        assert t is not None and t.local_cipher == CIPHER and t.local_mac == MAC, (t.local_cipher, t.local_mac)
        ch = t.open_session()
        ch.exec_command("cat > /dev/null")
        buf = b"\0" * (256 * 1024)
        t0, c0 = time.monotonic(), time.process_time()
        for _ in range(n // len(buf)):
            ch.sendall(buf)
        ch.shutdown_write()
        if ch.recv_exit_status() != 0:
            raise SystemExit("cat failed on the other end")
        return time.monotonic() - t0, time.process_time() - c0
    finally:
        c.close()
        paramiko.packet.asbytes = SHIM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    n = a.mib * MIB
    rows = {"OpenSSH ssh": lambda s: openssh(s, n),
            f"paramiko {paramiko.__version__} as installed": lambda s: paramiko_send(s, n, STOCK),
            f"paramiko {paramiko.__version__} with dmmig's shim": lambda s: paramiko_send(s, n, SHIM)}
    if SHIM is STOCK:
        print(f"paramiko {paramiko.__version__}: dmmig installs no shim (>= 3.0); both paramiko rows are the same")
    best: dict[str, tuple[float, float]] = {}
    d = tempfile.mkdtemp(prefix="dmmig-bench-ssh-")
    s = Sshd(d)
    try:
        for _ in range(a.reps):
            for name, f in rows.items():
                dt, cpu = f(s)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, cpu)
    finally:
        s.stop()
        shutil.rmtree(d)
    anchor = best["OpenSSH ssh"][0]
    print(f"{a.mib} MiB through one exec channel to cat on 127.0.0.1 ({CIPHER}, {MAC}), best of {a.reps}, "
          f"python {sys.version.split()[0]}")
    for name, (dt, cpu) in best.items():
        extra = "" if cpu != cpu else f"   sender CPU {cpu:.2f} s"
        print(f"  {name:42s} {n / dt / MIB:7.1f} MiB/s  ({anchor / dt:.2f}x OpenSSH){extra}")


if __name__ == "__main__":
    main()
