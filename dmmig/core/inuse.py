"""Who else uses a disk on this host: Xen's backends, processes' open files, other disks' records.

The kernel's own signs (holders, an exclusive opener, a loop device) miss the two users a
Xen host has most: blkback opens its device without O_EXCL and registers no holder, and qemu
(a device model, or the qdisk backend) opens files and devices without O_EXCL. XenStore names
the first, /proc/PID/fd the second. Both are compared by what the storage is, not by path:
device numbers (with partitions, the whole disk, the devices a device sits on) and files'
inodes (with the loop devices over them), so another name for the same disk, a symlink, or a
file behind a loop device is found too.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from dmmig.adapters import blockdev
from dmmig.adapters.xenstore import XenStore

BACKEND_KINDS = ("vbd", "vbd3", "qdisk")   # blkback, tapdisk, qemu
_FORMAT_PREFIX = re.compile(r"^[a-z0-9]+:(?=/)")  # qdisk/vbd3 params: "raw:/path", "aio:/path", "vhd:/path"


@dataclass(frozen=True)
class Storage:
    """Device numbers and (st_dev, st_ino) of files that are, or overlap, one disk."""
    devnos: frozenset[int]
    files: frozenset[tuple[int, int]]

    def overlaps(self, other: Storage) -> bool:
        return bool(self.devnos & other.devnos or self.files & other.files)


NOTHING = Storage(frozenset(), frozenset())


def footprint(path: str, loops: list[blockdev.LoopInfo]) -> Storage:
    """Everything that is PATH's storage or overlaps it: the device, its partitions and whole
    disk, what it sits on (and their partitions and whole disks), the files under loop devices
    among those; for a file, the loop devices over it."""
    st = os.stat(path)
    devnos: set[int] = set()
    files: set[tuple[int, int]] = set()
    if stat.S_ISBLK(st.st_mode):
        devnos |= _around(st.st_rdev)
    elif stat.S_ISREG(st.st_mode):
        files.add((st.st_dev, st.st_ino))
    _add_loops(devnos, files, loops, around=True)
    return Storage(frozenset(devnos), frozenset(files))


def exact(path: str | None, devno: int | None, loops: list[blockdev.LoopInfo]) -> Storage:
    """What a user of PATH (or of device DEVNO) occupies: the device and what it sits on, the
    file under a loop device among them; a file itself."""
    devnos: set[int] = set()
    files: set[tuple[int, int]] = set()
    if devno is not None:
        devnos |= blockdev.below(devno)
    if path:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            devnos |= blockdev.below(st.st_rdev)
        elif st is not None and stat.S_ISREG(st.st_mode):
            files.add((st.st_dev, st.st_ino))
    _add_loops(devnos, files, loops, around=False)
    return Storage(frozenset(devnos), frozenset(files))


def _around(devno: int) -> set[int]:
    out: set[int] = set()
    for d in blockdev.below(devno):
        out.add(d)
        out |= blockdev.partitions(d)
        whole = blockdev.whole_disk(d)
        if whole is not None:
            out.add(whole)
    return out


def _add_loops(devnos: set[int], files: set[tuple[int, int]], loops: list[blockdev.LoopInfo], *, around: bool) -> None:
    """A loop device's backing file is its storage; for a footprint (AROUND) so are the other
    loop devices over that file."""
    for lo in loops:
        if lo.devno in devnos:
            files.add(lo.backing)
    if around:
        for lo in loops:
            if lo.backing in files:
                devnos.add(lo.devno)
                devnos |= blockdev.partitions(lo.devno)


def parse_devno(text: str) -> int | None:
    """XenStore's physical-device: hex major:minor without 0x (`stat -c %t:%T`)."""
    m = re.fullmatch(r"\s*([0-9a-fA-F]+):([0-9a-fA-F]+)\s*", text or "")
    return os.makedev(int(m.group(1), 16), int(m.group(2), 16)) if m else None


def xen_users(xs: XenStore, disk: Storage, loops: list[blockdev.LoopInfo]) -> list[str]:
    """The local domains whose disk backend (in dom0) uses DISK, named."""
    out = []
    for kind in BACKEND_KINDS:
        base = f"/local/domain/0/backend/{kind}"
        for domid in xs.list(base):
            for devid in xs.list(f"{base}/{domid}"):
                be = f"{base}/{domid}/{devid}"
                params = xs.read(f"{be}/params") or ""
                path = _FORMAT_PREFIX.sub("", params)
                used = exact(path if path.startswith("/") else None,
                             parse_devno(xs.read(f"{be}/physical-device") or ""), loops)
                if used.overlaps(disk):
                    name = xs.read(f"/local/domain/{domid}/name") or "?"
                    out.append(f"domain {name} (domid {domid}) through its {kind} backend {devid} "
                               f"(params {params or '-'})")
    return out


def process_users(disk: Storage, ignore: set[int]) -> list[str]:
    """Processes holding DISK open (qemu opens without O_EXCL): 'pid N (comm)'."""
    out = []
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me or int(p) in ignore:
            continue
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if (stat.S_ISBLK(st.st_mode) and st.st_rdev in disk.devnos) or \
                    (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in disk.files):
                out.append(f"pid {p} ({_comm(p)})")
                break
    return out


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
