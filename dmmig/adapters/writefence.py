"""Whether anything wrote a disk since a moment: the kernel's own per-device I/O counters.

A warm copy (dmmig/flows/warm.py) may skip a block only if it knows for sure that nobody
wrote it. The proof here is the kernel's: /sys/dev/block/MAJ:MIN/stat counts every sector
written and discarded through a block device, whoever wrote it (a write-zeroes counts as a
write). It also remembers what the device maps onto (Counters.mapping): data can change with no
write through the device when its mapping does (an LV reduced and extended again, a loop
device's offset). A Fence remembers those counters with the device's identity: the boot (counters
start at zero at boot), the device number and its diskseq (a new number each time a loop
device is attached or a dm device made, so a device detached and attached again is another
disk). A file behind a loop device is remembered too (inode, size, mtime, ctime): a write to
the file past the loop device moves its ctime, which no one can set back.

Each check fails towards "written": any doubt (a counter unreadable, a device gone, a new
boot) means the disk is not trusted, and the copy is a full one.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from dmmig.adapters.runner import Runner

BOOT_ID = "/proc/sys/kernel/random/boot_id"
# stat's fields (Documentation/block/stat.rst): write sectors, in flight, discard sectors
WRITE_SECTORS, IN_FLIGHT, DISCARD_SECTORS = 6, 8, 13
# a timestamp later than a file's ctime must be this far past it for any later write to move
# it (the kernel stamps from the coarse clock, truncated to the file system's granularity)
CTIME_SETTLE_S = 1.0
CLOCK_REALTIME_COARSE = 5  # Linux's clock id (Python's time module does not name it): the kernel's file times


@dataclass(frozen=True)
class Counters:
    """A block device's identity and write counters at one moment. MAPPING (when asked for):
    what the device maps onto, for data that changes with no write through it: its size, a
    loop device's file, offset and size limit, a partition's start, a dm device's table (an
    LV reduced and extended again maps other extents)."""
    devno: str                   # major:minor
    diskseq: int | None          # None: the kernel has no diskseq (before 5.15)
    write_sectors: int
    discard_sectors: int
    in_flight: int = 0
    mapping: str = ""


@dataclass(frozen=True)
class FileStamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass
class Fence:
    """PATH as it was at a moment: the block device's counters (None for a plain file) and
    the file behind it (None for a device that is no loop device over a file)."""
    path: str
    boot_id: str
    device: Counters | None = None
    file: FileStamp | None = None
    file_path: str | None = None
    # False: the file's stamp was taken without waiting for its ctime to settle (take(...,
    # wait=False), inside a suspended window); it proves nothing until settle() made it True
    settled: bool = True


def boot_id() -> str:
    with open(BOOT_ID) as f:
        return f.read().strip()


def counters(devno: str, runner: Runner | None = None) -> Counters:
    """DEVNO's counters now, with its mapping if RUNNER is given (a dm table is read with
    dmsetup); OSError if the device is gone or its mapping cannot be read."""
    base = f"/sys/dev/block/{devno}"
    with open(f"{base}/stat") as f:
        fields = [int(x) for x in f.read().split()]
    try:
        with open(f"{base}/diskseq") as f:
            seq: int | None = int(f.read())
    except FileNotFoundError:
        seq = None
    discard = fields[DISCARD_SECTORS] if len(fields) > DISCARD_SECTORS else 0
    return Counters(devno, seq, fields[WRITE_SECTORS], discard, fields[IN_FLIGHT],
                    mapping(devno, runner) if runner is not None else "")


def discard_mark(c: Counters) -> str:
    """C's discard count with the device's identity, as the copy journals it: a device made
    again (another diskseq) or any sector discarded since makes another mark."""
    return f"{c.devno}/{c.diskseq}/{c.discard_sectors}"


def discard_mark_of(devno: str) -> str | None:
    """DEVNO's discard mark now, None if its counters cannot be read (the caller assumes a
    discard)."""
    try:
        return discard_mark(counters(devno))
    except OSError:
        return None


def discards_since(then: str | None, now: str | None) -> str | None:
    """Why a copy must treat the whole disk as written, else None: a discard through the era
    device between discard marks THEN and NOW (era records a discard by its first block only:
    Stack.discards), or that cannot be told."""
    if then is not None and then == now:
        return None
    if now is None:
        return "the era device's discard counter cannot be read, so a discard cannot be ruled out"
    if then is None:
        return "no discard count was taken with the last snapshot (a copy begun by an older dmmig)"
    dev_then, n_then = then.rsplit("/", 1)
    dev_now, n_now = now.rsplit("/", 1)
    if dev_then != dev_now:
        return f"the era device is another one since the last snapshot ({dev_then}, now {dev_now})"
    return (f"{int(n_now) - int(n_then)} sector(s) were discarded through the era device since the last "
            "snapshot, and era records a discard by the block it starts in only")


def discard_fallback(exact: bool, moved: str | None) -> str | None:
    """Why a round (or the cutover) must treat the whole disk as written: a discard through era
    (MOVED: writefence.discards_since) while era's discard limit did not hold (EXACT False),
    else None: with the limit each discard piece lies in one era block and era marked them all."""
    if exact or moved is None:
        return None
    return (f"the era device's queue/discard_max_bytes is not confined to its discard_granularity (raised since "
            f"prepare, or an era device that tracks a way back), and {moved}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def mapping(devno: str, runner: Runner) -> str:
    """What DEVNO maps onto now (see Counters.mapping)."""
    base = f"/sys/dev/block/{devno}"
    parts = [f"size={_read(base + '/size')}"]
    if os.path.isdir(base + "/loop"):
        parts.append(f"loop={_read(base + '/loop/backing_file')}@{_read(base + '/loop/offset')}"
                     f"+{_read(base + '/loop/sizelimit')}")
    if os.path.exists(base + "/start"):
        parts.append(f"start={_read(base + '/start')}")
    if os.path.isdir(base + "/dm"):
        ma, mi = devno.split(":")
        res = runner.run(["dmsetup", "table", "-j", ma, "-m", mi], check=False, timeout=30)
        if res.returncode != 0:
            raise OSError(f"dmsetup table of {devno} failed: {(res.stderr or res.stdout).strip()}")
        parts.append("table=" + " | ".join(ln.strip() for ln in res.stdout.splitlines()))
    return ";".join(parts)


def devno_of(path: str) -> str | None:
    """PATH's major:minor if it is a block device, else None."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISBLK(st.st_mode) else None


def backing_file(devno: str) -> str | None:
    """The file behind loop device DEVNO (as the loop driver recorded it), else None."""
    try:
        with open(f"/sys/dev/block/{devno}/loop/backing_file") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def mapping_of_loop(devno: str) -> tuple[int, int]:
    """Loop device DEVNO's (offset, sizelimit) in bytes; OSError if it is none."""
    base = f"/sys/dev/block/{devno}/loop"
    return int(_read(base + "/offset")), int(_read(base + "/sizelimit"))


def _stamp(path: str) -> FileStamp:
    st = os.stat(path)
    return FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settled_stamp(path: str, settle_s: float | None = None, max_wait_s: float | None = None,
                  first: FileStamp | None = None) -> FileStamp:
    """PATH's stamp such that any later write moves its ctime: taken when the clock read
    before it was already SETTLE_S past the ctime it shows (a write within the tick of the
    last one would otherwise leave the ctime as it was); else waited for and taken again,
    for MAX_WAIT_S at most (OSError past it). FIRST: the stamp the caller fenced with
    earlier, which every stamp taken here must equal."""
    settle_s = CTIME_SETTLE_S if settle_s is None else settle_s
    end = None if max_wait_s is None else time.monotonic() + max_wait_s
    for _ in range(4):
        before = time.clock_gettime(CLOCK_REALTIME_COARSE)
        s = _stamp(path)
        # the first stamp is the moment the caller fences; a write while we wait for the ctime
        # to settle came after it and must not become part of the baseline
        if first is not None and s != first:
            raise OSError(f"{path} was written while its fence was taken")
        first = s
        wait = s.ctime_ns / 1e9 + settle_s - before
        if wait < 0:
            return s
        if end is not None and time.monotonic() + wait > end:
            raise OSError(f"the ctime of {path} would settle only in {wait:.2f}s, past the {max_wait_s:.2f}s allowed")
        time.sleep(min(wait + 0.01, settle_s + 0.01))
    # written all the time, or a ctime in the future (the clock was set back): no fence
    raise OSError(f"the ctime of {path} does not settle")


def sync(path: str) -> None:
    """What a writer left in PATH's page cache reaches the device (and its counters) first."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take(path: str, runner: Runner, *, wait: bool = True, max_wait_s: float | None = None) -> Fence:
    """PATH (a block device or a file) as it is now, after a sync; a file's stamp waited for
    MAX_WAIT_S at most (settled_stamp). WAIT False: the stamp as it is, at once (a suspended
    window must not wait for a ctime); unless its ctime happens to be settled already, the
    fence proves nothing (written_since says so) until settle() is called on it."""
    sync(path)
    devno = devno_of(path)
    file = path if devno is None else backing_file(devno)
    if file is not None:
        sync(file)
    dev = counters(devno, runner) if devno is not None else None
    if file is None:
        return Fence(path, boot_id(), dev, None, None)
    if wait:
        return Fence(path, boot_id(), dev, settled_stamp(file, max_wait_s=max_wait_s), file)
    before = time.clock_gettime(CLOCK_REALTIME_COARSE)
    stamp = _stamp(file)
    return Fence(path, boot_id(), dev, stamp, file, settled=before - stamp.ctime_ns / 1e9 > CTIME_SETTLE_S)


def settle(fence: Fence, runner: Runner, *, max_wait_s: float | None = None) -> Fence:
    """FENCE (taken with wait=False) made sound: once the clock is CTIME_SETTLE_S past its
    file's ctime, the stamp is taken again. If it and the device's counters are as in FENCE,
    nothing wrote either since FENCE (as far as settled_stamp can tell: a write within the
    ctime's tick of the last one before FENCE does not show, as with a fence waited for), and
    FENCE holds with a stamp that any later write moves. OSError otherwise (no fence)."""
    if fence.settled:
        return fence
    if fence.file is None or fence.file_path is None:
        raise OSError(f"the fence of {fence.path} has no file stamp to settle")
    settled_stamp(fence.file_path, max_wait_s=max_wait_s, first=fence.file)
    done = Fence(fence.path, fence.boot_id, fence.device, fence.file, fence.file_path)
    why = written_since(done, runner)
    if why is not None:
        raise OSError(why)
    return done


def written_since(fence: Fence, runner: Runner) -> str | None:
    """Why PATH may have been written since FENCE, or None if it surely was not."""
    if not fence.settled:
        return (f"the fence of {fence.path} was never settled (its file's ctime was too recent to "
                "show a later write)")
    try:
        if boot_id() != fence.boot_id:
            return "the host rebooted since (the kernel's write counters started again)"
        sync(fence.path)
        devno = devno_of(fence.path)
    except OSError as e:
        return f"{fence.path} cannot be checked: {e.strerror or e}"
    if fence.device is not None:
        if devno != fence.device.devno:
            return f"{fence.path} is another device now ({devno or 'no block device'}, was {fence.device.devno})"
        try:
            now = counters(devno, runner if fence.device.mapping else None)
        except OSError as e:
            return f"the write counters of {fence.path} cannot be read: {e.strerror or e}"
        why = _differs(fence.path, fence.device, now)
        if why:
            return why
    elif devno is not None:
        return f"{fence.path} is a block device now, was a file"
    if fence.file is not None and fence.file_path is not None:
        try:
            sync(fence.file_path)
            now_file = _stamp(fence.file_path)
        except OSError as e:
            return f"{fence.file_path} cannot be checked: {e.strerror or e}"
        if (now_file.dev, now_file.ino) != (fence.file.dev, fence.file.ino):
            return f"{fence.file_path} is another file now (a new inode)"
        if now_file != fence.file:
            return f"{fence.file_path} was changed since (size, mtime or ctime moved)"
    return None


def _differs(path: str, then: Counters, now: Counters) -> str | None:
    if now.diskseq != then.diskseq:
        return f"{path} was attached or made again since (diskseq {now.diskseq}, was {then.diskseq})"
    if now.write_sectors != then.write_sectors or now.discard_sectors != then.discard_sectors:
        return (f"{path} was written since: {now.write_sectors - then.write_sectors} sector(s) written, "
                f"{now.discard_sectors - then.discard_sectors} discarded")
    if then.mapping and now.mapping != then.mapping:
        return f"{path} maps onto something else since (was {then.mapping!r}, now {now.mapping!r})"
    return None


def bypassed(origin: Counters, era: Counters, runner: Runner) -> str | None:
    """Whether anything wrote the origin past its era device: the sectors written (and
    discarded) on the origin since ORIGIN equal those written through the era device since
    ERA exactly when every write went through era. Both read now, with no write in flight
    (the caller drains the top device: a loop device counts a write when it completes, dm when
    it starts)."""
    try:
        o, e = counters(origin.devno, runner if origin.mapping else None), counters(era.devno)
    except OSError as err:
        return f"the write counters cannot be read: {err.strerror or err}"
    if origin.mapping and o.mapping != origin.mapping:
        return f"the origin {origin.devno} maps onto something else since (was {origin.mapping!r}, now {o.mapping!r})"
    for dev, then, now in (("origin", origin, o), ("era device", era, e)):
        if now.diskseq != then.diskseq:
            return (f"the {dev} {then.devno} was attached or made again since (diskseq {now.diskseq}, "
                    f"was {then.diskseq})")
    dw, ew = o.write_sectors - origin.write_sectors, e.write_sectors - era.write_sectors
    dd, ed = o.discard_sectors - origin.discard_sectors, e.discard_sectors - era.discard_sectors
    if (dw, dd) != (ew, ed):
        return (f"the origin {origin.devno} was written past the era device: {dw} sector(s) written and {dd} "
                f"discarded on it since, {ew} and {ed} through era")
    if ed:
        # dm-era marks a discard's first block only: dm splits a discard at target boundaries,
        # not at era's block size (max_io_len; era sets no max_discard_granularity), and
        # era_map marks get_block(bio) (docs/design.md "Discards")
        return (f"{ed} sector(s) were discarded through the era device since, and era records a "
                "discard by its first block only")
    return None
