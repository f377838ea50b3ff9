"""Per-disk journal and lock under the state directory.

The journal remembers intent and endpoints; what the kernel says (dmsetup) is the truth.
Written atomically (write temp, fsync, rename, fsync dir) at every phase change.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dmmig.core import records
from dmmig.core.records import Adopted, CopyState, Destination, MirrorState
from dmmig.errors import Busy, StateError
from dmmig.names import Files
from dmmig.validate import RESERVED_SUFFIXES

DEFAULT_STATE_DIR = "/var/lib/dmmig"
# the entry's own keys; its parts carry their own (records.py). 2: `adopted` (an entry without it
# reads as version 1 did; a dmmig of version 1 keeps it in `extra` and would not restore the LV)
JOURNAL_VERSION = 2

# Phases, in order. "preparing"/"aborting" etc. mark a change that may not have completed.
ADOPTING = "adopting"  # an LV's table moving under dmmig's top (core/stack.py adopt)
WRAPPED = "wrapped"
PREPARING = "preparing"
PREPARED = "prepared"
COPYING = "copying"
COPIED = "copied"
CUTTING_OVER = "cutting-over"
MIRRORING = "mirroring"
FINISHING = "finishing"
ABORTING = "aborting"


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("DMMIG_STATE_DIR") or DEFAULT_STATE_DIR


def private_dir(path: str) -> str:
    """PATH as a directory only root (this process's user) can enter: for the NBD export's socket
    and TLS keys, and the mirror's logs. Made 0700, or repaired to 0700; refused if it is not a
    real directory of ours, or if its parent lets anyone else rename it away."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    _check_parent(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = _check_own(path)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def check_private_dir(path: str) -> None:
    """private_dir's refusals, changing nothing (for a plan): on what exists of PATH and its
    parent now (what does not exist, private_dir makes as it wants it)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(parent):
        _check_parent(parent)
    if os.path.lexists(path):
        _check_own(path)


def _check_parent(parent: str) -> None:
    pst = os.stat(parent)
    # a sticky parent (/run and /tmp in the rigs: 1777) lets nobody else rename or remove ours
    if pst.st_uid != os.geteuid() or (pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX):
        raise StateError(f"{parent} is writable by others or not owned by uid {os.geteuid()}: "
                         "refusing to keep the disk's NBD socket and keys under it",
                         hint=f"chown root {parent} && chmod go-w {parent}, or choose another --state-dir")


def _check_own(path: str) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StateError(f"{path} is not a directory owned by uid {os.geteuid()}; refusing to use it",
                         hint=f"remove {path} (it may be an attack: another user made it)")
    return st


@dataclass
class Entry:
    name: str
    origin: str                     # path as given
    origin_devno: str               # major:minor at wrap time
    phase: str = WRAPPED
    block_sectors: int | None = None
    metadata: str | None = None      # metadata device path (given or our loop device)
    metadata_file: str | None = None  # our own metadata file (None when --metadata given)
    checkpoints: list[int] = field(default_factory=list)
    dest: Destination | None = None  # None until a copy chose one (and again after an abort)
    copy: CopyState = field(default_factory=CopyState)
    mirror: MirrorState = field(default_factory=MirrorState)
    history: list[list[Any]] = field(default_factory=list)  # [time, phase]
    adopted: Adopted | None = None   # the LV this disk was adopted from (None: wrapped)
    version: int = JOURNAL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer dmmig, written back as they are

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> Entry:
        """An entry as saved by any version (dmmig/core/records.py). Version 0 (before typed
        records): no `version`, `dest` {} for none."""
        v = records.version_of(data)
        known, extra = records.split(cls, {k: val for k, val in data.items() if k != "version"}, what, v,
                                     JOURNAL_VERSION)
        known["dest"] = records.destination_of(known.get("dest"), f"{what} (dest)")
        known["copy"] = CopyState.from_json(known.get("copy"), f"{what} (copy)")
        known["mirror"] = MirrorState.from_json(known.get("mirror"), f"{what} (mirror)")
        known["adopted"] = Adopted.from_json(known.get("adopted"), f"{what} (adopted)")
        return cls(**known, extra=extra)

    @property
    def target(self) -> str:
        """The path the operator knows the disk by (the destination's default path): the adopted
        LV's, else the origin's."""
        return self.adopted.path if self.adopted else self.origin

    def destination(self) -> Destination:
        """The destination, in a phase that has one (a copy chose it)."""
        if self.dest is None:
            raise StateError(f"no destination known for {self.name} (phase {self.phase})",
                             hint=f"`dmmig copy {self.name} HOST` first, or `dmmig abort {self.name}`")
        return self.dest

    @property
    def handed_over(self) -> bool:
        """The destination's block script got this source's yes: the disk there is the guest's."""
        h = self.mirror.handover
        return bool(self.phase == MIRRORING and h and h.ok and h.delivered)



class Journal:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        # save() from several threads (the cutover attaches its leg beside the log preparation):
        # one at a time, else two would write the same NAME.json.tmp.PID and one entry's JSON
        # could be taken while the other thread changes it
        self._saving = threading.Lock()

    def path(self, name: str) -> str:
        return Files(self.dir, name).journal

    def ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def load(self, name: str) -> Entry | None:
        try:
            with open(self.path(name)) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return Entry.from_json(data, self.path(name))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:  # TypeError: a key it must have is missing
            raise StateError(f"journal {self.path(name)} is unreadable: {e}",
                             hint="inspect or move the file away; the kernel state is the truth") from e

    def names(self) -> list[str]:
        """The disks with a journal entry (not the agent's NAME.dest.json or the watcher's
        NAME.health.json next to them)."""
        try:
            return sorted(f[:-5] for f in os.listdir(self.dir)
                          if f.endswith(".json") and not f[:-5].endswith(RESERVED_SUFFIXES))
        except FileNotFoundError:
            return []

    def save(self, entry: Entry, phase: str | None = None) -> None:
        with self._saving:
            self._save(entry, phase)

    def _save(self, entry: Entry, phase: str | None) -> None:
        if phase is not None and phase != entry.phase:
            entry.phase = phase
            entry.history.append([round(time.time(), 3), phase])
        self.ensure_dir()
        p = self.path(entry.name)
        tmp = f"{p}.tmp.{os.getpid()}"
        entry.version = JOURNAL_VERSION
        with open(tmp, "w") as f:
            json.dump(records.to_json(entry), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def stale_tmp(self, name: str) -> list[str]:
        """NAME's journal writes that a killed dmmig left half done (NAME.json.tmp.PID, PID
        gone): the journal itself is whole (written by rename), these are only litter."""
        prefix = f"{name}.json.tmp."
        try:
            files = [f for f in os.listdir(self.dir) if f.startswith(prefix)]
        except FileNotFoundError:
            return []
        out = []
        for f in files:
            pid = f[len(prefix):]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                out.append(os.path.join(self.dir, f))
        return out

    def busy(self, name: str) -> bool:
        """A dmmig holds NAME's lock right now (a step is running, not interrupted)."""
        try:
            fd = os.open(Files(self.dir, name).lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # closing drops the probe's own lock, if it got one

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """One dmmig process per disk. flock dies with the process, so a killed dmmig
        never leaves a stale lock."""
        self.ensure_dir()
        fd = os.open(Files(self.dir, name).lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise Busy(f"another dmmig is working on {name!r}",
                               hint="wait for it, or find it with `fuser` on the lock file") from e
                raise
            yield
        finally:
            os.close(fd)
