"""The kernel's NBD client (nbd-client): the destination's export as a local /dev/nbdX, the
mirror's second leg.

Always with a request timeout: without one a dead peer hangs I/O forever (the kernel only
logs "Possible stuck request"); with one, requests fail with EIO and the mirror marks the leg
failed while the guest's writes complete on leg 0. Block size 512 so the top device's logical
block size does not change under blkback when the mirror is swapped in.

Choosing a free /dev/nbdX is a host-wide decision: two cutovers at once (two disks of one
domain, two migrations) must never pick the same device, or the loser's rollback detaches the
winner's leg. Every choice, attach and detach runs under one flock (LOCK, held across them),
and each device dmmig uses carries a marker naming its owner (OWNER = state dir + disk name):
a device is chosen only if it is detached, empty and unmarked (a marker on a detached device
is one a killed dmmig left: under the lock nobody else can be between mark and attach), and a
device is only ever detached by the owner its marker names. nbd-client 3.24 could let the
kernel allocate a device (netlink, no device given), but then the udev marker below could not
exist before the device connects.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from dmmig.adapters.runner import Runner
from dmmig.errors import Busy, MissingDependency, RemoteError

# udev-rules/57-dmmig.rules keeps blkid and LVM off nbd devices marked here: the leg holds
# the guest's data, and the marker must exist before the device connects. The marker's text
# is its owner.
UDEV_MARKS = "/run/dmmig-nbd"
LOCK = os.path.join(UDEV_MARKS, "lock")  # not an nbd name: the udev rule never matches it
LOCK_WAIT_S = 180.0  # other cutovers attach (up to 60 s each) or detach under the lock


def owner_of(state: str, name: str) -> str:
    """The text of the markers of NAME's legs (one disk name per state dir)."""
    return f"{os.path.realpath(state)}/{name}"


class NbdKernel:
    def __init__(self, runner: Runner, sys_block: str = "/sys/block") -> None:
        self.r = runner
        self.sys_block = sys_block  # the unit tests' fake sysfs

    def attached(self, dev: str) -> bool:
        return os.path.exists(f"{self.sys_block}/{os.path.basename(dev)}/pid")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(UDEV_MARKS, mode=0o700, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if time.monotonic() > deadline:
                    raise Busy(f"{LOCK} stayed locked for {LOCK_WAIT_S:.0f}s (another dmmig attaching or "
                               "detaching an nbd device)", hint=f"find it with `fuser {LOCK}`")
                time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the flock; a killed dmmig releases it too

    def attach_free(self, owner: str, export: str, *, timeout: int, on_claim: Callable[[str], None],
                    unix: str | None = None, host: str | None = None, port: int | None = None,
                    tls: str | None = None) -> str:
        """Choose a free device, mark it OWNER's, tell ON_CLAIM (which journals it), attach the
        export: all under the host-wide lock. On failure nothing of it stays attached or
        marked. Returns the device."""
        with self._locked():
            dev = self._choose()
            _mark(dev, owner)
            try:
                on_claim(dev)
                self._attach(dev, export, timeout=timeout, unix=unix, host=host, port=port, tls=tls)
            except BaseException:
                # under the lock, nobody but this call can have attached DEV
                if self.attached(dev):
                    self.r.run(["nbd-client", "-d", dev], check=False, timeout=60)
                _unmark(dev)
                raise
        return dev

    def release(self, dev: str, owner: str) -> bool:
        """Detach DEV and drop its marker, if its marker names OWNER (a device dmmig marked
        before markers named owners counts as OWNER's too). False if DEV is someone else's
        now: a device this owner's journal still names, that was since reused."""
        with self._locked():
            mark = _read_mark(dev)
            if mark is None or mark not in (owner, ""):
                return False
            if self.attached(dev):
                self.r.run(["nbd-client", "-d", dev], timeout=60)
            _unmark(dev)
        return True

    def owned(self, owner: str) -> list[str]:
        """The devices whose marker names OWNER (found even when the journal never got them)."""
        try:
            marks = os.listdir(UDEV_MARKS)
        except FileNotFoundError:
            return []
        return sorted(f"/dev/{d}" for d in marks if d.startswith("nbd") and _read_mark(f"/dev/{d}") == owner)

    def free_count(self, held_by: Iterable[str] = ()) -> int:
        """How many devices a cutover could take now, for the plan: the free ones, plus the ones
        attached for an owner in HELD_BY (a rerun's cutover drops its earlier mirror, and so its
        leg, before it chooses). Changes nothing (but loads the module, as a choice would).
        Advisory: another migration may take devices before the cutover, which then refuses
        under the lock (Busy)."""
        held = {d for o in held_by for d in self.owned(o) if self.attached(d)}
        return len(self._free(self._devices())) + len(held)

    def _devices(self) -> list[str]:
        if not os.path.exists(f"{self.sys_block}/nbd0"):
            self.r.run(["modprobe", "nbd"], check=False)
        devs = sorted((d for d in os.listdir(self.sys_block) if d.startswith("nbd") and d[3:].isdigit()),
                      key=lambda d: int(d[3:]))
        if not devs:
            raise MissingDependency("no /dev/nbdX devices: the nbd module is missing",
                             hint="modprobe nbd (or use a kernel with CONFIG_BLK_DEV_NBD)")
        return devs

    def _free(self, devs: list[str]) -> list[str]:
        # a marker on a detached device was left by a killed dmmig (nobody else can hold a
        # device between mark and attach: that is done under the lock)
        return [f"/dev/{d}" for d in devs if not self.attached(d) and self._size(d) == 0]

    def _choose(self) -> str:
        devs = self._devices()
        free = self._free(devs)
        if not free:
            raise Busy(f"all {len(devs)} nbd devices are in use", hint="modprobe nbd nbds_max=N")
        return free[0]

    def _size(self, dev: str) -> int:
        try:
            with open(f"{self.sys_block}/{dev}/size") as f:
                return int(f.read())
        except OSError:
            return 0

    def _attach(self, dev: str, export: str, *, timeout: int, unix: str | None = None,
                host: str | None = None, port: int | None = None, tls: str | None = None) -> None:
        """TLS: a directory with ca-cert.pem, client-cert.pem, client-key.pem; nbd-client then
        checks the server's certificate against the CA and HOST, and leaves a daemon of its own
        (command line naming TLS) proxying between the kernel's socket and the TLS connection.
        Always one connection (no -C): with several, the kernel sends a write that timed out
        again on another one instead of failing it, and the first may still land later."""
        if unix is not None:
            where = ["-u", unix]
        else:
            assert host is not None and port is not None
            where = [host, str(port)]
        if tls is not None:  # long options: 3.24's short option string lacks -F
            assert host is not None
            where += ["--enable-tls", "--cacertfile", os.path.join(tls, "ca-cert.pem"),
                      "--certfile", os.path.join(tls, "client-cert.pem"),
                      "--keyfile", os.path.join(tls, "client-key.pem"), "--tlshostname", host]
        res = self.r.run(["nbd-client", "-N", export, *where, dev, "-b", "512", "-t", str(timeout)],
                         check=False, timeout=60)
        if res.returncode != 0 or not self.attached(dev):
            raise RemoteError(f"nbd-client could not attach the destination's export to {dev}: "
                              f"{(res.stderr or res.stdout).strip()}")
        write_through(dev)


def write_through(dev: str) -> None:
    """Tell the block layer DEV has no volatile write cache, so no flush is sent to it.

    dmmig's exports (dmmig/adapters/nbd.py) open the destination disk O_DSYNC (qemu-nbd --cache
    directsync or writethrough): a write is stable before qemu-nbd acknowledges it, and a
    flush adds nothing but a round trip and a remote fsync. dm-mirror sends one to every leg
    each time its log records regions as clean (dm-log disk_flush -> dm-raid1 mirror_flush):
    once per region recovered by the resync, and once per guest write to a clean region while
    it mirrors. Measured in the rig: one NBD flush per guest write, and per resynced region,
    before; none after."""
    with open(f"/sys/block/{os.path.basename(dev)}/queue/write_cache", "w") as f:
        f.write("write through")


def _mark(dev: str, owner: str) -> None:
    path = os.path.join(UDEV_MARKS, os.path.basename(dev))
    tmp = f"{path}.tmp"  # not an nbd name either: the rule only sees the complete marker
    with open(tmp, "w") as f:
        f.write(owner)
    os.replace(tmp, path)


def _read_mark(dev: str) -> str | None:
    try:
        with open(os.path.join(UDEV_MARKS, os.path.basename(dev))) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _unmark(dev: str) -> None:
    try:
        os.unlink(os.path.join(UDEV_MARKS, os.path.basename(dev)))
    except FileNotFoundError:
        pass
