"""The destination agent: `dmmig agent`, the only command dmmig runs on the destination.

`dmmig agent` speaks JSON lines on stdin/stdout. Protocol version 2. The first line the agent
writes is a hello:
    {"agent": "dmmig", "protocol": 2, "version": "...", "host": "...", "state_dir": ..., "export_dir": ...,
     "tools": {"qemu-nbd": true}}
then one reply per request:  request {"op": OP, ...}  ->  {"ok": true, ...} | {"ok": false,
"error": MSG, "hint": HINT, "kind": CLASS, "exit_code": N, "fields": {...}}
(errors.DmmigError.to_reply: the source re-raises the same kind, so it exits with the code the
failure has here). The agent keeps no connection state: everything it starts
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
import hashlib
import json
import mmap
import os
import re
import select
import shlex
import shutil
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from dmmig import __version__, confine, gate, inuse, tlscreds, xenstore
from dmmig import blockdev as B
from dmmig import journal as J
from dmmig import nbd as N
from dmmig.agentcmd import agent_argv, remote_command
from dmmig.blockdev import Loop, block_device, dm_name_of, holder_names
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError, StateError
from dmmig.gate import GateServer
from dmmig.runner import Runner, SubprocessRunner
from dmmig.validate import disk_name

PROTOCOL = 2
DEST_TOOLS = ("qemu-nbd",)  # what the destination runs for a migration (op_probe reports them)


def export_dir(state: str) -> str:
    """Where the exports' unix sockets and TLS keys live: a directory only root can enter."""
    return os.path.join(state, "nbd")


def incoming(state: str) -> dict[str, dict[str, Any]]:
    """Every disk a source's dmmig is (or was) migrating into this host: NAME -> the agent's
    record (path, size, created, created_as, migration, block_size, export, written,
    handed_over). Records written by earlier versions lack some keys: readers use .get()."""
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
    """POLICY confines what the agent touches (dmmig/confine.py); XENSTORE opens this host's
    XenStore, or gives None where no Xen runs (injected by the unit tests)."""

    def __init__(self, runner: Runner, state: str, *, policy: confine.Policy | None = None,
                 xenstore: Callable[[], AbstractContextManager[xenstore.XenStore | None]] = xenstore.local) -> None:
        self.r = runner
        self.state = state
        self.gate = GateServer(state)
        self.policy = policy or confine.Policy()
        self.xenstore = xenstore
        self.loop = Loop(runner)
        self._inp: Any = None
        self._after: Callable[[bytes], None] | None = None  # what the session becomes after a reply

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
        # and which tools it lacks, which the source checks before anything changes
        return {"protocol": PROTOCOL, "version": __version__, "host": socket.gethostname(),
                "state_dir": self.state, "export_dir": export_dir(self.state),
                "tools": {t: shutil.which(t) is not None for t in DEST_TOOLS}}

    def op_prepare_disk(self, name: str, path: str, size: int, create: bool = False,
                        block_size: int | None = None, migration: str | None = None) -> dict[str, Any]:
        """Check (or create) NAME's destination disk PATH for a source disk of SIZE bytes and
        BLOCK_SIZE-byte logical blocks, and start the agent's record of it.

        MIGRATION names the source's migration (one per `dmmig prepare` there). A resumed copy
        of the same migration keeps its record: whether dmmig created the disk, whether it was
        written, its export. Any other migration starts a fresh record: nothing of an earlier
        one survives, above all not `handed_over`, which would keep the next `add` from asking
        the gate. An unfinished record of another migration refuses (it may still be arriving)."""
        disk_name(name)
        size = confine.size_ok(size)
        if block_size is not None and block_size not in (512, 1024, 2048, 4096):
            raise BadInput(f"invalid logical block size {block_size!r}")
        old = self._load(name)
        same = _same_migration(old, path, migration)
        if old is not None and not same and not old.get("handed_over"):
            exp = old.get("export")
            alive = bool(exp and N.Export(**exp).alive())
            raise Busy(f"another migration of {name} {'is arriving' if alive else 'was arriving (unfinished)'} here "
                       f"onto {old.get('path')}",
                       hint=f"`dmmig abort {name}` on its source, or here if that source is gone")
        keep = old if same and old is not None else {}
        created_as = _created_as(keep)
        if os.path.lexists(path):  # a dangling symlink counts: the agent never creates through one
            kind = self.policy.existing(path)
            self._check_block_size(path, 512 if kind == "file" else B.logical_block_size(self.r, path), block_size)
            self._check_not_in_use(name, path, keep or None)
        elif not create:
            self.policy.lexical(path)
            raise BadInput(f"destination disk {path} does not exist", hint="pass --create to make it")
        else:
            how, where, lv = self.policy.creatable(path, size, self.r)
            # a file becomes block-dmmig's loop device there: 512-byte sectors (losetup's default)
            self._check_block_size(path, 512 if how == "file" else self._vg_block_size(where), block_size)
            self._create(path, size, how, where, lv)
            created_as = how
        have = _size_of(path)
        if have < size:
            raise BadInput(f"destination disk {path} is smaller than the source: {have} < {size} bytes")
        rec: dict[str, Any] = {k: keep[k] for k in ("export", "written") if k in keep}
        rec.update(name=name, path=path, size=size, created=created_as is not None, created_as=created_as,
                   migration=migration, block_size=block_size, since=keep.get("since") or time.time())
        self._save(name, rec)
        # only a sparse file dmmig just created, never written, is known to read as zeros: a new
        # linear LV reuses freed extents and reads another volume's old data
        return {"path": path, "size": have, "created": created_as is not None,
                "zeroed": created_as == "file" and not rec.get("written")}

    def op_probe(self, paths: list[str], script: str = "/etc/xen/scripts/block-dmmig",
                 names: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
                 create: bool = False) -> dict[str, Any]:
        """What `dmmig migrate --dry-run` and its checks need to know here; changes nothing.
        NAMES: the disk name of each path (its incoming record); SIZES: the source disks'
        sizes (what a --create would make)."""
        disks: dict[str, Any] = {}
        for path in paths:
            name = (names or {}).get(path)
            rec = self._load(name) if name else None
            d: dict[str, Any] = {"exists": False, "incoming": bool(rec and not rec.get("handed_over"))}
            disks[path] = d
            try:
                self.policy.lexical(path)
                if not os.path.lexists(path):
                    if create and sizes and path in sizes:
                        how, where, _ = self.policy.creatable(path, confine.size_ok(sizes[path]), self.r)
                        d["block_size"] = 512 if how == "file" else self._vg_block_size(where)
                    continue
                kind = self.policy.existing(path)
            except BadInput as e:
                d["refused"] = e.message
                continue
            d["exists"] = True
            d["size"] = _size_of(path)
            d["block_size"] = 512 if kind == "file" else B.logical_block_size(self.r, path)
            try:
                self._check_not_in_use(name or "", path, rec if d["incoming"] else None)
                d["in_use"] = None
            except DmmigError as e:
                d["in_use"] = e.message
        # the block script here finds an incoming migration in ITS state dir (the default, or
        # $DMMIG_STATE_DIR of xl's environment): if that is not ours, the gate is never asked
        return {"disks": disks, "block_script": os.access(script, os.X_OK), "script_path": script,
                "tools": {t: shutil.which(t) is not None for t in DEST_TOOLS},
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

    def op_stop(self, name: str, remove_created: bool = False) -> dict[str, Any]:
        """Stop the export and forget NAME; with remove_created, delete a disk we created."""
        disk_name(name)
        rec = self._load(name)
        done: list[str] = []
        if rec is None:
            return {"done": gate.remove_stale(self.state, name)}
        exp = rec.get("export")
        if exp:
            e = N.Export(**exp)
            N.stop_export(e)
            done.append(f"stopped qemu-nbd {exp['pid']} exporting {rec['path']}")
        # what a killed agent made but had not journaled yet
        for left in (os.path.join(self.state, f"{name}.qemu-nbd.pid"),
                     os.path.join(export_dir(self.state), f"{name}.sock")):
            if os.path.lexists(left):
                os.unlink(left)
        if tlscreds.remove(os.path.join(export_dir(self.state), f"{name}.tls")):
            done.append(f"removed the TLS credentials of {name}")
        if remove_created and rec.get("created"):
            done += self._remove_created(rec)
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
        disk_name(name)
        rec = self._load(name)
        if ok and rec and rec.get("export"):
            # no write through the export after the yes: stop it before the `add` goes on
            N.stop_export(N.Export(**rec["export"]))
            rec.pop("export")
            self._save(name, rec)
        delivered = self.gate.answer(name, ok, why)
        if ok and rec and delivered:
            # only now is the disk this host's: an `add` that gave up before the yes failed, and
            # the next one must ask again
            rec["handed_over"] = time.time()
            self._save(name, rec)
        return {"delivered": delivered}

    def op_relay(self, name: str) -> dict[str, Any]:
        """From the reply on, this session carries NAME's NBD traffic (as `dmmig agent relay
        NAME` would, without a second agent's start): the source's copier sends no request
        after this one. Refused, and the session stays an agent, if there is no export."""
        sock = _export_socket(self.state, name)
        self._after = lambda rest: _relay_session(sock, rest)
        return {}

    def op_digest(self, offset: int, length: int, chunk: int, name: str | None = None,
                  path: str | None = None) -> dict[str, Any]:
        """Digests of a disk being migrated here (NAME's, or the one at PATH), within its size:
        never of any other file or device."""
        rec = self._record_of(name, path)
        p = str(rec["path"])
        self.policy.existing(p)  # still what it was: not replaced by a link out of a root
        offset, length, chunk = confine.range_ok(p, int(rec["size"]), offset, length, chunk)
        return {"digests": digest_ranges(p, offset, length, chunk)}

    # ---- helpers ------------------------------------------------------------------------
    def _record_of(self, name: str | None, path: str | None) -> dict[str, Any]:
        if name is not None:
            rec = self._load(disk_name(name))
            if rec is not None and (path is None or rec.get("path") == path):
                return rec
        elif path is not None:
            for rec in incoming(self.state).values():
                if rec.get("path") == path:
                    return rec
        raise confine.Refused(f"{path or name} is not a disk being migrated into this host: the agent reads "
                              "only those")

    def _create(self, path: str, size: int, how: str, where: str, lv: str) -> None:
        if how == "lv":
            self.r.run(["lvcreate", "--yes", "-L", f"{size}b", "-n", lv, where], timeout=120)
            return
        # O_NOFOLLOW|O_EXCL: a file of ours, never through a link planted meanwhile
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: reads as zeros
        finally:
            os.close(fd)

    def _remove_created(self, rec: dict[str, Any]) -> list[str]:
        path = str(rec["path"])
        how = _created_as(rec)
        if how == "lv":
            try:
                if not stat.S_ISBLK(os.stat(path).st_mode):
                    return []
            except FileNotFoundError:
                return []
            vg, lv = path.split("/")[2:4]
            self.r.run(["lvremove", "--yes", f"{vg}/{lv}"], timeout=120)  # refuses an open LV
            return [f"removed the logical volume {vg}/{lv} (created by dmmig)"]
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return []
        except FileNotFoundError:
            return []
        os.unlink(path)
        return [f"removed {path} (created by dmmig)"]

    def _vg_block_size(self, vg: str) -> int:
        """An LV's logical block size: the largest of its VG's physical volumes'."""
        out = self.r.run(["pvs", "--noheadings", "-o", "pv_name", "--select", f"vg_name={vg}"], timeout=60).stdout
        return max((B.logical_block_size(self.r, pv) for pv in out.split()), default=512)

    @staticmethod
    def _check_block_size(path: str, have: int, want: int | None) -> None:
        if want is not None and have != want:
            raise BadInput(f"destination disk {path} has a logical block size of {have} bytes, the source disk "
                           f"{want}: blkfront keeps the sector size it started with, so the guest could not use "
                           "its disk after the move",
                           hint="use a destination disk with the same logical block size (a file becomes a loop "
                                "device of 512-byte sectors)")

    def _check_not_in_use(self, name: str, path: str, rec: dict[str, Any] | None) -> None:
        """Refuse PATH if anything here uses it: a holder, an exclusive opener (a mount, swap,
        LVM, md), a loop device over a file, a local domain's disk backend, a process with it
        open, another dmmig disk's record. REC: this migration's own record, whose export
        (qemu-nbd) is no other user."""
        exp = (rec or {}).get("export")
        ignore = {int(exp["pid"])} if exp and N.Export(**exp).alive() else set()
        loops = self.loop.infos()
        why: list[str] = []
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            dev = block_device(path)
            own = dm_name_of(dev)
            if own and own.startswith("dmmig-"):
                why.append(f"it is dmmig's device {own}")
            holders = holder_names(dev)
            if holders:
                why.append(f"held by {', '.join(holders)}")
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_EXCL))
            except OSError as e:
                why.append(f"mounted or opened exclusively ({e.strerror})")
        else:
            over = [lo.name for lo in loops if lo.backing == (st.st_dev, st.st_ino)]
            if over:
                why.append(f"a loop device is over it: {', '.join(over)}")
        disk = inuse.footprint(path, loops)
        with self.xenstore() as xs:
            if xs is not None:
                why += [f"used by {u}" for u in inuse.xen_users(xs, disk, loops)]
        why += [f"held open by {p}" for p in inuse.process_users(disk, ignore)]
        why += self._dmmig_users(name, disk, loops)
        if why:
            raise Busy(f"destination disk {path} is in use: {'; '.join(why)}",
                       hint="choose another destination disk, or stop what uses it there")

    def _dmmig_users(self, name: str, disk: inuse.Storage, loops: list[B.LoopInfo]) -> list[str]:
        """Other disks dmmig knows here whose storage is DISK: another incoming migration's
        destination, a journaled disk's origin or era metadata."""
        out = []
        for n, rec in incoming(self.state).items():
            if n != name and rec.get("path") and inuse.exact(str(rec["path"]), None, loops).overlaps(disk):
                out.append(f"it is the destination of dmmig's incoming migration {n}")
        j = J.Journal(self.state)
        for n in j.names():
            try:
                e = j.load(n)
            except StateError as err:
                out.append(f"dmmig's journal of {n} is unreadable, so it may name it ({err.message})")
                continue
            if e is None:
                continue
            if inuse.exact(e.origin, _devno(e.origin_devno), loops).overlaps(disk):
                out.append(f"it is the origin of dmmig disk {n} here (phase {e.phase})")
            elif e.metadata and inuse.exact(e.metadata, None, loops).overlaps(disk):
                out.append(f"it holds the era metadata of dmmig disk {n} here")
        return out

    def serve(self, inp: Lines, out: Any) -> None:
        """Requests from INP (this session's stdin), replies to OUT (its stdout)."""
        self._inp = inp
        out.write(json.dumps({"agent": "dmmig", **self.op_hello()}) + "\n")
        out.flush()
        ops: dict[str, Callable[..., dict[str, Any]]] = {
            "hello": self.op_hello, "probe": self.op_probe, "prepare_disk": self.op_prepare_disk,
            "export": self.op_export, "stop": self.op_stop, "digest": self.op_digest, "relay": self.op_relay,
            "await_gate": self.op_await_gate, "answer_gate": self.op_answer_gate}
        try:
            self._serve(inp, out, ops)
        finally:
            self.gate.close()

    def _serve(self, inp: Lines, out: Any, ops: dict[str, Callable[..., dict[str, Any]]]) -> None:
        for line in inp:
            self._after = None
            try:
                req = _request(line)
                op = ops.get(req.pop("op", None))
                if op is None:
                    raise BadInput(f"unknown agent request {line[:100]!r}",
                                   hint="install the same dmmig version on both hosts")
                reply = {"ok": True, **op(**req)}
            except DmmigError as e:  # its kind goes back unchanged: the source exits with its code
                reply = {"ok": False, **e.to_reply()}
            except Exception as e:  # noqa: BLE001 - report to the source, keep serving
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "kind": "internal",
                         "hint": "a bug in dmmig on the destination: report it with the traceback (--debug)",
                         "trace": traceback.format_exc(limit=20)}
            out.write(json.dumps(reply) + "\n")
            out.flush()
            if reply["ok"] and self._after is not None:
                self._after(inp.rest())  # what was read past the request is the session's next bytes
                return


def _request(line: str) -> dict[str, Any]:
    """A request line: a JSON object, else refused as bad input (not a bug of the agent's)."""
    try:
        req = json.loads(line)
    except ValueError as e:
        raise BadInput(f"unparsable agent request {line[:100]!r}: {e}") from e
    if not isinstance(req, dict):
        raise BadInput(f"unparsable agent request {line[:100]!r}: not an object")
    return req


class Lines:
    """Request lines from file descriptor FD, read in chunks. Unlike a text stream it gives
    back what it read past the last line (rest()): after a relay request those bytes are NBD."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""

    def fileno(self) -> int:
        return self.fd

    def __iter__(self) -> Lines:
        return self

    def __next__(self) -> str:
        while b"\n" not in self._buf:
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise StopIteration  # the source closed (a partial line is no request)
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


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


def _same_migration(old: dict[str, Any] | None, path: str, migration: str | None) -> bool:
    """OLD is the record of this very migration (a resumed copy): same path, not handed over,
    and the same migration id; a record written before ids existed is taken for the same
    one, as that version did (a migration in flight across an upgrade), and so is a request
    without an id (a source of that version) for a record without one."""
    if old is None or old.get("path") != path or old.get("handed_over"):
        return False
    return "migration" not in old or old.get("migration") == migration


def _created_as(rec: dict[str, Any]) -> str | None:
    """'file' or 'lv' if dmmig created the disk. A record of an earlier version says only
    `created`: that version made an LV (lvcreate) for a block device, else a sparse file."""
    if not rec.get("created"):
        return None
    if rec.get("created_as"):
        return str(rec["created_as"])
    try:
        return "lv" if stat.S_ISBLK(os.stat(str(rec.get("path"))).st_mode) else "file"
    except OSError:
        return "file"


def _devno(text: str | None) -> int | None:
    try:
        ma, mi = str(text).split(":")
        return os.makedev(int(ma), int(mi))
    except ValueError:
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
    _relay_session(_export_socket(state, name), b"")
    return 0


def _export_socket(state: str, name: str) -> socket.socket:
    """A connection to NAME's export on its root-only unix socket."""
    rec = AgentServer(SubprocessRunner(), state)._load(disk_name(name))
    exp = N.Export(**rec["export"]) if rec and rec.get("export") else None
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
        AgentServer(SubprocessRunner(), state, policy=policy).serve(Lines(sys.stdin.fileno()), sys.stdout)
        return 0
    if mode not in MODES or arg is None:
        raise BadInput(f"unknown agent mode {mode!r}: use {', '.join(f'{m} ARG' for m in MODES)}")
    MODES[mode](arg)
    if mode == "relay":
        return relay(state, arg)
    if mode == "hold":
        return hold(arg)
    return probe(state, arg)


# Every agent call has a deadline: a link that black-holes (no RST, no FIN) would otherwise
# hold the caller until TCP gives up (~15 min). The transport's keepalive (ssh.connect) keeps
# idle NAT state alive; the deadline is what turns a dead peer into a RemoteError.
START_DEADLINE_S = 30.0
DEFAULT_DEADLINE_S = 120.0
_DEADLINES_S = {"hello": 30.0, "probe": 60.0, "export": 60.0, "stop": 60.0, "relay": 30.0,
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
        argv = agent_argv({"remote_dmmig": remote_dmmig, "remote_state_dir": state_dir})
        self._buf = b""
        self._broken: str | None = None
        self.chan = client.get_transport().open_session()
        self.chan.exec_command(remote_command(argv))
        try:
            first = self._readline(time.monotonic() + START_DEADLINE_S, "start")
        except RemoteError as e:
            raise RemoteError(f"cannot start `{' '.join(argv)}` on the destination: {self._stderr() or e.message}",
                              hint="install dmmig there, or pass --remote-dmmig PATH") from e
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
        except TimeoutError:
            self._fail(f"no room to send {op} within {limit:.0f}s")
            raise RemoteError(f"the destination took no request for {limit:.0f}s ({op}): "
                              "a dead or black-holed link?") from None
        except (OSError, EOFError) as e:  # paramiko raises EOFError writing to a dead transport
            self._fail(f"{op}: {type(e).__name__}")
            raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                              f"{type(e).__name__} {e}".rstrip()) from e
        line = self._readline(end, op)
        rep = dict(json.loads(line))
        if not rep.pop("ok"):
            raise DmmigError.from_reply(rep, "destination: ")
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
            except TimeoutError:
                self._fail(f"no reply to {op} in time")
                raise RemoteError(f"no reply from the destination's agent to {op} within the deadline: "
                                  "a dead or black-holed link? (the agent channel is closed)") from None
            except (OSError, EOFError) as e:
                self._fail(f"{op}: {type(e).__name__}")
                raise RemoteError(f"the SSH connection to the destination broke during {op}: "
                                  f"{type(e).__name__} {e}".rstrip()) from e
            if not data:  # the agent's end closed: what it said on stderr is still readable
                self._broken = f"the agent went away during {op}"
                raise RemoteError(f"the destination agent went away during {op}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def detach(self) -> tuple[Any, bytes]:
        """The channel, for what the session became after the last call (op_relay: NBD), and
        the bytes already read past that call's reply. The client can make no call after it."""
        self._broken = "the agent's session carries NBD now"
        rest, self._buf = self._buf, b""
        self.chan.settimeout(None)  # an idle NBD connection is no dead agent
        return self.chan, rest

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
