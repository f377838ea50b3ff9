"""Block devices and loop devices: stat, size, holders, losetup."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from dmmig.errors import BadInput
from dmmig.runner import Runner


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


def block_device(path: str) -> BlockDev:
    """Stat PATH and insist it is a block device (refusing before anything changes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file or device") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot stat: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise BadInput(f"{path}: not a block device",
                       hint="for a disk image file, attach it first: losetup --find --show FILE")
    return BlockDev(path, os.major(st.st_rdev), os.minor(st.st_rdev))


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


class Loop:
    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def attach(self, file: str) -> str:
        return self.r.run(["losetup", "--find", "--show", file]).stdout.strip()

    def find(self, file: str) -> list[str]:
        out = self.r.run(["losetup", "--noheadings", "--output", "NAME", "-j", file], check=False).stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def detach(self, dev: str) -> None:
        self.r.run(["losetup", "-d", dev])
