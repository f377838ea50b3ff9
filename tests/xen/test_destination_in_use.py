"""A destination disk a local domain of the destination uses through blkback: `dmmig migrate`
refuses it at plan time, naming that domain. blkback opens its device without O_EXCL and
registers no holder, so the kernel's own signs miss it (the test shows that too); the
destination's XenStore names it."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.xen.test_dmmig_migrate import STATE, clean_up, leftovers, migrate_argv
from tests.xenrig.domu import DomU, backend
from tests.xenrig.host import XenHost
from tests.xenrig.pair import XenPair

pytestmark = pytest.mark.xen
MIB = 1 << 20


@pytest.fixture
def pair(xen_pair: XenPair) -> Iterator[tuple[XenHost, XenHost]]:
    a, b = xen_pair.a, xen_pair.b
    assert a is not None and b is not None
    for h in (a, b):
        h.install_block_script()
    yield a, b
    for h in (a, b):
        assert leftovers(h) == {"dm": [], "state": [], "qemu-nbd": [], "nbd": []}, h.name


def create_paused(h: XenHost, vm: DomU) -> None:
    """xl create -p: libxl runs the hotplug script and blkback opens the disk; the guest
    itself need not run (emulated CPUs are scarce)."""
    h.run(["mkdir", "-p", "/run/xenrig"])
    h.write_file(vm.cfg_path, vm.config())
    h.run(["xl", "create", "-p", "-e", vm.cfg_path], timeout=180)


def test_migrate_refuses_a_destination_a_local_domain_uses(pair: tuple[XenHost, XenHost]) -> None:
    a, b = pair
    name = "xrbusy"
    img, dev = f"/dev/shm/{name}.img", f"/dev/mapper/{name}"  # the same path on both hosts
    disk = f"mapper-{name}"
    for h in (a, b):
        h.run(["truncate", "-s", "16M", img])
        loop = h.run(["losetup", "--find", "--show", img]).out.strip()
        h.run(["dmsetup", "create", name, "--table", f"0 {16 * MIB // 512} linear {loop} 0"])
    vm = DomU(a, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={dev}")
    other = DomU(b, f"{name}-b", disk=f"vdev=xvda,access=rw,target={dev}")  # Xen's stock block script
    try:
        create_paused(a, vm)
        create_paused(b, other)
        domid = other.domid()
        assert domid is not None
        be = backend(b, domid)
        assert be["params"] == dev and be["hotplug-status"] == "connected", be
        # what the kernel shows on b: no holder, and an exclusive open succeeds while blkback
        # has the device open (the checks dmmig had until now)
        dm = b.run(["readlink", "-f", dev]).out.strip().rsplit("/", 1)[-1]
        assert b.run(["ls", f"/sys/block/{dm}/holders"]).out.split() == []
        b.py("import os, sys; os.close(os.open(sys.argv[1], os.O_RDWR | os.O_EXCL))", dev)
        before = (a.run(["dmsetup", "table"]).out, b.run(["dmsetup", "table"]).out,
                  b.sh(f"ls {STATE} 2>/dev/null; true", check=False).out)
        r = a.run(migrate_argv(name, "--dry-run"), check=False, timeout=300)
        assert r.rc == 3, r
        assert f"used by domain {name}-b (domid {domid}) through its vbd backend 51712" in r.err, r.err
        assert "Traceback" not in r.err
        after = (a.run(["dmsetup", "table"]).out, b.run(["dmsetup", "table"]).out,
                 b.sh(f"ls {STATE} 2>/dev/null; true", check=False).out)
        assert after == before, "the refused plan changed something"
        entry = json.loads(a.run(["cat", f"{STATE}/{disk}.json"]).out)
        assert entry["phase"] == "wrapped", entry
    finally:
        b.run(["xl", "destroy", f"{name}-b"], check=False)
        clean_up(a, b, name, disk, img, dm=name)
