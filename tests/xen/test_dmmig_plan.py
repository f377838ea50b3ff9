"""`dmmig migrate`'s plan on real Xen, where libxl wrote the XenStore nodes it reads: what the
guest can write (its own frontend directory) must change nothing in it."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rig.uml import ROOT
from tests.xenrig.domu import DomU
from tests.xenrig.host import XenHost
from tests.xenrig.pair import B_IP, SSH_OPTS, XenPair

pytestmark = pytest.mark.xen
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")


@pytest.fixture
def pair(xen_pair: XenPair) -> Iterator[tuple[XenHost, XenHost]]:
    a, b = xen_pair.a, xen_pair.b
    assert a is not None and b is not None
    for h in (a, b):
        h.install_block_script()
    yield a, b


def plan(a: XenHost, guest: str, *extra: str) -> Any:
    r = a.run([DMMIG, "migrate", guest, B_IP, "--dry-run", "--json", "--create", "--remote-dmmig", DMMIG,
               *SSH_OPTS, *extra], check=False, timeout=300)
    return json.loads(r.out) if r.rc == 0 else (r.rc, r.err)


def test_the_guests_frontend_nodes_change_nothing_in_the_plan(pair: tuple[XenHost, XenHost]) -> None:
    """The guest owns /local/domain/DOMID/device/vbd/*. Its xvda is on block-dmmig and its xvdb,
    writable, on Xen's stock script: pointing xvda's frontend 'backend' node at another disk's
    backend and deleting xvdb's must neither change what is moved nor hide xvdb from the
    --shared check (dom0 writes the nodes here: the guest could write the same values)."""
    a, _ = pair
    guest = "xrfe"
    imgs = [f"/dev/shm/{guest}-a.img", f"/dev/shm/{guest}-b.img"]
    for img in imgs:
        a.run(["truncate", "-s", "16M", img])
    vm = DomU(a, guest, disk=[f"vdev=xvda,access=rw,script=block-dmmig,target={imgs[0]}",
                              f"format=raw,vdev=xvdb,access=rw,target={imgs[1]}"])
    try:
        vm.create()
        domid = vm.domid()
        assert domid is not None
        # what libxl itself records of the guest's disks, in dom0's own part of XenStore
        libxl = a.run(["xenstore-ls", "-f", f"/libxl/{domid}/device/vbd"]).out
        assert f"/libxl/{domid}/device/vbd/51712/backend = \"/local/domain/0/backend/vbd/{domid}/51712\"" in libxl
        before = plan(a, guest, "--shared")
        assert isinstance(before, dict), before
        assert [d["params"] for d in before["disks"]] == [imgs[0]]
        assert [v["vdev"] for v in before["not_moved"]] == ["xvdb"]
        refused = plan(a, guest)
        assert refused[0] == 3 and "xvdb" in refused[1], refused
        fe = f"/local/domain/{domid}/device/vbd"
        a.run(["xenstore-write", f"{fe}/51712/backend", f"/local/domain/0/backend/vbd/{domid}/51728"])
        a.run(["xenstore-rm", f"{fe}/51728/backend"])
        assert plan(a, guest, "--shared") == before
        refused = plan(a, guest)
        assert refused[0] == 3 and "xvdb" in refused[1], refused
    finally:
        a.run(["xl", "destroy", guest], check=False)
        for img in imgs:
            a.run(["rm", "-f", img])
