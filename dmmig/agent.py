"""The destination agent: `dmmig agent`, started over SSH, speaks JSON lines on stdin/stdout.

Protocol version 1. The first line the agent writes is a hello:
    {"agent": "dmmig", "protocol": 1, "version": "...", "host": "..."}
then one reply per request:  request {"op": OP, ...}  ->  {"ok": true, ...} | {"ok": false,
"error": MSG, "kind": CLASS}. The agent keeps no connection state: everything it starts
(an export) is recorded in its state directory, so a later connection can stop it.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from dmmig import __version__
from dmmig import gate
from dmmig import journal as J
from dmmig import nbd as N
from dmmig.blockdev import block_device, holder_names
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError
from dmmig.gate import GateServer
from dmmig.runner import Runner, SubprocessRunner
from dmmig.validate import disk_name

PROTOCOL = 1
DEST_TOOLS = ("qemu-nbd",)  # what the destination runs for a migration (op_probe reports them)


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
        self._inp: Any = None

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
                "state_dir": self.state}

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
                "tools": {t: shutil.which(t) is not None for t in DEST_TOOLS},
                "state_dir": self.state, "hotplug_state_dir": J.state_dir(None)}

    def op_export(self, name: str, addr: str = "127.0.0.1") -> dict[str, Any]:
        rec = self._load(name)
        if rec is None:
            raise BadInput(f"no destination disk prepared for {name}")
        exp = rec.get("export")
        if exp and N.Export(**exp).alive():
            return {"export": exp}
        e = N.start_export(self.r, name, rec["path"], addr, os.path.join(self.state, f"{name}.qemu-nbd.pid"))
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
            return {"done": gate.remove_stale(self.state, name)}
        exp = rec.get("export")
        if exp:
            N.stop_export(N.Export(**exp))
            done.append(f"stopped qemu-nbd {exp['pid']} exporting {rec['path']}")
        pidf = os.path.join(self.state, f"{name}.qemu-nbd.pid")
        if os.path.exists(pidf):
            os.unlink(pidf)
        if remove_created and rec.get("created") and os.path.isfile(rec["path"]):
            os.unlink(rec["path"])
            done.append(f"removed {rec['path']} (created by dmmig)")
        os.unlink(self._rec_path(name))
        done += gate.remove_stale(self.state, name)
        return {"done": done}

    def op_await_gate(self, names: list[str], timeout: float) -> dict[str, Any]:
        """Listen on the gate of each of NAMES (refused if another agent here waits for one of
        them), then block until a destination `add` asks about one, or TIMEOUT (see
        dmmig/gate.py). Returns early, None, if the source that waits goes away."""
        self.gate.listen([disk_name(n) for n in names])
        return {"asked": self.gate.wait(names, timeout, gone=self._source_gone)}

    def _source_gone(self) -> bool:
        """The source's end of our stdin closed: no request follows (during await_gate the
        source sends nothing). Checked without reading, so no request is ever consumed."""
        try:
            fd = self._inp.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))

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
        self._inp = inp
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
    import mmap
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


def main(state_dir: str | None = None) -> int:
    AgentServer(SubprocessRunner(), J.state_dir(state_dir)).serve(sys.stdin, sys.stdout)
    return 0


# Every agent call has a deadline: a link that black-holes (no RST, no FIN) would otherwise
# hold the caller until TCP gives up (~15 min). The transport's keepalive (ssh.connect) keeps
# idle NAT state alive; the deadline is what turns a dead peer into a RemoteError.
START_DEADLINE_S = 30.0
DEFAULT_DEADLINE_S = 120.0
_DEADLINES_S = {"hello": 30.0, "probe": 60.0, "status": 30.0, "export": 60.0, "stop": 60.0,
                "answer_gate": 30.0, "prepare_disk": 600.0}  # lvcreate alone may take 120 s


def deadline_for(op: str, kw: dict[str, Any]) -> float:
    """The default deadline of OP, in seconds."""
    if op == "await_gate":
        return float(kw.get("timeout", 0)) + 30
    if op == "digest":  # reads LENGTH bytes there: at 1 MiB/s, slow storage included
        return 60 + int(kw.get("length", 0)) / (1 << 20)
    return _DEADLINES_S.get(op, DEFAULT_DEADLINE_S)


class AgentClient:
    """The source's side of the agent protocol, over a paramiko exec channel."""

    def __init__(self, client: Any, remote_dmmig: str, state_dir: str | None = None) -> None:
        argv = [remote_dmmig] + (["--state-dir", state_dir] if state_dir else []) + ["agent"]
        import shlex
        self._buf = b""
        self._broken: str | None = None
        # exec_command takes one string that the remote shell splits: quote every word
        self.chan = client.get_transport().open_session()
        self.chan.exec_command(" ".join(shlex.quote(a) for a in argv))
        try:
            first = self._readline(time.monotonic() + START_DEADLINE_S, "start")
        except RemoteError as e:
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: {self._stderr() or e.message}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from None
        try:
            hello = json.loads(first)
        except ValueError:
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: "
                              f"{self._stderr() or first!r}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from None
        if hello.get("agent") != "dmmig" or hello.get("protocol") != PROTOCOL:
            raise RemoteError(f"the destination's dmmig speaks protocol {hello.get('protocol')}, "
                              f"we speak {PROTOCOL}", hint="install the same dmmig version on both hosts")
        self.hello = hello

    def call(self, op: str, *, deadline_s: float | None = None, **kw: Any) -> dict[str, Any]:
        """OP's reply; RemoteError if none came within DEADLINE_S (default: deadline_for)."""
        if self._broken:
            raise RemoteError(f"the agent channel to the destination is unusable ({self._broken}); "
                              f"{op} was not sent")
        limit = deadline_for(op, kw) if deadline_s is None else deadline_s
        end = time.monotonic() + limit
        try:
            self.chan.settimeout(max(limit, 0.001))
            self.chan.sendall((json.dumps({"op": op, **kw}) + "\n").encode())
        except (TimeoutError, socket.timeout):
            self._fail(f"no room to send {op} within {limit:.0f}s")
            raise RemoteError(f"the destination took no request for {limit:.0f}s ({op}): "
                              "a dead or black-holed link?") from None
        except (OSError, EOFError) as e:  # paramiko raises EOFError writing to a dead transport
            self._fail(f"{op}: {type(e).__name__}")
            raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                              f"{type(e).__name__} {e}".rstrip()) from None
        line = self._readline(end, op)
        rep = dict(json.loads(line))
        if not rep.pop("ok"):
            kind = rep.get("kind")
            cls = {"BadInput": BadInput, "Busy": Busy}.get(str(kind), RemoteError)
            raise cls(f"destination: {rep['error']}", hint=rep.get("hint"))
        return rep

    def _readline(self, end: float, op: str) -> str:
        """One reply line by END (monotonic). A reply that comes late can no longer be told
        from the next one's: after a timeout the channel is closed and the client unusable."""
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.chan.settimeout(left)
                data = self.chan.recv(1 << 16)
            except (TimeoutError, socket.timeout):
                self._fail(f"no reply to {op} in time")
                raise RemoteError(f"no reply from the destination's agent to {op} within the deadline: "
                                  "a dead or black-holed link? (the agent channel is closed)") from None
            except (OSError, EOFError) as e:
                self._fail(f"{op}: {type(e).__name__}")
                raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                                  f"{type(e).__name__} {e}".rstrip()) from None
            if not data:  # the agent's end closed: what it said on stderr is still readable
                self._broken = f"the agent went away during {op}"
                raise RemoteError(f"the destination agent went away during {op}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def _fail(self, why: str) -> None:
        self._broken = why
        try:
            self.chan.close()
        except (OSError, EOFError):
            pass
        except Exception:  # noqa: BLE001 - paramiko's SSHException on a dead transport; the first error stands
            pass

    def _stderr(self) -> str:
        try:
            self.chan.settimeout(5)
            err = self.chan.makefile_stderr("r").read(4000)
        except Exception:  # noqa: BLE001 - only for the message; the failure is reported anyway
            return ""
        return (err.decode(errors="replace") if isinstance(err, bytes) else str(err)).strip()

    def close(self) -> None:
        self.chan.close()
