"""A running domain's disks, as XenStore describes them, sorted into the ones block-dmmig
serves (dmmig migrates those) and the others (which `xl migrate` expects to find on the
destination as they are).

The frontend directory /local/domain/DOMID/device/vbd/DEVID names each disk's backend; the
backend directory holds what libxl wrote (params, script, mode, dev) and what the block script
wrote (physical-device, and node for a loop device over a file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dmmig.hotplug import PREFIX as SCRIPT_NAME
from dmmig.hotplug import disk_name_for
from dmmig.xenstore import XenStore


@dataclass(frozen=True)
class Vbd:
    devid: str
    vdev: str                 # the guest's name for it (xvda, ...)
    backend: str              # absolute backend path
    script: str               # the hotplug script's path, "" for none
    params: str               # the disk spec's target=
    mode: str                 # r or w
    physical_device: str      # hex major:minor blkback opened
    node: str                 # the loop device block-dmmig attached for a file target, or ""

    @property
    def managed(self) -> bool:
        return os.path.basename(self.script) == SCRIPT_NAME

    @property
    def writable(self) -> bool:
        return "w" in self.mode

    @property
    def local_backend(self) -> bool:
        return self.backend.startswith("/local/domain/0/")

    @property
    def name(self) -> str:
        """The dmmig disk NAME block-dmmig gave it (the same on both hosts)."""
        return disk_name_for(self.params)


def vbds(xs: XenStore, domid: int) -> list[Vbd]:
    out = []
    front = f"/local/domain/{domid}/device/vbd"
    for devid in sorted(xs.list(front), key=lambda d: int(d) if d.isdigit() else 0):
        be = xs.read(f"{front}/{devid}/backend") or ""
        if not be:
            continue

        def key(k: str) -> str:
            return xs.read(f"{be}/{k}") or ""
        out.append(Vbd(devid=devid, vdev=key("dev") or devid, backend=be, script=key("script"),
                       params=key("params"), mode=key("mode"), physical_device=key("physical-device"),
                       node=key("node")))
    return out
