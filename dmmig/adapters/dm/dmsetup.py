"""dmsetup adapter: every device-mapper operation dmmig does goes through here."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dmmig.adapters.blockdev import block_device
from dmmig.adapters.dm.targets import EraStatus, MirrorStatus, Segments, Table
from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput, CommandError, MissingDependency

INFO_FIELDS = "name,major,minor,attr,open,segments,events,uuid"


@dataclass(frozen=True)
class DmInfo:
    name: str
    major: int
    minor: int
    attr: str
    open_count: int
    segments: int
    events: int
    uuid: str

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def suspended(self) -> bool:
        return len(self.attr) > 2 and self.attr[2] == "s"

    @property
    def has_inactive(self) -> bool:
        return len(self.attr) > 1 and self.attr[1] == "I"

    @property
    def read_only(self) -> bool:
        return len(self.attr) > 3 and self.attr[3] == "r"

    @property
    def live(self) -> bool:
        return self.attr[:1] == "L"


class Guard(Protocol):
    """Told of every suspend and resume; resumes what we left suspended if we die (dm/guard.py)."""

    def start(self) -> None: ...

    def suspending(self, name: str) -> None: ...

    def resumed(self, name: str) -> None: ...


class DmSetup:
    def __init__(self, runner: Runner, wait_node: Callable[..., None] | None = None,
                 guard: Guard | None = None) -> None:
        self.r = runner
        self._wait_node = wait_node
        self._guard = guard

    def arm_guard(self) -> None:
        """Start the suspend guard now rather than at the first suspend: its start (a Python
        process) then overlaps work that waits, such as the destination's agent starting."""
        if self._guard is not None:
            self._guard.start()

    # --- queries ---------------------------------------------------------------------
    def info(self, name: str) -> DmInfo | None:
        res = self.r.run(["dmsetup", "info", "-c", "--noheadings", "--separator", ";",
                          "-o", INFO_FIELDS, name], check=False)
        if res.returncode != 0:
            if "not exist" in res.stderr or "No such device" in res.stderr:
                return None
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        return _parse_info(res.stdout.strip().splitlines()[0])

    def devno(self, name: str) -> str | None:
        """NAME's device number (major:minor), or None if there is no such dm device. Read from
        its node and the kernel's sysfs: no dmsetup process, which costs ~90 ms in a rig kernel
        and every copy round asked twice. A node that is missing, not a block device or now
        another device's (sysfs names it otherwise) falls back to dmsetup info."""
        try:
            devno = block_device(f"/dev/mapper/{name}").devno
            with open(f"/sys/dev/block/{devno}/dm/name") as f:
                if f.read().rstrip("\n") == name:
                    return devno
        except (BadInput, OSError):  # no node, or not a block device; no such sysfs entry
            pass
        info = self.info(name)
        return None if info is None else info.devno

    def info_of(self, devno: str) -> DmInfo | None:
        """The dm device with number DEVNO (major:minor), or None if it is no dm device: found
        by number, so a device renamed since (lvrename renames an open LV's) is still found."""
        major, minor = _devno(devno)
        res = self.r.run(["dmsetup", "info", "-c", "--noheadings", "--separator", ";", "-o", INFO_FIELDS,
                          "-j", major, "-m", minor], check=False)
        if res.returncode != 0:
            if "not exist" in res.stderr or "No such device" in res.stderr:
                return None
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        lines = res.stdout.strip().splitlines()
        return _parse_info(lines[0]) if lines else None

    def table_text_of(self, devno: str, *, inactive: bool = False) -> str:
        """The table (live, or the inactive one) of the dm device DEVNO, as the kernel prints it."""
        major, minor = _devno(devno)
        argv = ["dmsetup", "table"] + (["--inactive"] if inactive else []) + ["-j", major, "-m", minor]
        return self.r.run(argv).stdout.strip()

    def table(self, name: str, *, inactive: bool = False) -> Table:
        argv = ["dmsetup", "table"] + (["--inactive"] if inactive else []) + [name]
        return Table.parse(self.r.run(argv).stdout)

    def table_text(self, name: str) -> str:
        return self.r.run(["dmsetup", "table", name]).stdout.strip()

    def status_line(self, name: str, *, noflush: bool = True) -> str:
        # --noflush: a mirror's status must not wait for in-flight I/O to a dying leg.
        # Never call this on a suspended era device: era answers through its worker.
        argv = ["dmsetup", "status"] + (["--noflush"] if noflush else []) + [name]
        return self.r.run(argv, timeout=30).stdout.strip()

    def era_status(self, name: str) -> EraStatus:
        return EraStatus.parse(self.status_line(name))

    def mirror_status(self, name: str) -> MirrorStatus:
        return MirrorStatus.parse_lines(self.status_line(name))

    def targets(self) -> dict[str, str]:
        out = self.r.run(["dmsetup", "targets"]).stdout
        return {w[0]: w[1] for w in (ln.split() for ln in out.splitlines()) if len(w) >= 2}

    # --- changes ---------------------------------------------------------------------
    def create(self, name: str, table: Table | Segments, *, uuid: str | None = None) -> None:
        argv = ["dmsetup", "create", name] + (["-u", uuid] if uuid else []) + ["--table", table.render()]
        self.r.run(argv)
        self._wait(name, present=True)

    def load(self, name: str, table: Table | Segments) -> None:
        self.r.run(["dmsetup", "load", name, "--table", table.render()])

    def clear_inactive(self, name: str) -> None:
        self.r.run(["dmsetup", "clear", name])

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        if self._guard is not None:
            self._guard.suspending(name)
        self.r.run(["dmsetup", "suspend"] + (["--noflush"] if noflush else []) + [name], timeout=120)

    def resume(self, name: str, *, noflush: bool = False, udev_sync: bool = True) -> float:
        """Resume; returns time.monotonic() when the kernel had resumed (before udev settles).
        udev_sync=False, for a resume of the table that was live before the suspend: as in swap,
        dmsetup returns once the kernel resumed, without waiting for udev's handling of the
        change event (its rules probe the device: 0.2 s in the rig), nor for the node, which a
        suspend and resume keep."""
        self.r.run(["dmsetup", "resume"] + (["--noflush"] if noflush else [])
                   + ([] if udev_sync else ["--noudevsync"]) + [name], timeout=120)
        t = time.monotonic()
        if self._guard is not None:
            self._guard.resumed(name)
        if udev_sync:
            self._wait(name, present=True)
        return t

    def message(self, name: str, msg: str) -> str:
        return self.r.run(["dmsetup", "message", name, "0", msg]).stdout

    def remove(self, name: str, *, retry: bool = True) -> None:
        self.r.run(["dmsetup", "remove"] + (["--retry"] if retry else []) + [name], timeout=60)
        self._wait(name, present=False)

    def wait_event(self, name: str, event_nr: int, timeout: float) -> int | None:
        """Until NAME's event counter is no longer EVENT_NR; returns the counter then, which
        `dmsetup -v wait` prints (an info process less per wake; asked of info if it did not),
        or None if NAME is gone."""
        res = self.r.run(["dmsetup", "-v", "wait", "--noflush", name, str(event_nr)], timeout=timeout)
        m = re.search(r"^Event number:\s*(\d+)\s*$", res.stdout, re.M)
        if m:
            return int(m.group(1))
        info = self.info(name)
        return None if info is None else info.events

    def swap(self, name: str, table: Table | Segments, *, noflush: bool = False,
             udev_sync: bool = True) -> float:
        """Replace the live table of NAME. Load first (the new target's constructor runs
        while I/O flows), then one resume: the kernel suspends, swaps and resumes inside that
        single ioctl, so I/O pauses only for the flush and the swap. Returns the seconds the
        resume took (an upper bound of the pause; with UDEV_SYNC it includes udev's handling of
        the change event, which comes after the pause).

        udev_sync=False: dmsetup returns once the kernel resumed, without waiting for udev to
        handle the change event (0.5-1 s in the rig: its rules probe the device), nor for the
        node: a swap keeps the device's name and number, so its node stays (the wait's first
        udev context is a process too)."""
        self.load(name, table)
        t0 = time.monotonic()
        try:
            self.r.run(["dmsetup", "resume"] + (["--noflush"] if noflush else [])
                       + ([] if udev_sync else ["--noudevsync"]) + [name], timeout=120)
        except BaseException:
            # never leave a half-made change behind: drop the inactive table, keep the live one
            self.r.run(["dmsetup", "clear", name], check=False)
            raise
        pause = time.monotonic() - t0
        if udev_sync:
            self._wait(name, present=True)
        return pause

    def require_targets(self, *names: str) -> None:
        have = self.targets()
        if all(n in have for n in names):
            return
        for n in names:
            if n not in have:
                # the target may just be a module that is not loaded yet
                self.r.run(["modprobe", f"dm-{n}" if n != "mirror" else "dm-mirror"], check=False)
        have = self.targets()
        missing = [n for n in names if n not in have]
        if missing:
            raise MissingDependency(
                f"device-mapper target(s) missing from the kernel: {', '.join(missing)}",
                hint="load the module (modprobe dm-era / dm-mirror) or use a kernel that has it")

    def _wait(self, name: str, *, present: bool) -> None:
        if self._wait_node is not None:
            self._wait_node(name, present=present)


def _devno(devno: str) -> tuple[str, str]:
    major, sep, minor = devno.partition(":")
    if not (sep and major.isdigit() and minor.isdigit()):
        raise ValueError(f"not a major:minor device number: {devno!r}")
    return major, minor


def _parse_info(line: str) -> DmInfo:
    f = line.split(";")
    return DmInfo(f[0], int(f[1]), int(f[2]), f[3], int(f[4]), int(f[5]), int(f[6]),
                  f[7] if len(f) > 7 else "")
