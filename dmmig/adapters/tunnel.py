"""The long-lived SSH tunnel of the mirror's NBD leg (--transport ssh), and the plan-time probe
that chooses its mode.

The kernel's nbd socket must outlive the dmmig process that sets it up, so the tunnel is a
daemon: OpenSSH's client, C-fast on the guest's write path, with the trust rules of paramiko's
side: strict host-key checking against the journaled known_hosts file, no agent or password
prompts (BatchMode), no user ssh_config, `--` before the destination. ServerAlive makes a dead
peer end the tunnel, after which nbd's own timeout fails the leg. Never a pty (a destination
may refuse one: `restrict`, `no-pty`, `PermitTTY no`), never -N: sshd turns Nagle off
(TCP_NODELAY) for any session that runs a command, and with -N each NBD reply waited for a
delayed ACK (46 ms per 64 KiB write in the rig, 4.9 ms with a command).

Two modes, both running only `dmmig agent` on the destination:
- forward: `ssh -T -L LOCAL_SOCK:EXPORT_SOCK -- HOST dmmig agent hold NAME`; the hold session
  only keeps the connection's session open and ends when the tunnel goes.
- relay, where the destination refuses streamlocal forwarding (authorized_keys `restrict` or
  `no-port-forwarding`, sshd `AllowStreamLocalForwarding no`/`DisableForwarding yes`): a unix
  socket here whose one accepted connection becomes the stdin and stdout of `ssh -T -- HOST
  dmmig agent relay NAME` (which relays to the export's socket there). The kernel's nbd socket
  then talks straight to OpenSSH: no Python on this host's data path.
The probe runs the forward mode's exact options against a socket the agent opens for it.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
import sys
import time

from dmmig.adapters import proc
from dmmig.adapters.agentcmd import Target, agent_argv, remote_command
from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput, RemoteError

MODES = ("forward", "relay")
ACCEPT_TIMEOUT = 120.0   # the relay's listener waits this long for nbd-client


def base_argv(dest: Target, log: str) -> list[str]:
    """OpenSSH with dmmig's options; -E LOG names the tunnel's log and marks its processes."""
    a = ["ssh", "-F", "none", "-T", "-e", "none", "-E", log, "-p", str(dest.port),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={dest.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if dest.identity:
        a += ["-o", "IdentitiesOnly=yes", "-i", dest.identity]
    return a


def forward_argv(dest: Target, log: str, local: str, remote: str, *mode: str) -> list[str]:
    for p in (local, remote):
        if ":" in p or any(c.isspace() for c in p):
            raise BadInput(f"socket path {p!r}: OpenSSH's -L cannot take ':' or whitespace in it",
                           hint="choose a state directory (--state-dir / --remote-state-dir) without them")
    return [*base_argv(dest, log), "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177",
            "-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote}",
            "--", _target(dest), remote_command(agent_argv(dest, *mode))]


def relay_argv(dest: Target, log: str, name: str) -> list[str]:
    return [*base_argv(dest, log), "--", _target(dest), remote_command(agent_argv(dest, "relay", name))]


# An SSH login plus a Python start of the agent: 2-5 s on a real host, but 30 s was exceeded in
# emulated Xen dom0s on a loaded machine. Bounded still: a black-holed link fails in a minute.
COME_UP_S = 60.0


def _target(dest: Target) -> str:
    return f"{dest.user}@{dest.host}"


def start(runner: Runner, mode: str, dest: Target, name: str, local: str, remote: str | None,
          log: str, timeout: float = COME_UP_S) -> int:
    """The tunnel of MODE for disk NAME, listening on LOCAL (root only) once this returns;
    REMOTE is the export's socket on the destination (forward mode)."""
    if os.path.lexists(local):
        os.unlink(local)
    if mode == "forward":
        assert remote is not None
        argv = forward_argv(dest, log, local, remote, "hold", name)
    elif mode == "relay":
        argv = [sys.executable, "-m", "dmmig.adapters.tunnel", "accept", local, "--", *relay_argv(dest, log, name)]
    else:
        raise BadInput(f"unknown tunnel mode {mode!r}: use {' or '.join(MODES)}")
    pid = runner.spawn(argv, logfile=log)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if os.path.exists(local):
            return pid
        status = proc.exit_status(pid)  # our child: waitpid tells for sure that it died
        if status is not None:
            break
        time.sleep(0.05)
    how = f"exited with status {status}" if status is not None else "timed out"
    proc.stop(pid, log)
    raise RemoteError(f"the SSH tunnel ({mode}) to {dest.host} for the NBD leg did not come up ({how}): "
                      f"{tail(log)}", hint="check that `ssh` works with the same known_hosts/identity")


def stop(pid: int | None, marker: str, local: str) -> bool:
    was = proc.stop(pid, marker)
    if os.path.lexists(local):
        os.unlink(local)
    return was


def probe(runner: Runner, dest: Target, remote_dir: str, local_dir: str,
          timeout: float = COME_UP_S) -> tuple[str, str]:
    """Which mode works: OpenSSH with the forward mode's exact options runs `dmmig agent probe
    TOKEN` there, which listens on REMOTE_DIR (its state dir)/probe-TOKEN.sock and answers one
    connection; we connect through the forward. ("forward", "") if the answer came through, else ("relay",
    why). Raises RemoteError if OpenSSH cannot run the agent there at all (the tunnel could
    never come up: better now than after the whole copy)."""
    sweep_probes(local_dir)
    token = secrets.token_hex(8)
    local = os.path.join(local_dir, f"probe-{token}.sock")
    log = os.path.join(local_dir, f"probe-{token}.log")
    argv = forward_argv(dest, log, local, os.path.join(remote_dir, f"probe-{token}.sock"), "probe", token)
    pid = runner.spawn(argv, logfile=log)
    try:
        deadline = time.monotonic() + timeout
        while f"dmmig-probe-ready {token}" not in _read(log):
            status = proc.exit_status(pid)
            if status is not None or time.monotonic() > deadline:
                how = f"ssh exited with status {status}" if status is not None else f"no answer in {timeout:.0f}s"
                raise RemoteError(f"OpenSSH could not run `dmmig agent` on {dest.host} with the options of "
                                  f"the mirror's tunnel ({how}): {tail(log)}",
                                  hint="`ssh` must log in there non-interactively with the same known_hosts and "
                                       "identity (BatchMode), and run dmmig")
            time.sleep(0.05)
        got = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(max(5.0, deadline - time.monotonic()))
            try:
                s.connect(local)
                while not got.endswith(b"\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
        if got.decode(errors="replace").strip() == f"dmmig-probe {token}":
            return "forward", ""
        time.sleep(0.2)  # OpenSSH logs the channel's refusal as the connection closes
        return "relay", f"streamlocal forwarding refused: {tail(log, 300)}"
    finally:
        proc.stop(pid, log)
        for p in (local, log):
            if os.path.lexists(p):
                os.unlink(p)


def sweep_probes(local_dir: str, min_age: float = 10) -> list[str]:
    """What a probe of a killed dmmig left here: its ssh (whose parent is no dmmig any more),
    then its files (older than MIN_AGE seconds: another dmmig's probe may be starting its ssh
    just now). The probe on the destination ends with the session's hangup."""
    removed: list[str] = []
    try:
        names = os.listdir(local_dir)
    except FileNotFoundError:
        return removed
    for f in names:
        if f.startswith("probe-") and f.endswith(".log"):
            log = os.path.join(local_dir, f)
            try:
                old = time.time() - os.stat(log).st_mtime > min_age
            except FileNotFoundError:
                continue
            for pid in proc.find(log):
                if not proc.parent_runs(pid, "dmmig"):
                    proc.stop(pid, log)
            if old and not proc.find(log):
                for p in (log, log[:-len(".log")] + ".sock"):
                    if os.path.lexists(p):
                        os.unlink(p)
                        removed.append(p)
    return removed


def tail(path: str, n: int = 800) -> str:
    return _read(path)[-n:].strip() or "(no output)"


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ---- the relay's listener: accept one connection, become ssh --------------------------------
def accept_exec(path: str, argv: list[str], timeout: float = ACCEPT_TIMEOUT) -> int:
    """Listen on PATH (mode 0600), accept one connection from root (nbd-client), and exec ARGV
    with it as stdin and stdout. No process of ours stays on the data path."""
    old = os.umask(0o177)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bound under a temporary name and renamed once listening: start() (and so nbd-client) takes
    # PATH's existence for "listening", and a connect between bind and listen is refused. The
    # name is shorter than NAME.nbd.sock, so it fits sun_path wherever PATH does.
    tmp = os.path.join(os.path.dirname(path), f".a{os.getpid()}")
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    s.listen(1)
    os.rename(tmp, path)
    s.settimeout(timeout)
    try:
        conn, _ = s.accept()
    except TimeoutError:
        print(f"dmmig tunnel: nothing connected to {path} in {timeout:.0f}s", file=sys.stderr)
        os.unlink(path)
        return 1
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != 0:  # the socket is 0600 in a root-only directory: cannot happen, but never relay for others
        print(f"dmmig tunnel: refusing a connection from uid {uid}", file=sys.stderr)
        os.unlink(path)
        return 1
    s.close()
    os.unlink(path)  # one connection only
    conn.setblocking(True)
    os.dup2(conn.fileno(), 0)
    os.dup2(conn.fileno(), 1)
    conn.close()
    os.execvp(argv[0], argv)


def main(args: list[str]) -> int:
    if len(args) < 4 or args[0] != "accept" or args[2] != "--":
        print("usage: python -m dmmig.adapters.tunnel accept SOCKET -- ARGV...", file=sys.stderr)
        return 2
    return accept_exec(args[1], args[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
