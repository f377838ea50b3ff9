"""The local device stack of one disk: wrap or adopt, prepare (insert era live), dirty, abort,
unwrap.

    /dev/mapper/dmmig-NAME      top: blkback opens it; only its table is ever swapped
    /dev/mapper/dmmig-NAME-era  dm-era over the origin, metadata on a device of ours
    origin                      LV, partition, loop device

An adopted LV (a running domain's `phy:` disk: blkback holds the LV's own dm device) gets the
same stack under it, with one more layer of dmmig's at each end:

    /dev/mapper/vg0-vm1         the LV's own device, still held by blkback: its table becomes
        |                       `linear dmmig-NAME 0` (one live swap); LVM's table goes below
    dmmig-NAME (top) ... era ... as above
        |
    /dev/mapper/dmmig-NAME-lv   the origin: the LV's table as LVM made it, verbatim

Every layer maps the same physical extents, so at the end (finish, abort, a failure) the LV
gets its own table back with every write in it, and dmmig's devices go.

Every change is journaled before it is made, so a killed dmmig leaves a state that
`status` explains and `abort` undoes; abort reads the kernel, not just the journal.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dmmig import sizing
from dmmig.adapters import writefence
from dmmig.adapters.blockdev import (
    BlockDev,
    DiscardLimits,
    Loop,
    QueueLimits,
    below,
    block_device,
    dm_name_of,
    holder_names,
)
from dmmig.adapters.dm.dmsetup import DmInfo, DmSetup
from dmmig.adapters.dm.guard import log_path as guard_log
from dmmig.adapters.dm.targets import Era, Linear, ParseError, Segments, Table
from dmmig.adapters.era import BlockRange, DirtyRanges, EraTools
from dmmig.adapters.runner import Runner
from dmmig.core.journal import ABORTING, ADOPTING, FINISHING, PREPARED, PREPARING, WRAPPED, Entry, Journal
from dmmig.core.mirror import MirrorSide
from dmmig.core.records import Adopted, CopyState, MirrorState
from dmmig.errors import BadInput, Busy, CommandError, StateError, Steps, Undo
from dmmig.names import Files, era_name, lv_name, top_name
from dmmig.validate import block_fits, disk_name, era_block_size, require_tools

UUID_PREFIX = "DMMIG"
DEFAULT_BLOCK_BYTES = sizing.DEFAULT_BLOCK_BYTES

log = logging.getLogger("dmmig.stack")


# the targets an adopted LV's table may have: they map sectors and keep no state, so a second
# device with the same table (dmmig-NAME-lv) is the same disk. snapshot(-origin), thin, raid,
# mirror, cache, integrity, writecache... keep state (an exception store, pool or RAID
# metadata, a dirty log, a cache) that two devices over it would both update
ADOPTABLE_TARGETS = ("linear", "striped")
LVM_UUID_LEN = len("LVM-") + 64  # a visible LV's; LVM's own layers add a suffix (-real, -cow, -tpool, ...)

HOLD_LVM = ("hold LVM changes to {lv} and its volume group while dmmig migrates it: no lvchange/vgchange "
            "--refresh, lvextend/lvresize, pvmove. Each reloads {lv}'s table from LVM's metadata, straight onto "
            "the PVs: writes would bypass era and the mirror. dmmig checks the table before each step, in each "
            "copy round and at the handover, and then stops (the destination never starts on that disk), but it "
            "cannot prevent the reload")


@dataclass(frozen=True)
class AdoptPlan:
    """What `dmmig adopt NAME PATH` will do; checked, nothing changed (Stack.adopt_plan)."""
    name: str
    path: str
    lv: str          # the LV's dm name
    devno: str
    uuid: str
    table: Segments  # its table now

    def render(self) -> list[str]:
        n, top, inner = self.table.length, top_name(self.name), lv_name(self.name)
        return [f"adopt {self.path} ({self.lv}, {self.devno}, {n * 512} bytes) as dmmig disk {self.name}:",
                f"  create {inner} with {self.lv}'s table, verbatim:", *(f"    {ln}" for ln in self.table.lines),
                f"  create {top}: 0 {n} linear <{inner}> 0",
                f"  swap {self.lv} (live, its openers keep it open): 0 {n} linear <{top}> 0",
                f"  at the end (finish, abort, a failure): {self.lv} gets its own table back, {top} and {inner} go",
                "  " + HOLD_LVM.format(lv=self.lv)]


def adoptable(name: str, path: str, devno: str, info: DmInfo | None, table_text: str) -> AdoptPlan:
    """The plan to adopt PATH (device DEVNO; INFO: its dm device, None if it is none; TABLE_TEXT:
    its table), or BadInput saying why it cannot be adopted. Only an LV's own table can be
    swapped under its openers: a partition or a loop device has no table, another dm user's
    table (multipath, dm-crypt, kpartx) is that user's."""
    if info is None:
        raise BadInput(f"{path} ({devno}) is not a device-mapper device: a partition or a loop device cannot "
                       "be adopted (dmmig can swap only a table, and only an LV's is its to swap)",
                       hint="start the domain with script=block-dmmig (a restart), then `dmmig migrate`")
    if info.name.startswith("dmmig-") or info.uuid.startswith(UUID_PREFIX + "-"):
        raise BadInput(f"{path} is dmmig's own device {info.name}")
    if not info.uuid.startswith("LVM-"):
        raise BadInput(f"{path} is the device-mapper device {info.name} (uuid {info.uuid or 'none'}), not an LVM "
                       "logical volume: dmmig adopts only LVs (another user of device-mapper, e.g. multipath, "
                       "dm-crypt or kpartx, owns that table)")
    if len(info.uuid) != LVM_UUID_LEN:
        raise BadInput(f"{path} ({info.name}) is one of LVM's internal layers (uuid {info.uuid}), not a logical "
                       "volume of its own")
    if info.suspended or info.has_inactive:
        raise BadInput(f"{info.name} is {'suspended' if info.suspended else 'holding an inactive table'}: LVM (or "
                       "someone) is changing it now", hint="try again when that change is done")
    if info.read_only:
        raise BadInput(f"{info.name} is read-only: dmmig adopts writable LVs only")
    try:
        table = Segments.parse(table_text)
    except ParseError as e:
        raise BadInput(f"cannot read the table of {info.name}: {e}") from e
    other = sorted(set(table.kinds) - set(ADOPTABLE_TARGETS))
    if other:
        raise BadInput(f"{info.name}'s table has {', '.join(other)} segments: that target keeps state of its own "
                       "(a snapshot, thin, RAID, mirror or cache LV), which a second device with the same table "
                       f"would corrupt; only {' and '.join(ADOPTABLE_TARGETS)} LVs can be adopted",
                       hint="start the domain with script=block-dmmig (a restart), then `dmmig migrate`")
    return AdoptPlan(disk_name(name), path, info.name, devno, info.uuid, table)


def _lines(text: str) -> tuple[str, ...]:
    """A table's lines as the kernel prints them, spacing normalised: for comparing tables."""
    return tuple(" ".join(ln.split()) for ln in text.strip().splitlines() if ln.strip())


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
    queue: QueueLimits = field(default_factory=QueueLimits)  # discard limits in sysfs
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
        if entry is not None and entry.adopted is not None:
            with self.journal.lock(name):  # its opener is the LV: its own table goes back under it
                self.abort_held(name)
            return
        if info is not None and info.open_count > 0 and not force:
            raise Busy(f"{top} is open ({info.open_count} opener(s)); unwrapping would pull the disk "
                       "from under them", hint="stop the domain first, or --force")
        with self.journal.lock(name):
            if entry is not None and entry.phase != WRAPPED or self.dm.info(era_name(name)):
                self.abort_held(name)
            if info is not None:
                self.dm.remove(top)
            self.journal.delete(name)

    # ---- adopt -----------------------------------------------------------------------------
    def adopt_plan(self, name: str, path: str) -> AdoptPlan:
        """What adopting PATH as NAME would do, every refusal checked; changes nothing."""
        disk_name(name)
        entry = self.journal.load(name)
        if entry is not None:
            raise BadInput(f"{name} is already a dmmig disk (phase {entry.phase}, origin {entry.origin})",
                           hint=f"`dmmig status {name}`; use another NAME, or `dmmig abort {name}` first")
        dev = block_device(path)
        require_tools("dmsetup")
        info = self.dm.info_of(dev.devno)
        plan = adoptable(name, path, dev.devno, info, self.dm.table_text_of(dev.devno) if info else "")
        if plan.table.length * 512 != dev.size_bytes():
            raise BadInput(f"{path}: its table maps {plan.table.length * 512} bytes, the device has "
                           f"{dev.size_bytes()} (LVM is resizing it?)")
        for dev_name in (top_name(name), lv_name(name)):
            if self.dm.info(dev_name) is not None:
                raise BadInput(f"{dev_name} already exists", hint=f"use another NAME; `dmmig status {name}`")
        return plan

    def adopt(self, name: str, path: str) -> tuple[str, float]:
        """Put dmmig's top device under the LV PATH, live (see the module's doc): its table moves
        to dmmig-NAME-lv (the origin), dmmig-NAME goes over that, and the LV's own device (the
        one its openers hold) is swapped to linear over dmmig-NAME. From then on every later
        step (prepare, copy, cutover, handover, finish, abort) works on dmmig-NAME as for a
        wrapped disk. Each step is journaled (phase adopting) before it is made; a failure, or
        `abort` after a crash, puts the LV's own table back. Returns the top device's path and
        the seconds the LV's swap took (its I/O pause, at most)."""
        disk_name(name)
        entry = self.journal.load(name)
        a = entry.adopted if entry is not None else None
        if (entry is not None and a is not None and entry.phase != ADOPTING and a.devno == block_device(path).devno
                and self.lv_problem(entry) is None):
            return f"/dev/mapper/{top_name(name)}", 0.0  # adopted already
        plan = self.adopt_plan(name, path)  # refuses a NAME dmmig knows
        with self.journal.lock(name):
            return self._adopt(plan)

    def _adopt(self, plan: AdoptPlan) -> tuple[str, float]:
        name = plan.name
        top, inner = top_name(name), lv_name(name)
        length = plan.table.length
        a = Adopted(lv=plan.lv, path=plan.path, devno=plan.devno, uuid=plan.uuid, table=plan.table.render())
        entry = Entry(name, f"/dev/mapper/{inner}", "", adopted=a)
        self.journal.save(entry, ADOPTING)
        try:
            self.dm.create(inner, plan.table, uuid=uuid_for("lv", name))
            entry.origin_devno = block_device(f"/dev/mapper/{inner}").devno
            self.journal.save(entry)
            self.dm.create(top, Table(Linear(length, entry.origin_devno)), uuid=uuid_for("top", name))
            a.top_devno = block_device(f"/dev/mapper/{top}").devno
            self.journal.save(entry)
            # the table copied must still be the LV's: LVM may have reloaded it since it was read
            now = self.dm.table_text_of(a.devno)
            if _lines(now) != plan.table.lines:
                raise StateError(f"the table of {a.lv} changed while dmmig adopted it (LVM reloaded it?): "
                                 f"{now!r}", hint=HOLD_LVM.format(lv=a.lv))
            pause = self.dm.swap(a.lv, Table(Linear(length, a.top_devno)))
        except BaseException:
            steps = Steps()
            self.release(entry, steps)
            if steps.errors:
                self.journal.save(entry)  # still "adopting": status explains, abort retries
                steps.check(f"undo of a failed adopt of {name} (the adopt failed first)")
            self.journal.delete(name)
            raise
        self.journal.save(entry, WRAPPED)
        return f"/dev/mapper/{top}", pause

    def release(self, entry: Entry, step: Steps) -> None:
        """An adopted disk's end: the LV gets its own table back (if it still has dmmig's), then
        dmmig-NAME and dmmig-NAME-lv go (nothing uses them then). The top must be linear over
        the origin (abort_held's first steps). A table LVM loaded since (a refresh) is left as
        it is: it maps the same extents, every write is on them; only dmmig's devices go."""
        a = entry.adopted
        assert a is not None
        top, inner = top_name(entry.name), lv_name(entry.name)
        info = self.dm.info_of(a.devno)
        if info is None or info.uuid != a.uuid:
            step.done.append(f"{a.lv} ({a.devno}) is gone: no table to put back")
        else:
            lv = info.name
            ours = _lines(Table(Linear(Segments.parse(a.table).length, a.top_devno)).render()) if a.top_devno else ()
            own = _lines(a.table)
            if info.has_inactive and _lines(self.dm.table_text_of(a.devno, inactive=True)) in (ours, own):
                step(f"drop the inactive table of {lv} (a swap of dmmig's that did not finish)",
                     partial(self.dm.clear_inactive, lv))
            live = _lines(self.dm.table_text_of(a.devno))
            if ours and live == ours:
                step(f"swap {lv} back to its own table", partial(self.dm.swap, lv, Segments(own)))
            elif live == own:
                step.done.append(f"{lv} has its own table")
            else:
                step.done.append(f"left the table of {lv} as it is, neither dmmig's nor the one it had (LVM "
                                 f"reloaded it): {' / '.join(live)}")
        for dev in (top, inner):
            if self.dm.info(dev) is not None:
                step(f"remove {dev}", partial(self.dm.remove, dev))

    def lv_problem(self, entry: Entry) -> str | None:
        """None while ENTRY is not adopted, or its LV's table is still dmmig's (linear over the
        top); else what is wrong: then writes to the LV bypass era and the mirror."""
        a = entry.adopted
        if a is None or a.top_devno is None:
            return None
        info = self.dm.info_of(a.devno)
        if info is None or info.uuid != a.uuid:
            return f"the adopted LV {a.lv} ({a.devno}) is gone"
        live = self.dm.table_text_of(a.devno)
        if _lines(live) == _lines(Table(Linear(Segments.parse(a.table).length, a.top_devno)).render()):
            return None
        return (f"the table of {info.name} is no longer dmmig's (linear over {top_name(entry.name)}, {a.top_devno}) "
                f"but {' / '.join(_lines(live))}: LVM reloaded it (lvchange/vgchange --refresh, lvextend...), so "
                "writes to it go straight to its PVs, past era and the mirror")

    def check_lv(self, entry: Entry) -> None:
        """StateError if ENTRY's adopted LV no longer has dmmig's table (lv_problem): no step
        may go on, the destination would miss writes."""
        problem = self.lv_problem(entry)
        if problem is not None:
            assert entry.adopted is not None
            raise StateError(f"{entry.name}: {problem}",
                             hint=f"`dmmig abort {entry.name}` (it removes dmmig's devices and leaves the LV's table "
                                  f"as LVM loaded it), then adopt again; {HOLD_LVM.format(lv=entry.adopted.lv)}")

    # ---- prepare ------------------------------------------------------------------------
    def prepare(self, name: str, *, block_bytes: int | None = None,
                metadata: str | None = None, confine: bool = True) -> Table:
        """BLOCK_BYTES None: the era block is chosen from the disk size (sizing.choose_block,
        a pure function: the CLI describes the choice with it). CONFINE False: leave the era
        device's discard limit as the origin's (warm tracking on B, where any discard makes the
        copy back cold anyway, and the guest may run for days: see confine_discards)."""
        disk_name(name)
        if block_bytes is not None:
            era_block_size(block_bytes)
        entry = self.entry_of(name)
        top = top_name(name)
        info = self.dm.info(top)
        if info is None:
            raise StateError(f"{top} does not exist", hint=f"`dmmig wrap {name} ORIGIN` first")
        self.check_lv(entry)
        if entry.phase != WRAPPED or self.dm.info(era_name(name)) is not None:
            raise StateError(f"{name} is already prepared (phase {entry.phase})",
                             hint=f"`dmmig status {name}`; `dmmig abort {name}` to start over")
        cur = self.dm.table(top).target
        if not (isinstance(cur, Linear) and cur.device == entry.origin_devno and cur.offset == 0):
            raise StateError(f"{top} is not linear over the origin {entry.origin_devno}: {self.dm.table_text(top)}")
        require_tools("dmsetup", "era_invalidate", "losetup")
        self.dm.require_targets("era")
        length = cur.length
        bs = era_block_size(sizing.choose_block(length * 512, block_bytes, self.discard_unit(name)).block_bytes)
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
                # before the top is loaded over era: the top stacks era's limit then, and era
                # itself is never reloaded (docs/design.md "Discards")
                if confine:
                    self.confine_discards(name, era_dev.devno, bs * 512)
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

    def discard_unit(self, name: str) -> int:
        """NAME's origin's discard_granularity (bytes), 0 if it takes no discard or its limits
        cannot be read: the smallest era block prepare chooses (sizing.choose_block)."""
        return self.discard_unit_of(self.entry_of(name).origin_devno)

    def discard_unit_of(self, devno: str) -> int:
        """As discard_unit, for the device DEVNO (an LV not adopted yet)."""
        try:
            lim = self.queue.discard(devno)
        except (OSError, ValueError):
            return 0
        return lim.granularity if lim.max_bytes else 0

    def confine_discards(self, name: str, devno: str, block_bytes: int) -> DiscardLimits:
        """Lower the era device DEVNO's discard_max_bytes to its discard_granularity (0: no
        discard, where a granularity cannot keep a piece inside one BLOCK_BYTES era block). dm
        hands a discard to era whole within a target (drivers/md/dm.c __send_changing_extent_only)
        and era_map marks only the block a bio starts in; but dm_split_and_process_bio first cuts
        a discard to the device's own queue limits (bio_split_to_limits), so with this limit each
        piece lies in one era block and era marks every block a discard touches."""
        lim = self.queue.discard(devno)
        want = lim.confined_max(block_bytes)
        if lim.max_bytes != want:
            lim = self.queue.set_discard_max(devno, want)
        if not lim.exact_for(block_bytes):
            raise StateError(f"{name}: cannot confine the era device's discards to one era block: {lim} after "
                             f"writing discard_max_bytes {want} ({block_bytes}-byte era blocks)",
                             hint=f"`dmmig status {name}`; report this with the origin's queue limits")
        log.info("%s: era device %s: discard_max_bytes %d (granularity %d, era block %d)", name, devno,
                 lim.max_bytes, lim.granularity, block_bytes)
        return lim

    def discards_exact(self, name: str, devno: str | None = None) -> bool:
        """Whether era still cuts discards into pieces of one era block (confine_discards); False
        if its limits cannot be read or were raised since (by hand: era is never reloaded).
        DEVNO: the era device's number, when the caller has it (a dmsetup process less)."""
        if devno is None:
            entry, devno = self.prepared_era(name)
        else:
            entry = self.entry_of(name)
        if not entry.block_sectors:
            return False
        try:
            return self.queue.discard(devno).exact_for(entry.block_sectors * 512)
        except (OSError, ValueError):
            return False

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

    def drained_checkpoint(self, name: str) -> tuple[int, str | None]:
        """A new era, started with the top device suspended (see drained_dirty); every write
        tagged with an era below the one returned has completed on the origin. With it, the era
        device's discard mark read in the same suspension (see discards)."""
        _, devno = self.prepared_era(name)  # before: a read of sysfs is all the suspension adds
        with self._drained(name):
            self.dm.message(era_name(name), "checkpoint")
            mark = writefence.discard_mark_of(devno)
        return self.dm.era_status(era_name(name)).current_era, mark

    def era_devno(self, name: str) -> str | None:
        return self.dm.devno(era_name(name))

    def discards(self, name: str, devno: str | None = None) -> str | None:
        """The era device's discard mark (writefence.discard_mark; None: unreadable). Era records
        a discard by the block it starts in only: dm splits a discard at target boundaries, not
        at era's block size (drivers/md/dm.c __process_abnormal_io: only a target that sets
        max_discard_granularity, which era does not), and era_map marks get_block(bio). Where
        the rest of it fell is not recorded anywhere; that one happened is, in the kernel's I/O
        counters. Read with the top suspended, the mark covers exactly the discards before it.
        DEVNO: the era device's number, when the caller has it (a dmsetup process less)."""
        devno = devno or self.era_devno(name)
        return writefence.discard_mark_of(devno) if devno else None

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
        d, now, _ = self.drained_dirty_ranges(name, since)
        try:
            return list(d), now
        finally:
            d.close()

    def drained_dirty_ranges(self, name: str, since: int) -> tuple[DirtyRanges, int, str | None]:
        """As drained_dirty, the ranges in a file in the state dir, streamed: a scattered delta
        of millions of blocks stays out of memory. The caller closes it (removes the file).
        With them, the era device's discard mark read in the same suspension (see discards)."""
        entry, devno = self.prepared_era(name)
        era = era_name(name)
        assert entry.metadata
        with self._drained(name):
            # one left by a killed dmmig is dropped and retaken in here: rare, and it spares
            # every round a status before the suspend
            self.era.take_snapshot(era)
            mark = writefence.discard_mark_of(devno)
        try:
            now = self.dm.era_status(era).current_era
            return (self.era.written_since_file(entry.metadata, since, Files(self.journal.dir, name).dirty,
                                                background=True), now, mark)
        finally:
            self.dm.message(era, "drop_metadata_snap")

    def drop_era_snapshot(self, name: str) -> None:
        """Drop the era metadata snapshot a query held (EraTools.dirty_ranges, hold). A failure
        fails nothing: the next query finds it held and drops it first (EraTools.take_snapshot)."""
        try:
            self.era.release(era_name(name))
        except CommandError as e:
            log.warning("%s: the era metadata snapshot stays held until the next query: %s", name, e)

    @contextmanager
    def _drained(self, name: str) -> Iterator[None]:
        """The top device suspended (every write through it completed, new ones held) for the
        body, and resumed whatever happens: the guest must find its disk. The resume does not
        wait for udev (the table, node and number are the ones from before the suspend)."""
        top = top_name(name)
        self.dm.suspend(top)
        try:
            yield
        finally:
            self.dm.resume(top, udev_sync=False)

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
            if not origin_devno:
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
        if entry is not None and entry.adopted is not None and not step.errors:
            self.release(entry, step)  # the LV's own table back; dmmig's devices go
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
        return self.prepared_era(name)[0]

    def prepared_era(self, name: str) -> tuple[Entry, str]:
        """As prepared, with the era device's number (major:minor) from the same query."""
        disk_name(name)
        e = self.entry_of(name)
        devno = None if e.phase in (ADOPTING, WRAPPED, PREPARING) else self.dm.devno(era_name(name))
        if devno is None:
            raise StateError(f"{name} is not prepared (phase {e.phase})", hint=f"`dmmig prepare {name}` first")
        self.check_lv(e)  # every step after prepare starts here (and each copy round's query)
        return e, devno

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
