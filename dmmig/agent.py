"""The destination agent: `dmmig agent`, the only command dmmig runs on the destination.

`dmmig agent` speaks JSON lines on stdin/stdout. Protocol version 2. The first line the agent
writes is a hello:
    {"agent": "dmmig", "protocol": 2, "version": "...", "host": "...", "state_dir": ..., "export_dir": ...}
then one reply per request:  request {"op": OP, ...}  ->  {"ok": true, ...} | {"ok": false,
"error": MSG, "kind": CLASS}. The agent keeps no connection state: everything it starts
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

import hashlib
import json
import mmap
import os
import re
import select
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dmmig import __version__
from dmmig import journal as J
from dmmig import nbd as N
from dmmig import tlscreds
from dmmig.blockdev import block_device, holder_names
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError
from dmmig.gate import GateServer
from dmmig.runner import Runner, SubprocessRunner
from dmmig.ssh import agent_argv, remote_command
from dmmig.validate import disk_name

PROTOCOL = 2


def export_dir(state: str) -> str:
    """Where the exports' unix sockets and TLS keys live: a directory only root can enter."""
    return os.path.join(state, "nbd")


def incoming(state: str) -> dict[str, dict[str, Any]]:
    """Every disk a source's dmmig is (or was) migrating into this host: NAME -> the agent's
    record (path, size, created, export, handed_over)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        files = os.listdir(state)
    except FileNotFoundError:
        return out
    for f in sorted(files):
        if f.endswith(".dest.json"):
            try:
                with open(os.path.join(state, f)) as fh:
                    out[f[:-len(".dest.json")]] = dict(json.load(fh))
            except (OSError, ValueError) as e:
                out[f[:-len(".dest.json")]] = {"unreadable": str(e)}
    return out


class AgentServer:
    def __init__(self, runner: Runner, state: str) -> None:
        self.r = runner
        self.state = state
        self.gate = GateServer(state)

    def _rec_path(self, name: str) -> str:
        return os.path.join(self.state, f"{disk_name(name)}.dest.json")

    def _load(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._rec_path(name)) as f:
                return dict(json.load(f))
        except FileNotFoundError:
            return None

    def _save(self, name: str, rec: dict[str, Any]) -> None:
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        tmp = self._rec_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._rec_path(name))

    # ---- operations ---------------------------------------------------------------------
    def op_hello(self) -> dict[str, Any]:
        # the state dir lets the source say exactly what to remove here if we become unreachable
        return {"protocol": PROTOCOL, "version": __version__, "host": socket.gethostname(),
                "state_dir": self.state, "export_dir": export_dir(self.state)}

    def op_prepare_disk(self, name: str, path: str, size: int, create: bool = False) -> dict[str, Any]:
        rec = self._load(name)
        if rec and rec.get("path") != path:
            raise Busy(f"{name} is already being migrated here onto {rec['path']}")
        created = bool(rec and rec.get("created"))
        if not os.path.exists(path):
            if not create:
                raise BadInput(f"destination disk {path} does not exist", hint="pass --create to make it")
            self._create(path, size)
            created = True
        else:
            self._check_not_in_use(name, path, rec)
        have = _size_of(path)
        if have < size:
            raise BadInput(f"destination disk {path} is smaller than the source: {have} < {size} bytes")
        rec = dict(rec or {}, name=name, path=path, size=size, created=created)
        self._save(name, rec)
        # a disk we just created (sparse file or new LV) reads as zeroes: zero blocks can be skipped
        return {"path": path, "size": have, "created": created, "zeroed": created and not rec.get("written")}

    def op_probe(self, paths: list[str], script: str = "/etc/xen/scripts/block-dmmig") -> dict[str, Any]:
        """What `dmmig migrate --dry-run` and its checks need to know here; changes nothing."""
        disks: dict[str, Any] = {}
        for path in paths:
            name = _probe_name(path)
            rec = self._load(name) if name else None
            d: dict[str, Any] = {"exists": os.path.exists(path), "incoming": bool(rec and not rec.get("handed_over"))}
            if d["exists"]:
                d["size"] = _size_of(path)
                try:
                    self._check_not_in_use(name or "", path, rec)
                    d["in_use"] = None
                except DmmigError as e:
                    d["in_use"] = e.message
            disks[path] = d
        # the block script here finds an incoming migration in ITS state dir (the default, or
        # $DMMIG_STATE_DIR of xl's environment): if that is not ours, the gate is never asked
        return {"disks": disks, "block_script": os.access(script, os.X_OK), "script_path": script,
                "state_dir": self.state, "hotplug_state_dir": J.state_dir(None)}

    def op_export(self, name: str, addr: str | None = None, tls: dict[str, str] | None = None,
                  insecure: bool = False) -> dict[str, Any]:
        """Export NAME's disk: on a unix socket in the root-only export dir (ADDR None: --transport
        ssh), or on ADDR with TLS (the server's credentials, sent by the source) or, only if the
        source's operator said --insecure, without."""
        rec = self._load(name)
        if rec is None:
            raise BadInput(f"no destination disk prepared for {name}")
        if addr is not None and tls is None and not insecure:
            raise BadInput(f"an NBD export of {name} on {addr} needs TLS credentials (or --insecure on the source)")
        d = J.private_dir(export_dir(self.state))
        tls_dir = os.path.join(d, f"{name}.tls") if tls is not None else None
        exp = rec.get("export")
        if exp:
            old = N.Export(**exp)
            same = (old.socket is not None) if addr is None else (
                old.addr == addr and old.tls == tls_dir and (tls is None or _same_creds(old.tls, tls)))
            if same and old.alive():
                return {"export": exp}
            N.stop_export(old)  # gone, or another kind (a TCP export of an older dmmig, new credentials)
        if tls_dir is not None:
            assert tls is not None
            if "," in tls_dir:
                raise BadInput(f"{tls_dir}: qemu-nbd's --object cannot take a ',' in the path")
            tlscreds.write_server(tls_dir, tls)
        e = N.start_export(self.r, name, rec["path"], os.path.join(self.state, f"{name}.qemu-nbd.pid"),
                           socket_path=os.path.join(d, f"{name}.sock") if addr is None else None,
                           addr=addr, tls=tls_dir)
        rec["export"] = e.__dict__
        rec["written"] = True  # from now on the disk is not known to be zero
        self._save(name, rec)
        return {"export": e.__dict__}

    def op_status(self, name: str) -> dict[str, Any]:
        rec = self._load(name)
        if rec is None:
            return {"known": False}
        exp = rec.get("export")
        return {"known": True, "record": rec, "export_alive": bool(exp and N.Export(**exp).alive())}

    def op_stop(self, name: str, remove_created: bool = False) -> dict[str, Any]:
        """Stop the export and forget NAME; with remove_created, delete a disk we created."""
        rec = self._load(name)
        done: list[str] = []
        if rec is None:
            return {"done": done}
        exp = rec.get("export")
        if exp:
            e = N.Export(**exp)
            N.stop_export(e)
            done.append(f"stopped qemu-nbd {exp['pid']} exporting {rec['path']}")
        # what a killed agent made but had not journaled yet
        for left in (os.path.join(self.state, f"{name}.qemu-nbd.pid"), os.path.join(export_dir(self.state), f"{name}.sock")):
            if os.path.lexists(left):
                os.unlink(left)
        if tlscreds.remove(os.path.join(export_dir(self.state), f"{name}.tls")):
            done.append(f"removed the TLS credentials of {name}")
        if remove_created and rec.get("created") and os.path.isfile(rec["path"]):
            os.unlink(rec["path"])
            done.append(f"removed {rec['path']} (created by dmmig)")
        os.unlink(self._rec_path(name))
        return {"done": done}

    def op_await_gate(self, names: list[str], timeout: float) -> dict[str, Any]:
        """Block until a destination `add` asks about one of NAMES (see dmmig/gate.py)."""
        self.gate.start()
        return {"asked": self.gate.wait(names, timeout)}

    def op_answer_gate(self, name: str, ok: bool, why: str = "") -> dict[str, Any]:
        rec = self._load(name)
        if ok and rec:  # free the disk for blkback before the `add` goes on; this host owns it now
            if rec.get("export"):
                N.stop_export(N.Export(**rec["export"]))
                rec.pop("export")
            rec["handed_over"] = time.time()
            self._save(name, rec)
        return {"delivered": self.gate.answer(name, ok, why)}

    def op_digest(self, path: str, offset: int, length: int, chunk: int) -> dict[str, Any]:
        return {"digests": digest_ranges(path, offset, length, chunk)}

    # ---- helpers ------------------------------------------------------------------------
    def _create(self, path: str, size: int) -> None:
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "dev" and parts[2] not in ("mapper", "shm", "disk", "block") \
                and self._is_vg(parts[2]):
            self.r.run(["lvcreate", "--yes", "-L", f"{size}b", "-n", parts[3], parts[2]], timeout=120)
            return
        d = os.path.dirname(path) or "."
        if not os.path.isdir(d):
            raise BadInput(f"cannot create {path}: {d} is not a directory")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse
        finally:
            os.close(fd)

    def _is_vg(self, vg: str) -> bool:
        return self.r.run(["vgs", "--noheadings", vg], check=False).returncode == 0

    def _check_not_in_use(self, name: str, path: str, rec: dict[str, Any] | None) -> None:
        exp = (rec or {}).get("export")
        if exp and N.Export(**exp).alive():
            return  # our own export of this very disk (a resumed copy)
        if os.path.isfile(path):
            loops = self.r.run(["losetup", "-j", path], check=False).stdout.strip()
            if loops:
                raise Busy(f"destination disk {path} is in use by a loop device: {loops}")
            return
        dev = block_device(path)
        holders = holder_names(dev)
        if holders:
            raise Busy(f"destination disk {path} is in use (held by {', '.join(holders)})")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_EXCL)
            os.close(fd)
        except OSError as e:
            raise Busy(f"destination disk {path} is in use (mounted or opened exclusively): {e.strerror}") from None

    def serve(self, inp: Any, out: Any) -> None:
        out.write(json.dumps({"agent": "dmmig", **self.op_hello()}) + "\n")
        out.flush()
        ops: dict[str, Callable[..., dict[str, Any]]] = {
            "hello": self.op_hello, "probe": self.op_probe, "prepare_disk": self.op_prepare_disk, "export": self.op_export,
            "status": self.op_status, "stop": self.op_stop, "digest": self.op_digest,
            "await_gate": self.op_await_gate, "answer_gate": self.op_answer_gate}
        try:
            self._serve(inp, out, ops)
        finally:
            self.gate.close()

    def _serve(self, inp: Any, out: Any, ops: dict[str, Callable[..., dict[str, Any]]]) -> None:
        for line in inp:
            try:
                req = json.loads(line)
                op = ops[req.pop("op")]
                reply = {"ok": True, **op(**req)}
            except DmmigError as e:
                reply = {"ok": False, "error": e.message, "hint": e.hint, "kind": type(e).__name__}
            except Exception as e:  # noqa: BLE001 - report to the source, keep serving
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "kind": "internal"}
            out.write(json.dumps(reply) + "\n")
            out.flush()


def digest_ranges(path: str, offset: int, length: int, chunk: int) -> list[str]:
    """sha256 of each CHUNK of [offset, offset+length) read with O_DIRECT when possible."""
    flags = os.O_RDONLY | (os.O_DIRECT if N.direct_io_ok(path) else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, chunk)
    out = []
    try:
        pos = offset
        end = offset + length
        while pos < end:
            n = os.preadv(fd, [buf], pos)
            want = min(chunk, end - pos)
            out.append(hashlib.sha256(buf[:min(n, want)]).hexdigest())
            pos += want
    finally:
        os.close(fd)
    return out


def _probe_name(path: str) -> str | None:
    from dmmig.hotplug import disk_name_for
    try:
        return disk_name_for(path)
    except DmmigError:
        return None


def _size_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _same_creds(directory: str | None, files: dict[str, str]) -> bool:
    try:
        return directory is not None and tlscreds.server_files(directory) == files
    except OSError:
        return False


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
    rec = AgentServer(SubprocessRunner(), state)._load(disk_name(name))
    exp = N.Export(**rec["export"]) if rec and rec.get("export") else None
    if exp is None or not exp.socket or not exp.alive():
        raise BadInput(f"no NBD export of {name} on a unix socket here", hint="`dmmig copy` starts it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(exp.socket)
    up = threading.Thread(target=_pump, args=(0, s.fileno(), lambda: _shutdown(s)), daemon=True)
    up.start()
    _pump(s.fileno(), 1, lambda: os.close(1))  # the export closed: so do we
    return 0


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
        raise refuse(e.message) from None
    return rest[0], rest[1]


def main(state_dir: str | None = None, mode: str | None = None, arg: str | None = None,
         forced: bool = False) -> int:
    os.umask(0o077)  # everything the agent makes (records, sockets, keys) is root's alone
    state = J.state_dir(state_dir)
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
        AgentServer(SubprocessRunner(), state).serve(sys.stdin, sys.stdout)
        return 0
    if mode not in MODES or arg is None:
        raise BadInput(f"unknown agent mode {mode!r}: use {', '.join(f'{m} ARG' for m in MODES)}")
    MODES[mode](arg)
    if mode == "relay":
        return relay(state, arg)
    if mode == "hold":
        return hold(arg)
    return probe(state, arg)


class AgentClient:
    """The source's side of the agent protocol, over a paramiko exec channel."""

    def __init__(self, client: Any, remote_dmmig: str, state_dir: str | None = None) -> None:
        argv = agent_argv({"remote_dmmig": remote_dmmig, "remote_state_dir": state_dir})
        self.chan = client.get_transport().open_session()
        self.chan.exec_command(remote_command(argv))
        self.rfile = self.chan.makefile("r")
        self.wfile = self.chan.makefile("w")
        first = self.rfile.readline()
        try:
            hello = json.loads(first)
        except ValueError:
            err = self.chan.makefile_stderr("r").read(4000)
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: "
                              f"{(err.decode() if isinstance(err, bytes) else err).strip() or first!r}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from None
        if hello.get("agent") != "dmmig" or hello.get("protocol") != PROTOCOL:
            raise RemoteError(f"the destination's dmmig speaks protocol {hello.get('protocol')}, "
                              f"we speak {PROTOCOL}", hint="install the same dmmig version on both hosts")
        self.hello = hello

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        try:
            self.wfile.write(json.dumps({"op": op, **kw}) + "\n")
            self.wfile.flush()
            line = self.rfile.readline()
        except (OSError, EOFError) as e:  # paramiko raises EOFError writing to a dead transport
            raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                              f"{type(e).__name__} {e}".rstrip()) from None
        if not line:
            raise RemoteError(f"the destination agent went away during {op}")
        rep = dict(json.loads(line))
        if not rep.pop("ok"):
            kind = rep.get("kind")
            cls = {"BadInput": BadInput, "Busy": Busy}.get(str(kind), RemoteError)
            raise cls(f"destination: {rep['error']}", hint=rep.get("hint"))
        return rep

    def close(self) -> None:
        self.chan.close()
