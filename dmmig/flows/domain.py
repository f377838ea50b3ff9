"""A running domain's disks, as XenStore describes them, sorted into the ones block-dmmig
serves (dmmig migrates those) and the others (which `xl migrate` expects to find on the
destination as they are).

Only what the guest cannot write decides which disks there are: libxl's own record of the
domain's devices (/libxl/DOMID/device/vbd/DEVID, dom0-only, with the backend path libxl chose)
and dom0's backend directories (/local/domain/0/backend/{vbd,vbd3,qdisk}/DOMID/DEVID). The
guest owns its frontend directory (/local/domain/DOMID/device/vbd/*): a 'backend' node there
pointing at another domain's disk would have had dmmig copy that disk and never the guest's
own, and deleting it would hide a disk from the --shared check. The backend directory holds
what libxl wrote (params, script, mode, dev, frontend-id) and what the block script wrote
(physical-device, and node for a loop device over a file).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dmmig.adapters.xenstore import XenStore
from dmmig.errors import StateError
from dmmig.names import SCRIPT, disk_name_for


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
        return os.path.basename(self.script) == SCRIPT

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


# the backend kinds libxl uses for a disk: blkback, tapdisk, qemu (libxl_types.idl)
_KINDS = ("vbd", "vbd3", "qdisk")
_BACKEND = re.compile(r"/local/domain/(\d+)/backend/(?:vbd|vbd3|qdisk)/(\d+)/(\d+)")


def vbds(xs: XenStore, domid: int) -> list[Vbd]:
    """Every disk of DOMID, each with its backend's record; never from the guest's nodes."""
    found: set[tuple[str, str]] = set()  # (devid, backend path)
    libxl = f"/libxl/{domid}/device/vbd"
    for devid in xs.list(libxl):
        found.add((devid, xs.read(f"{libxl}/{devid}/backend") or ""))
    for kind in _KINDS:  # a disk libxl has no record of (another toolstack) is still a disk
        for devid in xs.list(f"/local/domain/0/backend/{kind}/{domid}"):
            found.add((devid, f"/local/domain/0/backend/{kind}/{domid}/{devid}"))
    out = []
    for devid, be in sorted(found, key=lambda f: (int(f[0]) if f[0].isdigit() else 0, f)):
        m = _BACKEND.fullmatch(be)
        if not m or (int(m.group(2)), m.group(3)) != (domid, devid):
            raise StateError(f"disk {devid} of domain {domid}: its backend is recorded as {be!r}, which is not "
                             "a backend of this domain's disk", hint="inspect /libxl/DOMID/device/vbd in XenStore")

        def key(k: str) -> str:
            return xs.read(f"{be}/{k}") or ""  # noqa: B023 - called in this iteration only
        if key("frontend-id") != str(domid):
            raise StateError(f"disk {devid} of domain {domid}: backend {be} serves domain "
                             f"{key('frontend-id') or '(none)'}, not {domid}")
        out.append(Vbd(devid=devid, vdev=key("dev") or devid, backend=be, script=key("script"),
                       params=key("params"), mode=key("mode"), physical_device=key("physical-device"),
                       node=key("node")))
    return out
