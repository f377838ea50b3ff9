"""The destination agent: `dmmig agent`, the only command dmmig runs on the destination.

`dmmig agent` speaks JSON lines on stdin/stdout. Protocol version 2. The first line the agent
writes is a hello:
    {"agent": "dmmig", "protocol": 2, "version": "...", "host": "...", "state_dir": ..., "export_dir": ...,
     "tools": {"qemu-nbd": true}}
then one reply per request:  request {"op": OP, ...}  ->  {"ok": true, ...} | {"ok": false,
"error": MSG, "hint": HINT, "kind": CLASS, "exit_code": N, "fields": {...}} (dmmig/adapters/agentclient.py
re-raises the same kind). The agent keeps no connection state: everything it starts
(an export) is recorded in its state directory, so a later connection can stop it.

Its other modes carry the mirror's and the copier's NBD traffic to the export's unix socket
(which only root can reach): `dmmig agent relay NAME` relays stdin/stdout to it, `dmmig agent
hold NAME` keeps an OpenSSH session open for a forward to it, `dmmig agent probe TOKEN` answers
the source's plan-time check of streamlocal forwarding.

As an authorized_keys forced command (`command="dmmig --state-dir DIR agent --forced-command"`)
the agent reads what the client asked for from SSH_ORIGINAL_COMMAND and runs it only if it is
one of the invocations above; the state directory is the forced command's, never the client's.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re
import select
import shlex
import socket
import sys
import threading
from collections.abc import Callable
from functools import partial

from dmmig.adapters.runner import SubprocessRunner
from dmmig.core import confine, journal
from dmmig.errors import BadInput
from dmmig.validate import disk_name

# ---- the raw modes: relay, hold, probe --------------------------------------------------------
_TOKEN = re.compile(r"[0-9a-f]{16}")


def probe_token(token: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise BadInput(f"invalid probe token {token!r}")
    return token


MODES: dict[str, Callable[[str], str]] = {"relay": disk_name, "hold": disk_name, "probe": probe_token}


def relay(state: str, name: str) -> int:
    """Relay stdin/stdout (an SSH session's) to NAME's export on its unix socket, raw, until
    either side closes."""
    _relay_session(_export_socket(state, name), b"")
    return 0


def relay_to(state: str, name: str) -> Callable[[bytes], None]:
    """op_relay's session after its reply: NAME's export, connected now (so that no export is a
    refusal while the session is still an agent's)."""
    sock = _export_socket(state, name)
    return lambda rest: _relay_session(sock, rest)


def _export_socket(state: str, name: str) -> socket.socket:
    """A connection to NAME's export on its root-only unix socket."""
    from dmmig.flows.destination import record
    rec = record(state, name)
    exp = rec.export if rec else None
    if exp is None or not exp.socket or not exp.alive():
        raise BadInput(f"no NBD export of {name} on a unix socket here", hint="`dmmig copy` starts it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _widen(s)
    try:
        s.connect(exp.socket)
    except OSError:
        s.close()
        raise
    return s


def _relay_session(s: socket.socket, first: bytes) -> None:
    """This session's stdin to S (FIRST before it: read already), S to its stdout, until either
    side closes."""
    if first:
        s.sendall(first)
    up = threading.Thread(target=_pump, args=(0, s.fileno(), lambda: _shutdown(s)), daemon=True)
    up.start()
    _pump(s.fileno(), 1, lambda: os.close(1))  # the export closed: so do we


def _pump(src: int, dst: int, at_eof: Callable[[], None]) -> None:
    """SRC to DST until EOF, through one reused buffer (a fresh 1 MiB bytes object per read, as
    os.read makes, cost twice the CPU)."""
    buf = mmap.mmap(-1, 1 << 20)
    try:
        with memoryview(buf) as whole:
            while n := os.readv(src, [buf]):
                view = whole[:n]
                while view:
                    view = view[os.write(dst, view):]
    except OSError:
        pass
    at_eof()


def _widen(s: socket.socket) -> None:
    """Room for several of the copier's 1 MiB requests at each hop (a unix socket's default
    ~200 KiB send buffer and a 64 KiB pipe make every request several process switches)."""
    for opt in (32, 33):  # SO_SNDBUFFORCE, SO_RCVBUFFORCE (Linux; root may exceed wmem_max), not in socket
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    for fd in (0, 1):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # only pipes take it (sshd's, without a pty)
        except OSError:
            pass


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_WR)  # the source went: qemu-nbd sees EOF and closes
    except OSError:
        pass


def hold(name: str) -> int:
    """Keep this SSH session (the source's forward to NAME's export) open until it ends."""
    disk_name(name)
    _until_hangup(None)
    return 0


def _until_hangup(timeout: float | None, also: int | None = None) -> bool:
    """Wait until sshd closes this session (our stdout hangs up) or fd ALSO is readable (True).
    Not stdin's EOF: the source's ssh has nothing to send and closes its side of stdin at once."""
    p = select.poll()
    p.register(1, 0)  # POLLERR/POLLHUP only: sshd closed its end (the tunnel went)
    if also is not None:
        p.register(also, select.POLLIN)
    for fd, _ in p.poll(None if timeout is None else int(timeout * 1000)):
        if fd == also:
            return True
    return False


def probe(state: str, token: str, timeout: float = 30) -> int:
    """Listen on STATE/probe-TOKEN.sock (root only), say so on stdout, and answer one connection
    (the source's, through its streamlocal forward) with the token. Leaves nothing behind."""
    os.makedirs(state, mode=0o700, exist_ok=True)
    path = os.path.join(state, f"probe-{probe_token(token)}.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.lexists(path):
        os.unlink(path)
    lsock.bind(path)  # the umask (077) makes it root's alone
    try:
        lsock.listen(1)
        print(f"dmmig-probe-ready {token}", flush=True)
        if _until_hangup(timeout, lsock.fileno()):
            conn, _ = lsock.accept()
            with conn:
                conn.sendall(f"dmmig-probe {token}\n".encode())
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(5)
                try:
                    conn.recv(1)  # until the source has read it and closed
                except OSError:
                    pass
    finally:
        lsock.close()
        os.unlink(path)
    return 0


# ---- entry point, and the forced command ------------------------------------------------------
def parse_forced(original: str, state: str) -> tuple[str | None, str | None]:
    """What a client asked a forced `dmmig agent` to run (SSH_ORIGINAL_COMMAND): only what
    dmmig's source itself runs (ssh.agent_argv): `PATH/dmmig [--state-dir STATE] agent [MODE
    ARG]`, with this host's state dir. Returns (MODE, ARG), or raises BadInput."""
    def refuse(why: str) -> BadInput:
        return BadInput(f"refused: this SSH key may only run dmmig's agent ({why}); asked for {original[:200]!r}",
                        hint="authorized_keys runs `dmmig agent --forced-command` for it")
    try:
        words = shlex.split(original)
    except ValueError:
        raise refuse("unparsable command") from None
    if not words or os.path.basename(words[0]) != "dmmig":
        raise refuse("not dmmig")
    rest = words[1:]
    if rest[:1] == ["--state-dir"]:
        if len(rest) < 2 or os.path.realpath(rest[1]) != os.path.realpath(state):
            raise refuse(f"the state directory is {state}, set by the forced command")
        rest = rest[2:]
    if rest[:1] != ["agent"]:
        raise refuse("not the agent")
    rest = rest[1:]
    if not rest:
        return None, None
    if len(rest) != 2 or rest[0] not in MODES:
        raise refuse(f"agent takes no arguments but one of {', '.join(f'{m} ARG' for m in MODES)}")
    try:
        MODES[rest[0]](rest[1])
    except BadInput as e:
        raise refuse(e.message) from e
    return rest[0], rest[1]


def main(state_dir: str | None = None, mode: str | None = None, arg: str | None = None,
         forced: bool = False, policy: confine.Policy | None = None) -> int:
    os.umask(0o077)  # everything the agent makes (records, sockets, keys) is root's alone
    state = journal.state_dir(state_dir)
    if mode is None:
        original = os.environ.get("SSH_ORIGINAL_COMMAND")  # set by sshd for a forced command only
        if forced and original is None:
            raise BadInput("refused: this SSH key may only run dmmig's agent, and no command was given "
                           "(an interactive login)")
        if original is not None:
            mode, arg = parse_forced(original, state)
    elif forced:
        raise BadInput("--forced-command takes no mode: the client's SSH_ORIGINAL_COMMAND chooses it")
    if mode is None:
        # imported here: the raw modes (a tunnel's hold, the plan's probe) need none of the
        # destination's flow, 0.14 s of each of their starts in the rig
        from dmmig.flows.destination import AgentServer, Lines
        AgentServer(SubprocessRunner(), state, policy=policy,
                    relay=partial(relay_to, state)).serve(Lines(sys.stdin.fileno()), sys.stdout)
        return 0
    if mode not in MODES or arg is None:
        raise BadInput(f"unknown agent mode {mode!r}: use {', '.join(f'{m} ARG' for m in MODES)}")
    MODES[mode](arg)
    if mode == "relay":
        return relay(state, arg)
    if mode == "hold":
        return hold(arg)
    return probe(state, arg)
