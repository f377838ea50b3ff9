"""LVM through lvm2's command-line tools: the volume groups and logical volumes the
destination agent checks, creates and removes. Names are checked before they reach a
command line."""
from __future__ import annotations

import re

from dmmig.adapters import blockdev
from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput, MissingDependency

NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")  # what lvm2 accepts for a VG or an LV
TIMEOUT_S = 120.0  # lvcreate alone may take that long on a busy VG


def _name(what: str, name: str) -> str:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise BadInput(f"invalid {what} name {name!r}")
    return name


class Lvm:
    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def is_vg(self, vg: str) -> bool:
        """VG is a volume group here (False where lvm2 is not installed)."""
        if not NAME.fullmatch(vg):
            return False
        try:
            return self.r.run(["vgs", "--noheadings", "-o", "vg_name", vg], check=False, timeout=60).returncode == 0
        except MissingDependency:  # no LVM on this host: /dev/X/Y is no LV
            return False

    def vg_free(self, vg: str) -> int | None:
        """VG's free bytes; None if vgs says something else than a number."""
        out = self.r.run(["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", _name("VG", vg)],
                         timeout=60).stdout
        try:
            return int(out.strip())
        except ValueError:
            return None

    def block_size(self, vg: str) -> int:
        """The logical block size of an LV of VG: the largest of its physical volumes'."""
        out = self.r.run(["pvs", "--noheadings", "-o", "pv_name", "--select", f"vg_name={_name('VG', vg)}"],
                         timeout=60).stdout
        return max((blockdev.logical_block_size(self.r, pv) for pv in out.split()), default=512)

    def create(self, vg: str, lv: str, size: int) -> None:
        self.r.run(["lvcreate", "--yes", "-L", f"{size}b", "-n", _name("LV", lv), _name("VG", vg)], timeout=TIMEOUT_S)

    def remove(self, vg: str, lv: str) -> None:
        """lvremove refuses an LV that is open."""
        self.r.run(["lvremove", "--yes", f"{_name('VG', vg)}/{_name('LV', lv)}"], timeout=TIMEOUT_S)
