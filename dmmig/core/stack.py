"""The local device stack of one disk: wrap, prepare (insert era live), dirty, abort, unwrap.

    /dev/mapper/dmmig-NAME      top: blkback opens it; only its table is ever swapped
    /dev/mapper/dmmig-NAME-era  dm-era over the origin, metadata on a device of ours
    origin                      LV, partition, loop device

Every change is journaled before it is made, so a killed dmmig leaves a state that
`status` explains and `abort` undoes; abort reads the kernel, not just the journal.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dmmig import sizing
from dmmig.adapters.blockdev import BlockDev, Loop, below, block_device, dm_name_of, holder_names
from dmmig.adapters.dm.dmsetup import DmInfo, DmSetup
from dmmig.adapters.dm.guard import log_path as guard_log
from dmmig.adapters.dm.targets import Era, Linear, Table
from dmmig.adapters.era import BlockRange, DirtyRanges, EraTools
from dmmig.adapters.runner import Runner
from dmmig.core.journal import ABORTING, FINISHING, PREPARED, PREPARING, WRAPPED, Entry, Journal
from dmmig.core.mirror import MirrorSide
from dmmig.core.records import CopyState, MirrorState
from dmmig.errors import BadInput, Busy, StateError, Steps, Undo
from dmmig.names import Files, era_name, top_name
from dmmig.validate import block_fits, disk_name, era_block_size, require_tools

UUID_PREFIX = "DMMIG"
DEFAULT_BLOCK_BYTES = sizing.DEFAULT_BLOCK_BYTES


def uuid_for(role: str, name: str) -> str:
    return f"{UUID_PREFIX}-{role}-{name}"


def metadata_bytes(origin_bytes: int, block_sectors: int) -> int:
    """The era metadata device dmmig makes (sizing.metadata_file_bytes: from dm-era's on-disk
    layout, with room for a second copy of the era array; dm-era cannot grow it later)."""
    return sizing.metadata_file_bytes(sizing.nr_blocks(origin_bytes, block_sectors * 512))


def min_metadata_bytes(origin_bytes: int, block_sectors: int) -> int:
    nr_blocks = -(-origin_bytes // (block_sectors * 512))
    return _round_up(4 * nr_blocks + 8 * (nr_blocks // 8 + 1) + (2 << 20), 4096)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class Stack:
    runner: Runner
    dm: DmSetup
    journal: Journal
    loop: Loop = field(init=False)
    era: EraTools = field(init=False)
    mirror: MirrorSide = field(init=False)

    def __post_init__(self) -> None:
        self.loop = Loop(self.runner)
        self.era = EraTools(self.runner, self.dm)
        self.mirror = MirrorSide(self.runner, self.journal.dir)

    # ---- wrap / unwrap ------------------------------------------------------------------
    def wrap(self, name: str, origin_path: str) -> str:
        disk_name(name)
        origin = block_device(origin_path)
        top = top_name(name)
        info = self.dm.info(top)
        if info is not None:
            t = self.dm.table(top).target
            entry = self.journal.load(name)
            under = self._origin_devno(name, entry, t)
            if under == origin.devno:
                if entry is None:  # journal lost: remember the origin again
                    self.journal.save(Entry(name, origin_path, origin.devno), WRAPPED)
                return f"/dev/mapper/{top}"
            raise BadInput(f"{top} already exists over {under}, not over {origin_path} ({origin.devno})",
                           hint=f"use another NAME, or `dmmig unwrap {name}` first")
        own = dm_name_of(origin)
        if own is not None and own.startswith("dmmig-"):
            raise BadInput(f"{origin_path} is a dmmig device itself; wrap the real disk")
        holders = holder_names(origin)
        if holders:
            raise BadInput(f"{origin_path} is already held by {', '.join(holders)}",
                           hint="a disk under another dm device cannot be wrapped")
        require_tools("dmsetup")
        size = origin.size_bytes()
        if size == 0 or size % 512:
            raise BadInput(f"{origin_path} has size {size}: not usable")
        with self.journal.lock(name):
            entry = Entry(name, origin_path, origin.devno)
            self.journal.save(entry, WRAPPED)
            try:
                self.dm.create(top, Table(Linear(size // 512, origin.devno)), uuid=uuid_for("top", name))
            except BaseException:
                self.journal.delete(name)
                raise
        return f"/dev/mapper/{top}"

    def unwrap(self, name: str, *, force: bool = False) -> None:
        disk_name(name)
        top = top_name(name)
        info = self.dm.info(top)
        entry = self.journal.load(name)
        if info is None and entry is None:
            raise BadInput(f"unknown disk {name!r}: no {top} and no journal entry")
        if entry is not None and entry.phase != WRAPPED and not force:
            raise StateError(f"a migration of {name} is in progress (phase {entry.phase})",
                             hint=f"`dmmig abort {name}` first, or --force to abort and unwrap")
        if info is not None and info.open_count > 0 and not force:
            raise Busy(f"{top} is open ({info.open_count} opener(s)); unwrapping would pull the disk "
                       "from under them", hint="stop the domain first, or --force")
        with self.journal.lock(name):
            if entry is not None and entry.phase != WRAPPED or self.dm.info(era_name(name)):
                self.abort_held(name)
            if info is not None:
                self.dm.remove(top)
            self.journal.delete(name)

    # ---- prepare ------------------------------------------------------------------------
    def prepare(self, name: str, *, block_bytes: int | None = None,
                metadata: str | None = None) -> Table:
        """BLOCK_BYTES None: the era block is chosen from the disk size (sizing.choose_block,
        a pure function: the CLI describes the choice with it)."""
        disk_name(name)
        if block_bytes is not None:
            era_block_size(block_bytes)
        entry = self.entry_of(name)
        top = top_name(name)
        info = self.dm.info(top)
        if info is None:
            raise StateError(f"{top} does not exist", hint=f"`dmmig wrap {name} ORIGIN` first")
        if entry.phase != WRAPPED or self.dm.info(era_name(name)) is not None:
            raise StateError(f"{name} is already prepared (phase {entry.phase})",
                             hint=f"`dmmig status {name}`; `dmmig abort {name}` to start over")
        cur = self.dm.table(top).target
        if not (isinstance(cur, Linear) and cur.device == entry.origin_devno and cur.offset == 0):
            raise StateError(f"{top} is not linear over the origin {entry.origin_devno}: {self.dm.table_text(top)}")
        require_tools("dmsetup", "era_invalidate", "losetup")
        self.dm.require_targets("era")
        length = cur.length
        bs = era_block_size(sizing.choose_block(length * 512, block_bytes).block_bytes)
        block_fits(bs, length, name)  # else the mirror refuses the region at cutover, after the copy
        meta_dev: BlockDev | None = None
        if metadata is not None:
            meta_dev = block_device(metadata)
            need = min_metadata_bytes(length * 512, bs)
            if meta_dev.size_bytes() < need:
                raise BadInput(f"metadata device {metadata} is too small: {meta_dev.size_bytes()} bytes, "
                               f"need at least {need} for {length * 512} bytes at {bs * 512}-byte blocks")
            self.check_metadata_device(name, entry, info, meta_dev)

        with self.journal.lock(name):
            entry.block_sectors = bs
            entry.checkpoints = []
            # a new migration: the era numbers, copy progress and destination of an earlier one
            # (left by `finish`) mean nothing for the new era device; the id tells the
            # destination's agent a resumed copy from a new migration
            entry.copy = CopyState(migration=uuid.uuid4().hex)
            entry.dest = None
            undo = Undo()
            self.journal.save(entry, PREPARING)
            try:
                if meta_dev is None:
                    mfile = Files(self.journal.dir, name).era_metadata
                    entry.metadata_file = mfile
                    self.journal.save(entry)
                    _make_zeroed_file(mfile, metadata_bytes(length * 512, bs))
                    undo.push(f"remove {mfile}", lambda: os.unlink(mfile))
                    loopdev = self.loop.attach(mfile)
                    undo.push(f"detach {loopdev}", lambda: self.loop.detach(loopdev))
                    entry.metadata = loopdev
                else:
                    entry.metadata = meta_dev.path
                    _zero_superblock(meta_dev.path)  # era formats a zeroed superblock
                self.journal.save(entry)
                meta = block_device(entry.metadata)
                origin = entry.origin_devno
                self.dm.create(era_name(name), Table(Era(length, meta.devno, origin, bs)),
                               uuid=uuid_for("era", name))
                undo.push(f"remove {era_name(name)}", lambda: self.dm.remove(era_name(name)))
                era_dev = block_device(f"/dev/mapper/{era_name(name)}")
                new = Table(Linear(length, era_dev.devno))
                self.dm.swap(top, new)
            except BaseException:
                undo.run(f"undo of a failed prepare of {name}")
                entry.metadata = entry.metadata_file = None
                entry.block_sectors = None
                self.journal.save(entry, WRAPPED)
                raise
            self.journal.save(entry, PREPARED)
        return new

    def check_metadata_device(self, name: str, entry: Entry, top: DmInfo, dev: BlockDev) -> None:
        """prepare zeroes the first 4 KiB of the metadata device: never of one of the disk's own
        devices or another dmmig device, one in use, or one that holds anything blkid knows (a
        file system, an LVM PV, a partition table, swap, RAID, LUKS...)."""
        path = dev.path
        if dev.devno == f"{top.major}:{top.minor}":
            raise BadInput(f"metadata device {path} is {name}'s own top device {top_name(name)}")
        if dev.devno == entry.origin_devno:
            raise BadInput(f"metadata device {path} is {name}'s origin {entry.origin}")
        dm = dm_name_of(dev)
        if dm is not None and dm.startswith("dmmig-"):
            raise BadInput(f"metadata device {path} is dmmig's device {dm}")
        o_ma, o_mi = (int(x) for x in entry.origin_devno.split(":"))
        if os.makedev(o_ma, o_mi) in below(os.makedev(dev.major, dev.minor)):
            raise BadInput(f"metadata device {path} sits on {name}'s origin {entry.origin}")
        holders = holder_names(dev)
        if holders:
            raise BadInput(f"metadata device {path} is in use by {', '.join(holders)}")
        try:  # fails while mounted, used as swap, by LVM, md or dm, or another exclusive opener
            os.close(os.open(path, os.O_RDWR | os.O_EXCL))
        except OSError as e:
            raise BadInput(f"metadata device {path} is in use (mounted, swap, or opened exclusively): "
                           f"{e.strerror}") from e
        res = self.runner.run(["blkid", "-p", "-o", "export", path], check=False, timeout=60)
        if res.returncode == 0:
            tags = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
            what = tags.get("TYPE") or (f"a {tags['PTTYPE']} partition table" if "PTTYPE" in tags else "data")
            raise BadInput(f"metadata device {path} holds {what} (blkid -p: {' '.join(res.stdout.split())}); "
                           "refusing to overwrite it", hint=f"if its content is not needed: wipefs -a {path}")
        if res.returncode != 2:  # 2: nothing found; 8: several signatures at once
            raise BadInput(f"cannot tell what metadata device {path} holds: blkid -p exited with "
                           f"{res.returncode}: {(res.stderr or res.stdout).strip()}",
                           hint=f"if its content is not needed: wipefs -a {path}")

    # ---- era queries ----------------------------------------------------------------------
    def checkpoint(self, name: str) -> int:
        entry = self.prepared(name)
        with self.journal.lock(name):
            era = self.era.checkpoint(era_name(name))
            entry.checkpoints.append(era)
            self.journal.save(entry)
        return era

    def drained_checkpoint(self, name: str) -> int:
        """A new era, started with the top device suspended (see drained_dirty); every write
        tagged with an era below the one returned has completed on the origin."""
        self.prepared(name)
        with self._drained(name):
            self.dm.message(era_name(name), "checkpoint")
        return self.dm.era_status(era_name(name)).current_era

    def drained_dirty(self, name: str, since: int) -> tuple[list[BlockRange], int]:
        """The blocks written in eras >= SINCE, and the era N that is current now, such that
        every write tagged with an era below N has completed on the origin: a read of the
        origin from now on sees it, and a later query from N on covers every other write.

        Era tags a write when it reaches the era target, before the origin has it, and a
        checkpoint does not wait for writes in flight; a write held in flight (slow storage)
        across two rounds was missed by every query after them. So the snapshot is taken
        with the top device suspended: the suspend waits for every write in flight through
        it and holds new ones, which arrive after the snapshot's rollover and carry era N or
        later. The era device itself stays live (it answers messages through its worker)."""
        d, now = self.drained_dirty_ranges(name, since)
        try:
            return list(d), now
        finally:
            d.close()

    def drained_dirty_ranges(self, name: str, since: int) -> tuple[DirtyRanges, int]:
        """As drained_dirty, the ranges in a file in the state dir, streamed: a scattered delta
        of millions of blocks stays out of memory. The caller closes it (removes the file)."""
        entry = self.prepared(name)
        era = era_name(name)
        assert entry.metadata
        if self.dm.era_status(era).snapshot_block is not None:
            self.dm.message(era, "drop_metadata_snap")  # left by a killed dmmig
        with self._drained(name):
            self.dm.message(era, "take_metadata_snap")
        try:
            now = self.dm.era_status(era).current_era
            return self.era.written_since_file(entry.metadata, since, Files(self.journal.dir, name).dirty), now
        finally:
            self.dm.message(era, "drop_metadata_snap")

    @contextmanager
    def _drained(self, name: str) -> Iterator[None]:
        """The top device suspended (every write through it completed, new ones held) for the
        body, and resumed whatever happens: the guest must find its disk."""
        top = top_name(name)
        self.dm.suspend(top)
        try:
            yield
        finally:
            self.dm.resume(top)

    def dirty(self, name: str, since: int = 1) -> tuple[list[BlockRange], int, int]:
        """(dirty block ranges, block size in bytes, era current when read)."""
        entry = self.prepared(name)
        if since < 0:
            raise BadInput(f"--since must be >= 0, got {since}")
        assert entry.metadata and entry.block_sectors
        with self.journal.lock(name):
            ranges, now = self.era.dirty(era_name(name), entry.metadata, since)
        return ranges, entry.block_sectors * 512, now

    # ---- abort ----------------------------------------------------------------------------
    def abort(self, name: str) -> list[str]:
        """Return the top device to linear over the origin; remove everything else.
        Works from any state, also after dmmig was killed half-way."""
        disk_name(name)
        entry = self.journal.load(name)
        if entry is None and self.dm.info(top_name(name)) is None and self.dm.info(era_name(name)) is None:
            raise BadInput(f"unknown disk {name!r}: nothing of dmmig exists for it")
        with self.journal.lock(name):
            return self.abort_held(name)

    def abort_held(self, name: str, phase: str = ABORTING) -> list[str]:
        """abort's teardown with NAME's lock already held by the caller; also finish's local
        teardown (PHASE finishing): the steps are the same."""
        entry = self.journal.load(name)
        top = top_name(name)
        if entry is not None:
            self.journal.save(entry, phase)
        step = Steps()
        info = self.dm.info(top)
        if info is not None:
            origin_devno = self._origin_devno(name, entry, self.dm.table(top).target)
            if origin_devno is None:
                step.errors.append(StateError(f"cannot tell the origin of {top}: no journal and its table "
                                              f"is {self.dm.table_text(top)!r}"))
            else:
                cur = self.dm.table(top).target
                back = Table(Linear(cur.length, origin_devno))
                if not (isinstance(cur, Linear) and cur.device == origin_devno) or info.has_inactive:
                    # noflush: writes a mirror holds stay queued and go to the origin
                    step(f"swap {top} back to linear over {origin_devno}",
                         lambda: self.dm.swap(top, back, noflush=True))
                elif info.suspended:
                    step(f"resume {top}", lambda: self.dm.resume(top))
        # the mirror's pieces (watcher, nbd leg, tunnel, log) once nothing uses them
        self.mirror.teardown(name, entry, step)
        self.mirror.remove_credentials(name, step)
        era = era_name(name)
        if self.dm.info(era) is not None:
            step(f"remove {era}", lambda: self.dm.remove(era))
        glog = guard_log(self.journal.dir, top)  # a dmmig killed while suspended: history now
        if os.path.exists(glog):
            step(f"remove {glog}", lambda: os.unlink(glog))
        dirty = Files(self.journal.dir, name).dirty
        if os.path.exists(dirty):
            step(f"remove {dirty}", lambda: os.unlink(dirty))
        mfile = (entry.metadata_file if entry else None) or Files(self.journal.dir, name).era_metadata
        for dev in self.loop.find(mfile) if os.path.exists(mfile) else []:
            step(f"detach {dev}", partial(self.loop.detach, dev))
        if os.path.exists(mfile):
            step(f"remove {mfile}", lambda: os.unlink(mfile))
        for tmp in self.journal.stale_tmp(name):
            step(f"remove {tmp} (a journal write a killed dmmig left)", partial(os.unlink, tmp))
        if entry is not None:
            if step.errors:
                self.journal.save(entry)  # stays "aborting": status shows it, abort can retry
            else:
                entry.metadata = entry.metadata_file = None
                entry.block_sectors = None
                entry.checkpoints = []
                entry.mirror = MirrorState()
                if self.dm.info(top) is not None:
                    self.journal.save(entry, WRAPPED)
                else:
                    self.journal.delete(name)
        step.check(f"{'finish' if phase == FINISHING else 'abort'} of {name}")
        return step.done

    # ---- helpers --------------------------------------------------------------------------
    def entry_of(self, name: str) -> Entry:
        """NAME's journal entry; BadInput if dmmig does not know NAME."""
        e = self.journal.load(name)
        if e is None:
            raise BadInput(f"unknown disk {name!r}: not wrapped by dmmig",
                           hint=f"`dmmig wrap {name} ORIGIN` first")
        return e

    def prepared(self, name: str) -> Entry:
        """NAME's entry, if NAME has its era device (prepared or later); else StateError."""
        disk_name(name)
        e = self.entry_of(name)
        if e.phase in (WRAPPED, PREPARING) or self.dm.info(era_name(name)) is None:
            raise StateError(f"{name} is not prepared (phase {e.phase})", hint=f"`dmmig prepare {name}` first")
        return e

    def _origin_devno(self, name: str, entry: Entry | None, target: Any) -> str | None:
        if entry is not None:
            return entry.origin_devno
        if isinstance(target, Linear):
            return target.device
        return None


def _make_zeroed_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # sparse: reads as zeroes, so the era superblock is zero
        os.fsync(fd)
    finally:
        os.close(fd)


def _zero_superblock(dev: str) -> None:
    # O_EXCL: if anything claimed the device since prepare's checks, this fails instead
    fd = os.open(dev, os.O_WRONLY | os.O_SYNC | os.O_EXCL)
    try:
        os.pwrite(fd, bytes(4096), 0)
    finally:
        os.close(fd)
