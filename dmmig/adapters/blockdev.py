"""Block devices and loop devices: stat, size, holders, sysfs relations, losetup and the
loop driver's ioctls."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import time
from dataclasses import dataclass

from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput, LocalIOError


@dataclass(frozen=True)
class BlockDev:
    path: str
    major: int
    minor: int

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def sysfs(self) -> str:
        return f"/sys/dev/block/{self.devno}"

    def holders(self) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.sysfs, "holders")))
        except FileNotFoundError:
            return []

    def size_bytes(self) -> int:
        with open(os.path.join(self.sysfs, "size")) as f:
            return int(f.read()) * 512


@dataclass(frozen=True)
class DiscardLimits:
    """A block device's discard limits as its queue shows them (bytes; max_bytes 0: no discard)."""
    max_bytes: int
    granularity: int
    alignment: int

    def exact_for(self, block_bytes: int) -> bool:
        """Whether every discard piece the block layer cuts lies inside one BLOCK_BYTES block:
        bio_split_discard (block/blk-merge.c) cuts pieces of at most max_bytes that end on a
        granularity boundary (shifted by alignment), so with max_bytes <= granularity, alignment
        0 and a granularity that divides the block, no piece crosses a block boundary."""
        if self.max_bytes == 0:
            return True
        return (self.alignment == 0 and 0 < self.granularity and self.max_bytes <= self.granularity
                and block_bytes % self.granularity == 0)

    def confined_max(self, block_bytes: int) -> int:
        """The discard_max_bytes that makes the device's discards exact for BLOCK_BYTES blocks:
        its granularity, or 0 (no discard) where no granularity can (an alignment, a granularity
        that does not divide the block)."""
        if self.max_bytes == 0:
            return 0
        if self.alignment == 0 and 0 < self.granularity and block_bytes % self.granularity == 0:
            return self.granularity
        return 0


class QueueLimits:
    """A device's discard limits in sysfs (ROOT: another tree in the unit tests). A user's write
    to queue/discard_max_bytes lowers the limit the block layer splits discards at; a dm table
    loaded over the device stacks the value it has then (blk_stack_limits: min_not_zero)."""

    def __init__(self, root: str = "/sys") -> None:
        self.root = root

    def _dir(self, devno: str) -> str:
        return os.path.join(self.root, "dev", "block", devno)

    def discard(self, devno: str) -> DiscardLimits:
        d = self._dir(devno)

        def num(rel: str) -> int:
            with open(os.path.join(d, rel)) as f:
                return int(f.read().strip())
        return DiscardLimits(num("queue/discard_max_bytes"), num("queue/discard_granularity"),
                             num("discard_alignment"))

    def set_discard_max(self, devno: str, max_bytes: int) -> DiscardLimits:
        """Write MAX_BYTES to DEVNO's queue/discard_max_bytes and read the limits back: the
        caller checks them (the kernel clamps to discard_max_hw_bytes)."""
        try:
            with open(os.path.join(self._dir(devno), "queue", "discard_max_bytes"), "w") as f:
                f.write(f"{max_bytes}\n")
        except OSError as e:
            raise LocalIOError(f"cannot set discard_max_bytes of {devno} to {max_bytes}: {e.strerror}") from e
        return self.discard(devno)


def block_device(path: str) -> BlockDev:
    """Stat PATH and insist it is a block device (refusing before anything changes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file or device") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot stat: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise BadInput(f"{path}: not a block device",
                       hint="for a disk image file, attach it first: losetup --find --show FILE")
    return BlockDev(path, os.major(st.st_rdev), os.minor(st.st_rdev))


def sysfs_dir(devno: int) -> str | None:
    p = f"/sys/dev/block/{os.major(devno)}:{os.minor(devno)}"
    return os.path.realpath(p) if os.path.exists(p) else None


def _devno_at(d: str) -> int | None:
    try:
        with open(os.path.join(d, "dev")) as f:
            ma, mi = f.read().strip().split(":")
        return os.makedev(int(ma), int(mi))
    except (OSError, ValueError):
        return None


def below(devno: int) -> set[int]:
    """DEVNO and every device it sits on (sysfs slaves, recursively): a dm device's
    underlying devices, an md array's members."""
    out: set[int] = set()
    todo = [devno]
    while todo:
        d = todo.pop()
        if d in out:
            continue
        out.add(d)
        sd = sysfs_dir(d)
        try:
            slaves = os.listdir(os.path.join(sd, "slaves")) if sd else []
        except OSError:
            slaves = []
        for s in slaves:
            n = _devno_at(os.path.realpath(os.path.join(sd or "", "slaves", s)))
            if n is not None:
                todo.append(n)
    return out


def partitions(devno: int) -> set[int]:
    sd = sysfs_dir(devno)
    out: set[int] = set()
    try:
        children = os.listdir(sd) if sd else []
    except OSError:
        return out
    for c in children:
        p = os.path.join(sd or "", c)
        if os.path.exists(os.path.join(p, "partition")):
            n = _devno_at(p)
            if n is not None:
                out.add(n)
    return out


def whole_disk(devno: int) -> int | None:
    """The disk a partition is on; None for a device that is no partition."""
    sd = sysfs_dir(devno)
    if sd is None or not os.path.exists(os.path.join(sd, "partition")):
        return None
    return _devno_at(os.path.dirname(sd))


def logical_block_size(runner: Runner, path: str) -> int:
    """What blkback passes on to blkfront as the sector size (and dm stacks upwards)."""
    out = runner.run(["blockdev", "--getss", path], timeout=30).stdout.strip()
    try:
        return int(out)
    except ValueError:
        raise BadInput(f"cannot read the logical block size of {path}: blockdev said {out!r}") from None


def dm_name_of(dev: BlockDev) -> str | None:
    try:
        with open(os.path.join(dev.sysfs, "dm", "name")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def holder_names(dev: BlockDev) -> list[str]:
    """dm names (or kernel names) of the devices stacked on DEV."""
    out = []
    for h in dev.holders():
        try:
            with open(f"/sys/class/block/{h}/dm/name") as f:
                out.append(f.read().strip())
        except FileNotFoundError:
            out.append(h)
    return out


@dataclass(frozen=True)
class LoopInfo:
    name: str
    devno: int
    backing: tuple[int, int]   # (st_dev, st_ino) of the backing file


class Loop:
    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def infos(self) -> list[LoopInfo]:
        """Every attached loop device and the inode it is over (by inode, not by name: a file
        renamed, or reached through a symlink, is still the same file). JSON, and every field
        stripped: util-linux 2.38 pads MAJ:MIN columns with spaces even there, and --raw
        escapes that padding as \\x20, which a split() never took apart."""
        out = self.r.run(["losetup", "--list", "--json", "--output", "NAME,MAJ:MIN,BACK-MAJ:MIN,BACK-INO"],
                         check=False, timeout=30).stdout
        try:
            devs = json.loads(out).get("loopdevices", []) if out.strip() else []
        except (ValueError, AttributeError):
            return []
        infos = []
        for d in devs:
            try:
                ma, mi = str(d["maj:min"]).strip().split(":")
                bma, bmi = str(d["back-maj:min"]).strip().split(":")
                infos.append(LoopInfo(str(d["name"]).strip(), os.makedev(int(ma), int(mi)),
                                      (os.makedev(int(bma), int(bmi)), int(d["back-ino"]))))
            except (KeyError, TypeError, ValueError):
                continue
        return infos

    def attach(self, file: str, *, offset: int = 0, size: int | None = None) -> str:
        """A loop device over FILE, or over SIZE bytes of it from OFFSET."""
        where = (["--offset", str(offset)] if offset else []) + (["--sizelimit", str(size)] if size else [])
        return self.r.run(["losetup", "--find", "--show", *where, file]).stdout.strip()

    def attach_slices(self, file: str, slices: list[tuple[int, int]]) -> list[str]:
        """A loop device over each (OFFSET, SIZE) of FILE, as `losetup --find --show --offset
        --sizelimit` makes it (read-write, no autoclear, no partition scan), through the loop
        driver's ioctls: a losetup process start per device was ~0.1 s in the rig, an ioctl
        is microseconds. Returns the devices made so far when it fails (LoopError.made), so
        the caller's teardown finds each one; the kernel's own record (sysfs backing_file,
        the backing inode) is the same as losetup's, so `find` and `detach` see no difference."""
        made: list[str] = []
        fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
        try:
            for offset, size in slices:
                try:
                    made.append(_configure_free(fd, file, offset, size))
                except OSError as e:
                    raise LoopError(f"cannot attach a loop device over {file} at {offset}: {e.strerror}",
                                    made) from None
        finally:
            os.close(fd)
        return made

    def find(self, file: str) -> list[str]:
        out = self.r.run(["losetup", "--noheadings", "--output", "NAME", "-j", file], check=False).stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def detach(self, dev: str) -> None:
        self.r.run(["losetup", "-d", dev])


class LoopError(LocalIOError):
    """A loop device could not be made; MADE: the ones made before it (to tear down)."""

    def __init__(self, message: str, made: list[str]) -> None:
        super().__init__(message, hint="is the loop module loaded, /dev/loop-control there, a loop device free?")
        self.made = list(made)


# <linux/loop.h>: LOOP_CTL_GET_FREE on /dev/loop-control gives a free (made if need be) index;
# LOOP_CONFIGURE (5.8+) sets the file, offset, size limit and flags in one ioctl, atomically
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
_LO_NAME_SIZE = 64
# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 __reserved[8]; }
# struct loop_info64 { u64 lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit;
#   u32 lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags;
#   u8 lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]; u64 lo_init[2]; }
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s 2Q 8Q")


def loop_config(fd: int, file: str, offset: int, size: int) -> bytes:
    """LOOP_CONFIGURE's argument: FD's file from OFFSET, SIZE bytes (0: to its end)."""
    name = os.fsencode(file)[:_LO_NAME_SIZE - 1]  # what losetup writes too (sysfs has the whole path)
    return _LOOP_CONFIG.pack(fd, 0, 0, 0, 0, offset, size, 0, 0, 0, 0, name, b"", b"", 0, 0, *([0] * 8))


def _open_node(dev: str) -> int:
    """DEV's node: devtmpfs makes it as the kernel adds the device; without devtmpfs, udev
    makes it a moment later."""
    for _ in range(100):
        try:
            return os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.01)
    return os.open(dev, os.O_RDWR | os.O_CLOEXEC)


def _configure_free(fd: int, file: str, offset: int, size: int) -> str:
    """Take a free loop device and set it over FD. Another process (a losetup) may take the
    same free index first: LOOP_CONFIGURE then fails with EBUSY and we ask again, as losetup does."""
    arg = loop_config(fd, file, offset, size)
    for _ in range(64):
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        finally:
            os.close(ctl)
        dev = f"/dev/loop{n}"
        ld = _open_node(dev)
        try:
            fcntl.ioctl(ld, LOOP_CONFIGURE, arg)
            return dev
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        finally:
            os.close(ld)
    raise OSError(errno.EBUSY, "every free loop device was taken by another process first")
