"""The destination's side of a disk's migration: what `dmmig agent` does there.

The agent's operations (AgentServer): prepare the disk (an existing one, or one it creates),
export it over NBD, report, stop, digest, and the handover gate's half that runs here. The
agent keeps no connection state: everything it starts (an export) is recorded as
NAME.dest.json in its state directory (names.Files.incoming), so a later connection, `dmmig
status` or `dmmig abort` on this host can find and stop it.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

from dmmig import __version__
from dmmig.adapters import blockdev, nbd, tlscreds, xenstore
from dmmig.adapters.agentclient import PROTOCOL, WARM_PROTOCOL
from dmmig.adapters.blockdev import Loop, block_device, dm_name_of, holder_names
from dmmig.adapters.lvm import Lvm
from dmmig.adapters.runner import Runner, SubprocessRunner
from dmmig.core import confine, gate, inuse, journal
from dmmig.core import generation as warmth
from dmmig.core.copier import digest_ranges
from dmmig.core.gate import GateServer
from dmmig.core.records import INCOMING_VERSION, TOOK_OVER, Incoming, Unreadable, read_incoming, to_json
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError, StateError
from dmmig.names import INCOMING_SUFFIX, Files, export_dir, incoming_names
from dmmig.validate import disk_name

DEST_TOOLS = ("qemu-nbd",)  # what the destination runs for a migration (op_probe reports them)
# and what block-dmmig's add runs there at the very end of `dmmig migrate` (it wraps the disk in
# its dm top, a file through a loop device): op_probe reports them too
SCRIPT_TOOLS = ("dmsetup", "losetup")


def incoming(state: str) -> dict[str, Incoming | Unreadable]:
    """Every disk a source's dmmig is (or was) migrating into this host: NAME -> the agent's
    record (records of earlier versions are migrated as they load: dmmig/core/records.py)."""
    out: dict[str, Incoming | Unreadable] = {}
    try:
        files = os.listdir(state)
    except FileNotFoundError:
        return out
    for name in incoming_names(files):
        try:
            rec = read_incoming(os.path.join(state, name + INCOMING_SUFFIX), name)
        except (OSError, ValueError) as e:
            out[name] = Unreadable(str(e))
            continue
        if rec is not None:
            out[name] = rec
    return out


class AgentServer:
    """POLICY confines what the agent touches (dmmig/core/confine.py); XENSTORE opens this host's
    XenStore, or gives None where no Xen runs (injected by the unit tests). RELAY(NAME) connects
    to NAME's export and gives what the session becomes after op_relay's reply (the agent's
    relay: it turns the session into NBD), or raises if there is no export."""

    def __init__(self, runner: Runner, state: str, *, policy: confine.Policy | None = None,
                 xenstore: Callable[[], AbstractContextManager[xenstore.XenStore | None]] = xenstore.local,
                 relay: Callable[[str], Callable[[bytes], None]] | None = None) -> None:
        self.r = runner
        self.relay = relay
        self.state = state
        self.gate = GateServer(state)
        self.policy = policy or confine.Policy()
        self.xenstore = xenstore
        self.loop = Loop(runner)
        self._inp: Any = None
        self._after: Callable[[bytes], None] | None = None  # what the session becomes after a reply

    def _rec_path(self, name: str) -> str:
        return Files(self.state, name).incoming

    def load(self, name: str) -> Incoming | None:
        """NAME's record here, or None."""
        return read_incoming(self._rec_path(name), name)

    def _save(self, rec: Incoming) -> None:
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        rec.version = INCOMING_VERSION
        tmp = self._rec_path(rec.name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(to_json(rec), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._rec_path(rec.name))

    # ---- operations ---------------------------------------------------------------------
    def op_hello(self) -> dict[str, Any]:
        # the state dir lets the source say exactly what to remove here if we become unreachable
        # and which tools it lacks, which the source checks before anything changes
        return {"protocol": PROTOCOL, "version": __version__, "host": socket.gethostname(),
                "state_dir": self.state, "export_dir": export_dir(self.state),
                "tools": {t: shutil.which(t) is not None for t in DEST_TOOLS}, "warm": WARM_PROTOCOL,
                "warm_gate": True, "fresh_export": True}

    def op_prepare_disk(self, name: str, path: str, size: int, create: bool = False,
                        block_size: int | None = None, migration: str | None = None,
                        warm: str | None = None) -> dict[str, Any]:
        """Check (or create) NAME's destination disk PATH for a source disk of SIZE bytes and
        BLOCK_SIZE-byte logical blocks, and start the agent's record of it.

        MIGRATION names the source's migration (one per `dmmig prepare` there). A resumed copy
        of the same migration keeps its record: whether dmmig created the disk, whether it was
        written, its export. Any other migration starts a fresh record: nothing of an earlier
        one survives, above all not `handed_over`, which would keep the next `add` from asking
        the gate. An unfinished record of another migration refuses (it may still be arriving).

        WARM: the generation the source's copy would continue from (dmmig/flows/warm.py): the
        reply's "warm" says whether PATH carries it untouched; checked, and the generation
        forgotten here, after every other check and before anything writes PATH."""
        disk_name(name)
        size = confine.size_ok(size)
        if block_size is not None and block_size not in (512, 1024, 2048, 4096):
            raise BadInput(f"invalid logical block size {block_size!r}")
        old = self.load(name)
        same = _same_migration(old, path, migration)
        if old is not None and not same and not old.handed_over:
            alive = bool(old.export and old.export.alive())
            raise Busy(f"another migration of {name} {'is arriving' if alive else 'was arriving (unfinished)'} here "
                       f"onto {old.path}",
                       hint=f"`dmmig abort {name}` on its source, or here if that source is gone")
        keep = old if same else None
        created_as = keep.created_how() if keep else None
        if os.path.lexists(path):  # a dangling symlink counts: the agent never creates through one
            kind = self.policy.existing(path)
            self._check_block_size(path, 512 if kind == "file" else blockdev.logical_block_size(self.r, path),
                                   block_size)
            self._check_not_in_use(name, path, keep)
        elif not create:
            self.policy.lexical(path)
            raise BadInput(f"destination disk {path} does not exist", hint="pass --create to make it")
        else:
            how, where, lv = self.policy.creatable(path, size, self.r)
            # a file becomes block-dmmig's loop device there: 512-byte sectors (losetup's default)
            self._check_block_size(path, 512 if how == "file" else Lvm(self.r).block_size(where), block_size)
            self._create(path, size, how, where, lv)
            created_as = how
        have = _size_of(path)
        if have < size:
            raise BadInput(f"destination disk {path} is smaller than the source: {have} < {size} bytes")
        verdict: dict[str, Any] | None = None
        if warm is not None:
            ok, why = warmth.check_kept(self.state, name, path, size, str(warm), self.r)
            verdict = {"ok": ok, "why": why}
        else:  # a copy that does not continue from it writes the disk: the generation is over
            warmth.drop_for(self.state, name, path)
        # a resumed copy keeps its export and what it wrote, and what a newer dmmig added to it
        rec = Incoming(name=name, path=path, size=size, created=created_as is not None, created_as=created_as,
                       migration=migration, block_size=block_size, since=(keep and keep.since) or time.time(),
                       export=keep.export if keep else None, written=bool(keep and keep.written),
                       extra=dict(keep.extra) if keep else {})
        self._save(rec)
        # only a sparse file dmmig just created, never written, is known to read as zeros: a new
        # linear LV reuses freed extents and reads another volume's old data
        return {"path": path, "size": have, "created": created_as is not None,
                "zeroed": created_as == "file" and not rec.written, **({"warm": verdict} if verdict else {})}

    def op_probe(self, paths: list[str], script: str = "/etc/xen/scripts/block-dmmig",
                 names: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
                 create: bool = False) -> dict[str, Any]:
        """What `dmmig migrate --dry-run` and its checks need to know here; changes nothing.
        NAMES: the disk name of each path (its incoming record); SIZES: the source disks'
        sizes (what a --create would make)."""
        disks: dict[str, Any] = {}
        for path in paths:
            name = (names or {}).get(path)
            rec = self.load(name) if name else None
            d: dict[str, Any] = {"exists": False, "incoming": bool(rec and not rec.handed_over)}
            disks[path] = d
            try:
                self.policy.lexical(path)
                if not os.path.lexists(path):
                    if create and sizes and path in sizes:
                        how, where, _ = self.policy.creatable(path, confine.size_ok(sizes[path]), self.r)
                        d["block_size"] = 512 if how == "file" else Lvm(self.r).block_size(where)
                    continue
                kind = self.policy.existing(path)
            except BadInput as e:
                d["refused"] = e.message
                continue
            d["exists"] = True
            d["size"] = _size_of(path)
            d["block_size"] = 512 if kind == "file" else blockdev.logical_block_size(self.r, path)
            try:
                self._check_not_in_use(name or "", path, rec if d["incoming"] else None)
                d["in_use"] = None
            except DmmigError as e:
                d["in_use"] = e.message
        # the exports' directory, checked as the first export's private_dir will check it
        try:
            journal.check_private_dir(export_dir(self.state))
            export_refused = None
        except StateError as e:
            export_refused = {"message": e.message, "hint": e.hint}
        # the block script here finds an incoming migration in ITS state dir (the default, or
        # $DMMIG_STATE_DIR of xl's environment): if that is not ours, the gate is never asked
        return {"disks": disks, "block_script": os.access(script, os.X_OK), "script_path": script,
                "tools": {t: shutil.which(t) is not None for t in (*DEST_TOOLS, *SCRIPT_TOOLS)},
                "export_dir_refused": export_refused,
                "state_dir": self.state, "hotplug_state_dir": journal.state_dir(None)}

    def op_export(self, name: str, addr: str | None = None, tls: dict[str, str] | None = None,
                  insecure: bool = False, fresh: bool = False) -> dict[str, Any]:
        """Export NAME's disk: on a unix socket in the root-only export dir (ADDR None: --transport
        ssh), or on ADDR with TLS (the server's credentials, sent by the source) or, only if the
        source's operator said --insecure, without.

        FRESH: never the running export; it is stopped first, and must be gone. A connection of
        an earlier copy or mirror leg that the source gave up on (a dead TCP flow, a killed
        dmmig) may still hold writes that reach qemu-nbd when its path comes back, and would land
        over what the source writes from now on. Once that qemu-nbd has exited, its writes are
        on the disk and its connections are closed: late segments meet a reset."""
        rec = self.load(name)
        if rec is None:
            raise BadInput(f"no destination disk prepared for {name}")
        if addr is not None and tls is None and not insecure:
            raise BadInput(f"an NBD export of {name} on {addr} needs TLS credentials (or --insecure on the source)")
        journal.private_dir(export_dir(self.state))  # made or repaired to 0700 before a key or socket goes in
        files = Files(self.state, name)
        tls_dir = files.export_tls if tls is not None else None
        old = rec.export
        if old:
            same = (old.socket is not None) if addr is None else (
                old.addr == addr and old.tls == tls_dir and (tls is None or _same_creds(old.tls, tls)))
            if same and old.alive() and not fresh:
                return {"export": asdict(old)}
            # gone, or another kind (a TCP export of an older dmmig, new credentials), or FRESH
            if not nbd.stop_export(old):
                raise RemoteError(f"qemu-nbd {old.pid} exporting {old.path} did not exit within 20 s: writes of an "
                                  "earlier connection may still be on their way to the disk",
                                  hint="check the destination's storage (a hung write?), then retry")
        if tls_dir is not None:
            assert tls is not None
            if "," in tls_dir:
                raise BadInput(f"{tls_dir}: qemu-nbd's --object cannot take a ',' in the path")
            tlscreds.write_server(tls_dir, tls)
        e = nbd.start_export(self.r, name, rec.path, files.qemu_nbd_pid,
                             socket_path=files.export_socket if addr is None else None,
                             addr=addr, tls=tls_dir)
        rec.export = e
        rec.written = True  # from now on the disk is not known to be zero
        self._save(rec)
        return {"export": asdict(e)}

    def op_stop(self, name: str, remove_created: bool = False, warm: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stop the export and forget NAME; with remove_created, delete a disk we created.
        WARM (the source's finish: both disks identical): record this host's half of the
        generation WARM["generation"], the disk's fence taken once the export is stopped."""
        disk_name(name)
        rec = self.load(name)
        done: list[str] = []
        if rec is None:
            return {"done": gate.remove_stale(self.state, name)}
        if rec.export:
            nbd.stop_export(rec.export)
            done.append(f"stopped qemu-nbd {rec.export.pid} exporting {rec.path}")
        if warm is not None and not remove_created:
            gen = str(warm.get("generation") or "")
            try:
                if not gen.isascii() or not gen.isalnum() or len(gen) > 64:
                    raise ValueError(f"invalid generation {gen!r:.40}")
                # the source vouched that the disks were identical when its top was last
                # suspended; this fence is taken now, after the source's finish
                self._unused_since_export(name, rec, "before the source's finish")
                warmth.record(self.state, name, TOOK_OVER, rec.path, _size_of(rec.path), gen,
                              str(warm.get("peer") or "")[:255], self.r)
                done.append(f"recorded generation {gen[:12]} of {rec.path}: `dmmig wrap {name} {rec.path}` here "
                            "tracks its writes from the start, so a copy back sends only those")
            except (OSError, ValueError, DmmigError) as e:
                warmth.drop(self.state, name)
                done.append(f"recorded no generation of {rec.path} ({e}): a copy back will be a full one")
        # what a killed agent made but had not journaled yet
        files = Files(self.state, name)
        for left in (files.qemu_nbd_pid, files.export_socket):
            if os.path.lexists(left):
                os.unlink(left)
        if tlscreds.remove(files.export_tls):
            done.append(f"removed the TLS credentials of {name}")
        if remove_created and rec.created:
            done += self._remove_created(rec)
        os.unlink(self._rec_path(name))
        done += gate.remove_stale(self.state, name)
        return {"done": done}

    def op_await_gate(self, names: list[str], timeout: float) -> dict[str, Any]:
        """Listen on the gate of each of NAMES (refused if another agent here waits for one of
        them), then block until a destination `add` asks about one, or TIMEOUT (see
        dmmig/core/gate.py). Returns early, None, if the source that waits goes away."""
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

    def op_answer_gate(self, name: str, ok: bool, why: str = "", warm: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
        """WARM (a yes from a source that found both disks identical, its top suspended):
        record this host's half of generation WARM["generation"] once the export is stopped,
        before the `add` may go on; the reply's "warm" says whether it was."""
        disk_name(name)
        t0 = time.monotonic()
        steps: dict[str, int] = {}  # for the source's journal: its guest's disk is frozen meanwhile
        rec = self.load(name)
        if ok and rec and rec.export:
            # no write through the export after the yes: stop it before the `add` goes on
            nbd.stop_export(rec.export)
            rec.export = None
            self._save(rec)
            steps["stop_export"] = round((time.monotonic() - t0) * 1000)
        verdict: dict[str, Any] | None = None
        if warm is not None:
            t1 = time.monotonic()
            verdict = self._took_over(name, rec, warm) if ok and rec else {"ok": False, "why": "no yes"}
            steps["fence"] = round((time.monotonic() - t1) * 1000)
        t1 = time.monotonic()
        delivered = self.gate.answer(name, ok, why)
        steps["deliver"] = round((time.monotonic() - t1) * 1000)
        if verdict and verdict["ok"] and not delivered:
            warmth.drop(self.state, name)  # the `add` gave up: the disk is not this host's
            verdict = {"ok": False, "why": "the yes was not delivered"}
        if ok and rec and delivered:
            # only now is the disk this host's: an `add` that gave up before the yes failed, and
            # the next one must ask again
            rec.handed_over = time.time()
            self._save(rec)
        return {"delivered": delivered, **({"warm": verdict} if verdict else {}), "steps_ms": steps}

    def _took_over(self, name: str, rec: Incoming, warm: dict[str, Any]) -> dict[str, Any]:
        """This host's half of a generation (role took-over) of REC's disk, fenced now: its
        export is stopped, nothing of dmmig's writes it until `add` puts era under its top."""
        gen = str(warm.get("generation") or "")
        try:
            if not gen.isalnum() or len(gen) > 64:
                raise ValueError(f"invalid generation {gen!r:.40}")
            if rec.export is not None:
                raise ValueError("its export still runs")
            # the `add` that asked has not wrapped the disk yet (it waits for this answer), so
            # nothing of dmmig's uses it here; from its wrap on, era counts every write (track)
            self._unused_since_export(name, rec, "before this yes")
            # not waited for (the source's top is suspended meanwhile): a file's ctime is
            # settled by warm.track, before era goes under the top and before blkback opens it
            warmth.record(self.state, name, TOOK_OVER, rec.path, _size_of(rec.path), gen,
                          str(warm.get("peer") or "")[:255], self.r, wait=False)
            return {"ok": True}
        except (OSError, ValueError, DmmigError) as e:
            warmth.drop(self.state, name)
            return {"ok": False, "why": f"{rec.path} could not be fenced: {e}"}

    def _unused_since_export(self, name: str, rec: Incoming, when: str) -> None:
        """ValueError unless nothing used REC's disk here since the export's last write: not a
        domain it was handed over to (a delivered yes), not dmmig-NAME (a journal: wrapped here)
        nor anything else stacked on it. A fence taken now would make their writes part of the
        "identical" baseline, and they would never go back."""
        if rec.handed_over is not None:
            raise ValueError(f"it was handed over to a domain here {when}: it may have been written "
                             "since the two disks were identical")
        if os.path.exists(Files(self.state, name).journal):
            raise ValueError(f"dmmig here has a journal for {name}: the disk was wrapped here {when}")
        self.policy.existing(rec.path)
        if stat.S_ISBLK(os.stat(rec.path).st_mode):
            held = holder_names(block_device(rec.path))
            if held:
                raise ValueError(f"it is held by {', '.join(held)}")

    def op_relay(self, name: str) -> dict[str, Any]:
        """From the reply on, this session carries NAME's NBD traffic (as `dmmig agent relay
        NAME` would, without a second agent's start): the source's copier sends no request
        after this one. Refused, and the session stays an agent, if there is no export."""
        if self.relay is None:
            raise BadInput("this agent relays nothing")
        self._after = self.relay(name)
        return {}

    def op_digest(self, offset: int, length: int, chunk: int, name: str | None = None,
                  path: str | None = None) -> dict[str, Any]:
        """Digests of a disk being migrated here (NAME's, or the one at PATH), within its size:
        never of any other file or device."""
        rec = self._record_of(name, path)
        self.policy.existing(rec.path)  # still what it was: not replaced by a link out of a root
        offset, length, chunk = confine.range_ok(rec.path, rec.size, offset, length, chunk)
        return {"digests": digest_ranges(rec.path, offset, length, chunk)}

    # ---- helpers ------------------------------------------------------------------------
    def _record_of(self, name: str | None, path: str | None) -> Incoming:
        if name is not None:
            rec = self.load(disk_name(name))
            if rec is not None and (path is None or rec.path == path):
                return rec
        elif path is not None:
            for r in incoming(self.state).values():
                if isinstance(r, Incoming) and r.path == path:
                    return r
        raise confine.Refused(f"{path or name} is not a disk being migrated into this host: the agent reads "
                              "only those")

    def _create(self, path: str, size: int, how: str, where: str, lv: str) -> None:
        if how == "lv":
            Lvm(self.r).create(where, lv, size)
            return
        # O_NOFOLLOW|O_EXCL: a file of ours, never through a link planted meanwhile
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: reads as zeros
        finally:
            os.close(fd)

    def _remove_created(self, rec: Incoming) -> list[str]:
        path = rec.path
        how = rec.created_how()
        if how == "lv":
            try:
                if not stat.S_ISBLK(os.stat(path).st_mode):
                    return []
            except FileNotFoundError:
                return []
            vg, lv = path.split("/")[2:4]
            Lvm(self.r).remove(vg, lv)  # refuses an open LV
            return [f"removed the logical volume {vg}/{lv} (created by dmmig)"]
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return []
        except FileNotFoundError:
            return []
        os.unlink(path)
        return [f"removed {path} (created by dmmig)"]

    @staticmethod
    def _check_block_size(path: str, have: int, want: int | None) -> None:
        if want is not None and have != want:
            raise BadInput(f"destination disk {path} has a logical block size of {have} bytes, the source disk "
                           f"{want}: blkfront keeps the sector size it started with, so the guest could not use "
                           "its disk after the move",
                           hint="use a destination disk with the same logical block size (a file becomes a loop "
                                "device of 512-byte sectors)")

    def _check_not_in_use(self, name: str, path: str, rec: Incoming | None) -> None:
        """Refuse PATH if anything here uses it: a holder, an exclusive opener (a mount, swap,
        LVM, md), a loop device over a file, a local domain's disk backend, a process with it
        open, another dmmig disk's record. REC: this migration's own record, whose export
        (qemu-nbd) is no other user."""
        exp = rec.export if rec else None
        ignore = {exp.pid} if exp and exp.alive() else set()
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

    def _dmmig_users(self, name: str, disk: inuse.Storage, loops: list[blockdev.LoopInfo]) -> list[str]:
        """Other disks dmmig knows here whose storage is DISK: another incoming migration's
        destination, a journaled disk's origin or era metadata."""
        out = []
        for n, rec in incoming(self.state).items():
            if n != name and isinstance(rec, Incoming) and inuse.exact(rec.path, None, loops).overlaps(disk):
                out.append(f"it is the destination of dmmig's incoming migration {n}")
        j = journal.Journal(self.state)
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


def _same_migration(old: Incoming | None, path: str, migration: str | None) -> bool:
    """OLD is the record of this very migration (a resumed copy): same path, not handed over,
    and the same migration id; a record written before ids existed is taken for the same
    one, as that version did (a migration in flight across an upgrade), and so is a request
    without an id (a source of that version) for a record without one."""
    if old is None or old.path != path or old.handed_over:
        return False
    return old.pre_ids or old.migration == migration


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


def record(state: str, name: str) -> Incoming | None:
    """The agent's record of incoming NAME here, or None."""
    return AgentServer(SubprocessRunner(), state).load(disk_name(name))
