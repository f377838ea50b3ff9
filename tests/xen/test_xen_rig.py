"""The Xen rig itself, driven by libxl: a PVH guest writes through blkback and the stock block
script, and plain `xl migrate` moves a running guest between two Xen hosts over ssh. Later
tests (block-dmmig, dmmig migrate, the handover gate) build on these fixtures and helpers."""
from __future__ import annotations

import time
from typing import Any

import pytest

from tests.xenrig import pattern
from tests.xenrig.domu import DomU, backend, check_disk
from tests.xenrig.host import XenHost
from tests.xenrig.pair import B_IP, XenPair

pytestmark = pytest.mark.xen




def test_guest_writes_through_blkback_and_dom0_reads_it_back(xen_host: XenHost, xen_report: dict[str, Any]) -> None:
    h, name, seed = xen_host, "xrone", 4711
    img = f"/dev/shm/{name}.img"
    h.run(["truncate", "-s", "64M", img])
    # a plain file: libxl picks the phy backend and the stock block script sets up the loop device
    vm = DomU(h, name, disk=f"format=raw,vdev=xvda,access=rw,target={img}",
              job=["pattern", str(seed), "/dev/xvda", "16", "512"])
    try:
        t0 = time.monotonic()
        create_s = vm.create()
        domid = vm.domid()
        assert domid is not None
        vm.wait_console(r"XENRIG-DOMU up job=pattern\S* xvda=yes", timeout=120)
        # what libxl and the stock block script left in XenStore (state 4: blkfront connected)
        be = backend(h, domid)
        assert be["hotplug-status"] == "connected" and be["state"] == "4", be
        assert be["params"] == img and be["physical-device-path"].startswith("/dev/loop"), be
        vm.wait_console(rf"XENRIG-PATTERN seed={seed} start=16 count=512", timeout=120)
        written_s = time.monotonic() - t0
        vm.destroy()
        assert vm.domid() is None
        # the block script's remove released the loop device
        assert h.run(["losetup", "-j", img]).out.strip() == ""
        ok = check_disk(h, "check", img, str(seed), "16", "512")
        assert ok["ok"], ok
        # the check is not blind: another seed, or blocks the guest never wrote, do not pass
        assert not check_disk(h, "check", img, str(seed + 1), "16", "4")["ok"]
        assert not check_disk(h, "check", img, str(seed), "0", "16")["ok"]
        xen_report["one host: xl create s / guest wrote its pattern s after create"] = (
            round(create_s, 1), round(written_s, 1))
    finally:
        h.run(["xl", "destroy", name], check=False)
        h.run(["rm", "-f", img], check=False)


@pytest.mark.parametrize("script", ["stock", "block-dmmig"])
def test_plain_xl_migrate_moves_a_running_guest(xen_pair: XenPair, xen_report: dict[str, Any], script: str) -> None:
    """The baseline for dmmig migrate's downtime: the guest of tests/xen/test_dmmig_migrate.py
    with the same 200 ms beat, but it only ticks: its disk needs no copy (each host has its own
    zeroed file, which a write would make differ), through the stock block script or through
    block-dmmig without any dmmig migration (an operator who copies disks by other means and
    runs xl migrate himself)."""
    assert xen_pair.a is not None and xen_pair.b is not None
    # a name per case: xenconsoled's logs on b (named after the guest) outlive the guest
    a, b, name, seed = xen_pair.a, xen_pair.b, f"xrmig-{script}", 99
    img = f"/dev/shm/{name}.img"
    for h in (a, b):
        h.run(["truncate", "-s", "64M", img])
        if script == "block-dmmig":
            h.install_block_script()
    spec = "format=raw," if script == "stock" else "script=block-dmmig,"
    vm = DomU(a, name, disk=f"{spec}vdev=xvda,access=rw,target={img}",
              job=["workload", str(seed), "-", "0", "0", "200"])
    try:
        residual = xen_pair.sync_clocks()
        assert abs(residual["offset_ns"]) < 20_000_000, residual
        vm.create()
        vm.wait_console(r"XENRIG-ACK 30 ", timeout=180)
        t = time.monotonic()
        # -e: see DomU.create (xl's monitoring daemon); ssh to b uses the run's keys
        r = a.run(["xl", "migrate", "-e", name, B_IP], timeout=600, check=False)
        if r.rc != 0:
            pytest.fail(f"xl migrate failed (rc {r.rc}):\n{r.out}\n{r.err}\n{vm.diagnose(a)}")
        migrate_s = time.monotonic() - t
        assert vm.domid(a) is None and vm.domid(b) is not None
        last_on_a = max(x.seq for x in pattern.acks(vm.console(a)))
        # alive on b: it goes on counting from where it stopped
        vm.wait_console(rf"XENRIG-ACK {last_on_a + 30} ", host=b, timeout=180)
        on_a, on_b = pattern.acks(vm.console(a)), pattern.acks(vm.console(b))
        assert min(x.seq for x in on_b) <= last_on_a + 1
        gap = pattern.largest_gap(pattern.merge(on_a, on_b))
        assert last_on_a - 5 <= gap.after_seq <= last_on_a + 5, (gap, last_on_a)
        vm.destroy(b)
        xen_report[f"plain xl migrate ({script} disk not copied, 128 MiB guest): total s"] = round(migrate_s, 1)
        xen_report[f"plain xl migrate ({script}): guest-visible downtime ms (wall, monotonic)"] = (
            round(gap.real_ms), round(gap.mono_ms))
        xen_report["dom0 clock offset after sync (ns, rtt ns)"] = (residual["offset_ns"], residual["rtt_ns"])
    finally:
        for h in (a, b):
            h.run(["xl", "destroy", name], check=False)
            h.run(["rm", "-f", img], check=False)
