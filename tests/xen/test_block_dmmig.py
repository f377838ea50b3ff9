"""hotplug/block-dmmig driven by libxl itself on real Xen: `xl create` of a PVH guest whose disk
is `script=block-dmmig,target=...` makes libxl run the script's add (blkback then serves the
guest from /dev/mapper/dmmig-NAME), `xl destroy` runs its remove; every refusal fails
`xl create` with the script's hotplug-error."""
from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.rig.uml import ROOT
from tests.xenrig.domu import DomU, backend, check_disk
from tests.xenrig.host import XenHost

pytestmark = pytest.mark.xen
PY = str(ROOT / ".venv" / "bin" / "python")
HOTPLUG_LOG = "/var/log/xen/xen-hotplug.log"



@pytest.fixture
def host(xen_host: XenHost) -> Iterator[XenHost]:
    """xen_host with block-dmmig installed (dom0's /etc is a tmpfs overlay); afterwards nothing
    of dmmig may be left: no dmmig-* device, no journal entry, no loop device over /dev/shm."""
    xen_host.install_block_script()
    yield xen_host
    assert dmmig_devices(xen_host) == []
    assert journal_names(xen_host) == []


def dmmig_devices(h: XenHost) -> list[str]:
    out = h.run(["dmsetup", "ls"]).out
    return sorted(ln.split()[0] for ln in out.splitlines() if ln.startswith("dmmig-"))


@functools.cache
def state_dir(h: XenHost) -> str:
    """The journal directory block-dmmig uses: libxl runs it with xl's environment (the rig's
    agent sets DMMIG_STATE_DIR), so ask dmmig itself, in dom0."""
    return h.py("from dmmig.core.journal import state_dir; print(state_dir())").out.strip()


def journal_names(h: XenHost) -> list[str]:
    r = h.sh(f"ls {state_dir(h)} 2>/dev/null", check=False)
    return sorted(f for f in r.out.split() if f.endswith(".json"))



def hotplug_log(h: XenHost) -> str:
    return h.sh(f"cat {HOTPLUG_LOG} 2>/dev/null", check=False).out



def devno_hex(h: XenHost, path: str) -> str:
    return h.run(["stat", "-L", "-c", "%t:%T", path]).out.strip()


def _failed_create(h: XenHost, name: str, target: str) -> tuple[str, str]:
    """xl create of a guest with block-dmmig on TARGET, expected to fail: (xl's output, the
    lines block-dmmig added to xen-hotplug.log)."""
    vm = DomU(h, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={target}")
    h.run(["mkdir", "-p", "/run/xenrig"])
    h.write_file(vm.cfg_path, vm.config())
    before = len(hotplug_log(h))
    t = time.monotonic()
    r = h.run(["xl", "create", "-e", vm.cfg_path], check=False, timeout=120)
    took = time.monotonic() - t
    assert r.rc != 0, r
    assert took < 60, took  # inside libxl's 40 s hotplug timeout, not killed by it
    assert vm.domid() is None
    out = r.out + r.err
    # the script's own non-zero exit, as libxl saw it (not a timeout, not a crash)
    assert re.search(r"block-dmmig add \[\d+\] exited with error status [1-9]", out), out
    return out, hotplug_log(h)[before:]


def test_block_dmmig_guest_writes_through_the_top_device(host: XenHost, xen_report: dict[str, Any]) -> None:
    h, name, seed = host, "xrbd", 5150
    img = f"/dev/shm/{name}.img"
    h.run(["truncate", "-s", "64M", img])
    loop = h.run(["losetup", "--find", "--show", img]).out.strip()
    disk = loop.removeprefix("/dev/")          # the NAME block-dmmig derives: /dev/loopN -> loopN
    top = f"/dev/mapper/dmmig-{disk}"
    vm = DomU(h, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={loop}",
              job=["pattern", str(seed), "/dev/xvda", "16", "512"])
    try:
        # for comparison: a guest on the same loop device through Xen's stock block script
        stock = DomU(h, f"{name}s", disk=f"format=raw,vdev=xvda,access=rw,target={loop}")
        stock_s = stock.create()
        stock.destroy()
        log_before = len(hotplug_log(h))
        create_s = vm.create()
        domid = vm.domid()
        assert domid is not None
        be = backend(h, domid)
        assert be["params"] == loop and be["script"] == "/etc/xen/scripts/block-dmmig", be
        assert be["hotplug-status"] == "connected", be
        assert be["physical-device-path"] == top, be
        # hex major:minor without 0x, what blkback scans, and the top device's, not the loop's
        assert be["physical-device"] == devno_hex(h, top) != devno_hex(h, loop), be
        assert re.fullmatch(r"[0-9a-f]+:[0-9a-f]+", be["physical-device"]), be
        major, minor = (int(x, 16) for x in be["physical-device"].split(":"))
        # linear over the origin, held open by blkback
        table = h.run(["dmsetup", "table", f"dmmig-{disk}"]).out.split()
        loop_devno = h.run(["stat", "-L", "-c", "%Hr:%Lr", loop]).out.strip()  # decimal, as dmsetup shows it
        assert table[2:5] == ["linear", loop_devno, "0"], table
        info = h.run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor,open", f"dmmig-{disk}"]).out
        assert [int(x) for x in info.split(":")] == [major, minor, 1], info
        entry = json.loads(h.run(["cat", f"{state_dir(h)}/{disk}.json"]).out)
        assert entry["phase"] == "wrapped" and entry["origin"] == loop, entry
        vm.wait_console(r"XENRIG-DOMU up job=pattern\S* xvda=yes", timeout=120)
        assert backend(h, domid)["state"] == "4"  # blkfront connected to it
        vm.wait_console(rf"XENRIG-PATTERN seed={seed} start=16 count=512", timeout=120)
        t = time.monotonic()
        vm.destroy()
        destroy_s = time.monotonic() - t
        assert vm.domid() is None
        # remove unwrapped: no top device, no journal entry (the fixture checks both again);
        # the loop device is the test's own and stays
        assert dmmig_devices(h) == [] and journal_names(h) == []
        assert h.run(["losetup", "-j", img]).out.startswith(loop + ":")
        ok = check_disk(h, "check", loop, str(seed), "16", "512")
        assert ok["ok"], ok
        # the check is not blind: another seed, or blocks the guest never wrote, do not pass
        assert not check_disk(h, "check", loop, str(seed + 1), "16", "4")["ok"]
        assert not check_disk(h, "check", loop, str(seed), "0", "16")["ok"]
        log = hotplug_log(h)[log_before:]
        assert re.search(rf"block-dmmig: add backend/vbd/{domid}/51712: {loop} wrapped as {top}", log), log
        assert re.search(rf"block-dmmig: remove backend/vbd/{domid}/51712: unwrapped dmmig-{disk}", log), log
        xen_report["xl create s: block-dmmig / stock block script (same loop device)"] = (
            round(create_s, 1), round(stock_s, 1))
        xen_report["block-dmmig: xl destroy s"] = round(destroy_s, 1)
    finally:
        for n in (name, f"{name}s"):
            h.run(["xl", "destroy", n], check=False)
        h.run(["dmsetup", "remove", f"dmmig-{disk}"], check=False)
        h.run(["rm", "-f", f"{state_dir(h)}/{disk}.json"], check=False)
        h.run(["losetup", "-d", loop], check=False)
        h.run(["rm", "-f", img], check=False)


def test_block_dmmig_file_target_gets_a_loop_device_that_remove_detaches(host: XenHost,
                                                                          xen_report: dict[str, Any]) -> None:
    h, name = host, "xrbdf"
    img = f"/dev/shm/{name}.img"
    disk = f"shm-{name}.img"  # /dev/shm/xrbdf.img -> shm-xrbdf.img
    h.run(["truncate", "-s", "32M", img])
    vm = DomU(h, name, disk=f"vdev=xvda,access=rw,script=block-dmmig,target={img}")
    try:
        vm.create()
        domid = vm.domid()
        assert domid is not None
        be = backend(h, domid)
        loops = h.run(["losetup", "-j", img]).out.splitlines()
        assert len(loops) == 1, loops
        loop = loops[0].split(":")[0]
        assert be["node"] == loop and be["hotplug-status"] == "connected", be
        assert be["physical-device-path"] == f"/dev/mapper/dmmig-{disk}", be
        assert be["physical-device"] == devno_hex(h, f"/dev/mapper/dmmig-{disk}"), be
        # a second domain on the same disk is refused, and the remove libxl runs for its
        # failed disk leaves the first domain's device alone
        out, _ = _failed_create(h, f"{name}2", img)
        assert f"script: block-dmmig: dmmig-{disk} (target {img}) is already open (1 opener(s))" in out, out
        ours = ("node", "physical-device", "physical-device-path", "hotplug-status")
        after = backend(h, domid)
        assert dmmig_devices(h) == [f"dmmig-{disk}"] and {k: after[k] for k in ours} == {k: be[k] for k in ours}
        assert h.run(["losetup", "-j", img]).out.splitlines() == loops
        vm.destroy()
        assert h.run(["losetup", "-j", img]).out.strip() == ""
    finally:
        for n in (name, f"{name}2"):
            h.run(["xl", "destroy", n], check=False)
        h.run(["dmsetup", "remove", f"dmmig-{disk}"], check=False)
        h.run(["rm", "-f", f"{state_dir(h)}/{disk}.json"], check=False)
        h.sh(f"losetup -j {img} | cut -d: -f1 | xargs -r -n1 losetup -d", check=False)
        h.run(["rm", "-f", img], check=False)


def test_block_dmmig_by_hand_add_twice_then_remove(host: XenHost, xen_report: dict[str, Any]) -> None:
    """The installed script run as libxl runs it, against a backend directory of a domain that
    does not exist (blkback watches only dom0's own backend/ and never sees it): the real
    XenStore adapter, the "called twice" bail-out, and how long add and remove take."""
    h = host
    img, base = "/dev/shm/xrbdh.img", "/local/domain/4242/backend/vbd/1/51712"
    env = {"XENBUS_PATH": base, "XENBUS_TYPE": "vbd"}
    script = "/etc/xen/scripts/block-dmmig"
    h.run(["truncate", "-s", "16M", img])
    loop = h.run(["losetup", "--find", "--show", img]).out.strip()
    disk = loop.removeprefix("/dev/")
    try:
        h.run(["xenstore-write", f"{base}/params", loop, f"{base}/mode", "w"])
        t = time.monotonic()
        r = h.run([script, "add"], env=env, check=False)
        add_s = time.monotonic() - t
        assert r.rc == 0, r
        assert f"block-dmmig: add {base}: {loop} wrapped as /dev/mapper/dmmig-{disk}" in r.err, r
        keys = {k: h.run(["xenstore-read", f"{base}/{k}"]).out.strip()
                for k in ("physical-device", "physical-device-path", "hotplug-status")}
        assert keys == {"physical-device": devno_hex(h, f"/dev/mapper/dmmig-{disk}"),
                        "physical-device-path": f"/dev/mapper/dmmig-{disk}", "hotplug-status": "connected"}, keys
        # called twice: nothing changes, success
        r = h.run([script, "add"], env=env, check=False)
        assert r.rc == 0 and "called twice" in r.err, r
        assert dmmig_devices(h) == [f"dmmig-{disk}"]
        t = time.monotonic()
        r = h.run([script, "remove"], env=env, check=False)
        remove_s = time.monotonic() - t
        assert r.rc == 0 and f"unwrapped dmmig-{disk}" in r.err, r
        assert dmmig_devices(h) == [] and journal_names(h) == []
        assert h.run(["losetup", "-j", img]).out.startswith(loop + ":")  # not ours: stays
        xen_report["block-dmmig run by hand: add s / remove s"] = (round(add_s, 1), round(remove_s, 1))
    finally:
        h.run(["xenstore-rm", "/local/domain/4242"], check=False)
        h.run(["dmsetup", "remove", f"dmmig-{disk}"], check=False)
        h.run(["rm", "-f", f"{state_dir(h)}/{disk}.json"], check=False)
        h.run(["losetup", "-d", loop], check=False)
        h.run(["rm", "-f", img], check=False)


def test_block_dmmig_refusals_fail_xl_create_with_hotplug_error(host: XenHost) -> None:
    h = host
    # a target that does not exist
    out, log = _failed_create(h, "xrbdmiss", "/dev/shm/no-such-disk")
    want = "target /dev/shm/no-such-disk does not exist"
    # libxl logs hotplug-error ("script: ...") and the script's own line reaches the log
    assert re.search(rf"script: block-dmmig: {want}", out), out
    assert re.search(rf"block-dmmig: add backend/vbd/\d+/51712: error: {want}", log), log
    # libxl then runs remove for the failed disk: it finds nothing of its own to undo
    assert re.search(r"block-dmmig: remove backend/vbd/\d+/51712: this backend was never connected", log), log

    # not an absolute path
    out, log = _failed_create(h, "xrbdrel", "vg0/vm1")
    assert "script: block-dmmig: target 'vg0/vm1' is not an absolute path" in out, out

    # a device already held by another dm device
    img = "/dev/shm/xrbdheld.img"
    h.run(["truncate", "-s", "16M", img])
    loop = h.run(["losetup", "--find", "--show", img]).out.strip()
    try:
        h.run(["dmsetup", "create", "xrheld", "--table", f"0 32768 linear {loop} 0"])
        out, log = _failed_create(h, "xrbdheld", loop)
        assert f"script: block-dmmig: {loop} is already held by xrheld" in out, out
    finally:
        h.run(["dmsetup", "remove", "xrheld"], check=False)
        h.run(["losetup", "-d", loop], check=False)
        h.run(["rm", "-f", img], check=False)
    # nothing left behind: the fixture checks dm devices and the journal
