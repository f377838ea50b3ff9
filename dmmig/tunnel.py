"""A long-lived SSH tunnel for the mirror's NBD leg (--transport ssh).

The kernel's nbd socket must outlive the dmmig process that sets it up, so the tunnel is a
daemon: OpenSSH's client, C-fast on the guest's write path, forwarding a root-only unix
socket in the state directory to the export on the destination's loopback. The same trust
rules as paramiko's side: strict host-key checking against the journaled known_hosts file,
no agent or password prompts (BatchMode), no user ssh_config. ServerAlive makes a dead peer
end the tunnel, after which nbd's own timeout fails the leg.
"""
from __future__ import annotations

import os
import time
from typing import Any

from dmmig import proc
from dmmig.errors import RemoteError
from dmmig.runner import Runner


def argv(dest: dict[str, Any], sock: str, port: int) -> list[str]:
    # A session with a pty (-tt and a command), not -N: sshd turns Nagle off (TCP_NODELAY)
    # only for a session with a pty. With -N each NBD reply, sent behind a small window-adjust
    # packet not yet acknowledged, waited for the client's delayed ACK: one 64 KiB write took
    # 45 ms (median) through the tunnel in the rig, and 9.9 ms with the pty. The remote sleep
    # ends with the pty's hangup when the tunnel goes.
    a = ["ssh", "-F", "none", "-tt", "-p", str(dest["port"]),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={dest['known_hosts']}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
         "-o", "StreamLocalBindMask=0177", "-o", "StreamLocalBindUnlink=yes",
         "-L", f"{sock}:127.0.0.1:{port}"]
    if dest.get("identity"):
        a += ["-o", "IdentitiesOnly=yes", "-i", str(dest["identity"])]
    return a + [f"{dest['user']}@{dest['host']}", "exec sleep infinity"]


def start(runner: Runner, dest: dict[str, Any], sock: str, port: int, logfile: str,
          timeout: float = 30) -> int:
    if os.path.exists(sock):
        os.unlink(sock)
    pid = runner.spawn(argv(dest, sock, port), logfile=logfile)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if os.path.exists(sock):
            return pid
        status = proc.exit_status(pid)  # our child: waitpid tells for sure that it died
        if status is not None:
            break
        time.sleep(0.05)
    how = f"ssh exited with status {status}" if status is not None else "timed out"
    proc.stop(pid, sock)
    raise RemoteError(f"the SSH tunnel to {dest['host']} for the NBD leg did not come up ({how}): "
                      f"{_tail(logfile)}", hint="check that `ssh` works with the same known_hosts/identity")


def stop(pid: int | None, sock: str) -> bool:
    was = proc.stop(pid, sock)
    if os.path.exists(sock):
        os.unlink(sock)
    return was


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-800:].strip() or "(no output)"
    except OSError:
        return "(no log)"
