"""`dmmig migrate`'s plan without Xen or root: which disks it moves, what it refuses before
anything changes, and xl's options. XenStore is the in-memory adapter, device-mapper and xl
answer through the fake runner, and the destination is the real agent's probe, in-process,
over files in tmp_path (the whole flow runs on real Xen in tests/xen)."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.xl import Xl, XlRun, check_migrate_args
from dmmig.core import journal
from dmmig.errors import BadInput, MissingDependency, StateError
from dmmig.flows import migrate_domain
from dmmig.flows.domain import vbds
from tests.unit.fakes import DOMID, INFO, MIB, FakeRunner, MemXenStore, World, fake_nbd_devices, tools_on_path, vbd_keys


def test_plan_of_one_managed_disk(world: World) -> None:
    name = world.disk()
    p = world.plan()
    assert (p.domain.domid, p.domain.name) == (DOMID, "vm1")
    [d] = p.disks
    assert (d.name, d.vbd.vdev, d.size, d.phase, d.dest_disk) == (name, "xvda", 8 * MIB, journal.WRAPPED, d.vbd.params)
    text = p.render()
    assert "linear 7:1 0" in text and "era <metadata loop> 7:1 128" in text
    # the plan shows the mirror set cutover loads: 8 MiB in 64 KiB regions, 16 parts of 8 regions
    assert re.search(r"0 1024 mirror disk 2 <log 0> 128 2 <dmmig-\S+-era> 0 <nbd leg> 0 2 handle_errors keep_log", text)
    assert re.search(r"15360 1024 mirror disk 2 <log 15> 128 2 <dmmig-\S+-era> 15360 <nbd leg> 15360 2", text)
    assert "16 dm-mirror targets side by side" in text
    assert world.mutating() == []  # the plan changed nothing here...
    assert world.agent.calls == ["probe", "probe_tunnel"]  # ...nor there
    assert not (world.tmp / "dstate").exists() or not list((world.tmp / "dstate").iterdir())
    # the mirror leg's tunnel as probed: --dry-run shows it, the migration uses it
    assert (p.transport, p.tunnel) == ("ssh", "relay")
    assert "mirror leg tunnel: relay (streamlocal forwarding refused)" in text, text


def test_plan_takes_the_tunnel_the_operator_chose_without_probing(world: World) -> None:
    world.disk()
    from dmmig.flows import session
    p = world.plan(copy=session.CopyOptions(tunnel="forward"))
    assert p.tunnel == "forward" and world.agent.calls == ["probe"]
    world.agent.calls.clear()
    p = world.plan(copy=session.CopyOptions(transport="nbd", nbd_address="192.0.2.2"))
    assert p.tunnel is None and world.agent.calls == ["probe"] and "NBD over TCP" in p.render()


def test_plan_shows_the_block_size_and_refuses_a_bad_one(world: World) -> None:
    name = world.disk()
    text = world.plan(block_bytes=1 << 20).render()
    assert "era <metadata loop> 7:1 2048" in text and "mirror disk 2 <log 0> 2048 2" in text
    with pytest.raises(BadInput, match="power of two"):
        world.plan(block_bytes=96 << 10)
    # a disk prepared already keeps its era block, whatever the option says
    entry = world.stack.journal.load(name)
    assert entry is not None
    entry.block_sectors = 256
    world.stack.journal.save(entry, journal.PREPARED)
    text = world.plan(block_bytes=1 << 20).render()
    assert "mirror disk 2 <log 0> 256 2" in text and "era <metadata" not in text
    assert world.mutating() == []


def test_plan_by_domid(world: World) -> None:
    world.disk()
    assert world.plan(str(DOMID)).domain.name == "vm1"


def test_unknown_domain_and_dom0_refused(world: World) -> None:
    with pytest.raises(BadInput, match="no domain 'x'"):
        world.plan("x")
    world.runner.rules.insert(0, (["xl", "domname", "0"], (0, "Domain-0\n", "")))
    with pytest.raises(BadInput, match="domain 0"):
        world.plan("0")


def test_no_managed_disk_refused(world: World) -> None:
    world.xs.data.update(vbd_keys(51712, "xvda", "/dev/vg0/x", script="/etc/xen/scripts/block", mode="r"))
    with pytest.raises(BadInput, match="none of vm1's disks uses block-dmmig or is an LV dmmig can adopt"):
        world.plan()
    # a writable one that is not an LV dmmig can adopt: why not (tests/unit/test_migrate_adopt.py)
    world.xs.data.update(vbd_keys(51728, "xvdb", "/dev/vg0/y", script="/etc/xen/scripts/block"))
    with pytest.raises(BadInput, match=r"can neither move nor adopt: xvdb \(/dev/vg0/y\)"):
        world.plan()


def test_unmanaged_writable_disk_refused_unless_shared(world: World) -> None:
    world.disk()
    world.xs.data.update(vbd_keys(51728, "xvdb", "/dev/vg0/data", script="/etc/xen/scripts/block"))
    world.xs.data.update(vbd_keys(51744, "xvdc", "/srv/iso/d.iso", script="/etc/xen/scripts/block", mode="r"))
    with pytest.raises(BadInput, match=r"xvdb \(/dev/vg0/data\)") as e:
        world.plan()
    assert "xvdc" not in e.value.message  # a read-only disk cannot diverge
    p = world.plan(shared_ok=True)
    assert [v.vdev for v in p.others] == ["xvdb", "xvdc"]
    assert "xvdb: /dev/vg0/data" in p.render() and "not moved by dmmig" in p.render()


def test_driver_domain_backend_refused(world: World) -> None:
    world.xs.data.update(vbd_keys(51712, "xvda", "/dev/vg0/x", backend_dom=3))
    with pytest.raises(BadInput, match="driver domain"):
        world.plan()


def test_missing_stack_and_repointed_disk_refused(world: World) -> None:
    world.xs.data.update(vbd_keys(51712, "xvda", "/dev/vg0/nothere"))
    with pytest.raises(StateError, match="dmmig-vg0-nothere or its journal entry is missing"):
        world.plan()
    world.xs.data.clear()
    world.disk()
    be = f"/local/domain/0/backend/vbd/{DOMID}/51712"
    world.xs.data[f"{be}/physical-device"] = "8:1"
    with pytest.raises(StateError, match="blkback serves 8:1"):
        world.plan()


def test_destination_checks(world: World) -> None:
    world.disk()
    (world.dest_dir / "d1").unlink()
    with pytest.raises(BadInput, match="does not exist") as e:
        world.plan()
    assert e.value.hint == "create it, or pass --create"
    world.opts.copy.create = True
    assert not world.plan().disks[0].dest_exists
    (world.dest_dir / "d1").write_bytes(b"\0" * 4096)
    with pytest.raises(BadInput, match="smaller"):
        world.plan()
    world.script.chmod(0o644)
    with pytest.raises(BadInput, match="no executable"):
        world.plan()


def loop_over(path: Path, name: str = "/dev/loop9", devno: str = "7:9") -> FakeRunner:
    """losetup --list --json as util-linux 2.38.1 prints it: MAJ:MIN fields padded with spaces."""
    st = os.stat(path)
    listing = {"loopdevices": [{"name": name, "maj:min": f"  {devno}  ",
                                "back-maj:min": f"       {os.major(st.st_dev)}:{os.minor(st.st_dev)} ",
                                "back-ino": st.st_ino, "offset": 0}]}
    return FakeRunner([(["losetup", "--list"], (0, json.dumps(listing, indent=3), ""))])


def test_destination_in_use_refused(world: World) -> None:
    world.disk()
    world.agent.server.r = world.agent.server.loop.r = loop_over(world.dest_dir / "d1")
    with pytest.raises(BadInput, match="a loop device is over it: /dev/loop9"):
        world.plan()


def test_destination_a_local_domain_uses_is_refused(world: World) -> None:
    """blkback opens its device without O_EXCL and registers no holder: the destination's
    XenStore names the domain. Here a file behind a loop device (the stock block script's
    way), found by the loop device's number (physical-device) and by params."""
    world.disk()
    f = world.dest_dir / "d1"
    world.agent.server.r = world.agent.server.loop.r = loop_over(f, "/dev/loop5", "7:5")
    be = "/local/domain/0/backend/vbd/3/51712"
    world.dest_xs.data.update({"/local/domain/3/name": "other", f"{be}/params": "/elsewhere",
                               f"{be}/physical-device": "7:5"})
    with pytest.raises(BadInput, match=r"used by domain other \(domid 3\) through its vbd backend 51712"):
        world.plan()
    world.agent.server.r = world.agent.server.loop.r = FakeRunner()  # no loop device: params names the file
    world.dest_xs.data[f"{be}/physical-device"] = "ca:1"
    world.dest_xs.data[f"{be}/params"] = str(f)
    with pytest.raises(BadInput, match="domain other"):
        world.plan()
    # a qdisk backend (qemu): params "raw:PATH"
    world.dest_xs.data.clear()
    world.dest_xs.data.update({"/local/domain/4/name": "hvm1",
                               "/local/domain/0/backend/qdisk/4/768/params": f"raw:{f}"})
    with pytest.raises(BadInput, match="domain hvm1 \\(domid 4\\) through its qdisk backend 768"):
        world.plan()
    world.dest_xs.data.clear()
    world.plan()


def test_destination_outside_the_agents_confinement_is_refused_at_plan_time(world: World) -> None:
    name = world.disk()
    world.xs.data[f"/local/domain/0/backend/vbd/{DOMID}/51712/params"] = "/etc/passwd"
    world.runner.rules.insert(0, (["dmsetup", "table", "dmmig-etc-passwd"],
                                  (0, f"0 {8 * MIB // 512} linear 7:1 0\n", "")))
    world.runner.rules.insert(0, (INFO + ["dmmig-etc-passwd"], (0, "dmmig-etc-passwd;253;4;L--w;1;1;0;x\n", "")))
    world.stack.journal.save(journal.Entry("etc-passwd", "/dev/loop1", "7:1"), journal.WRAPPED)
    assert name != "etc-passwd"
    with pytest.raises(BadInput, match="/etc/passwd is not under this agent's file roots"):
        world.plan()


def test_destination_with_another_logical_block_size_is_refused(world: World) -> None:
    world.disk()
    world.xs.data[f"/local/domain/0/backend/vbd/{DOMID}/51712/sector-size"] = "4096"
    with pytest.raises(BadInput, match="logical block size of 512 bytes, .* 4096"):
        world.plan()


def test_vbds_reads_backend_keys() -> None:
    xs = MemXenStore(vbd_keys(51712, "xvda", "/srv/a.img", node="/dev/loop3")
                     | vbd_keys(768, "hda", "/dev/sdb", script="", mode="r"))
    got = vbds(xs, DOMID)
    assert [(v.devid, v.vdev, v.managed, v.writable, v.node) for v in got] == [
        ("768", "hda", False, False, ""), ("51712", "xvda", True, True, "/dev/loop3")]
    assert got[1].name == "srv-a.img" and got[1].local_backend


@pytest.mark.parametrize("what", ["elsewhere", "deleted", "another-domain-disk"])
def test_the_guests_frontend_nodes_change_nothing_in_the_plan(world: World, what: str) -> None:
    """The guest owns /local/domain/DOMID/device/vbd/*: pointing its 'backend' node at another
    domain's disk, or deleting it to hide an unmanaged writable disk, must not change which
    disks are moved or checked."""
    name = world.disk()
    world.xs.data.update(vbd_keys(51728, "xvdb", "/dev/vg0/data", script="/etc/xen/scripts/block"))
    # another domain (domid 9) with a block-dmmig disk of its own
    other = "/local/domain/0/backend/vbd/9/51712"
    world.xs.data.update({f"{other}/params": "/dev/vg0/victim", f"{other}/script": "/etc/xen/scripts/block-dmmig",
                          f"{other}/mode": "w", f"{other}/frontend-id": "9", f"{other}/dev": "xvda"})
    before = world.plan(shared_ok=True)
    fe = f"/local/domain/{DOMID}/device/vbd"
    if what == "deleted":
        for k in [k for k in world.xs.data if k.startswith(fe)]:
            del world.xs.data[k]
    else:
        target = other if what == "another-domain-disk" else "/local/domain/0/backend/vbd/9/99"
        world.xs.data[f"{fe}/51712/backend"] = target
        world.xs.data[f"{fe}/51728/backend"] = target
    after = world.plan(shared_ok=True)
    assert [d.name for d in after.disks] == [d.name for d in before.disks] == [name]
    assert [(v.vdev, v.backend) for v in after.others] == [(v.vdev, v.backend) for v in before.others]
    with pytest.raises(BadInput, match="xvdb"):  # the unmanaged writable disk is still seen
        world.plan(shared_ok=False)


def test_a_libxl_record_naming_another_domains_backend_is_refused(world: World) -> None:
    world.disk()
    world.xs.data[f"/libxl/{DOMID}/device/vbd/51712/backend"] = "/local/domain/0/backend/vbd/9/51712"
    with pytest.raises(StateError, match="not a backend of this domain's disk"):
        world.plan()
    world.xs.data[f"/libxl/{DOMID}/device/vbd/51712/backend"] = f"/local/domain/0/backend/vbd/{DOMID}/51712"
    world.xs.data[f"/local/domain/0/backend/vbd/{DOMID}/51712/frontend-id"] = "9"
    with pytest.raises(StateError, match="serves domain 9"):
        world.plan()


@pytest.mark.parametrize("args,out", [
    ([], []),
    (["-s", "ssh -p 2222", "-e"], ["-s", "ssh -p 2222", "-e"]),
    (["-sssh -p 2", "--debug", "-C", "/etc/xen/vm1.cfg"], ["-s", "ssh -p 2", "--debug", "-C", "/etc/xen/vm1.cfg"]),
])
def test_xl_migrate_args(args: list[str], out: list[str]) -> None:
    assert check_migrate_args(args) == out


@pytest.mark.parametrize("args,msg", [(["-s"], "needs a value"), (["--colo"], "not an xl migrate option"),
                                      (["vm2"], "not an xl migrate option")])
def test_xl_migrate_args_refused(args: list[str], msg: str) -> None:
    with pytest.raises(BadInput, match=msg):
        check_migrate_args(args)


def fake_xl(tmp_path: Path, body: str) -> str:
    """An `xl` of the test's own: a real process, as xl migrate is one (dmmig waits for it)."""
    xl = tmp_path / "xl"
    xl.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\n{body}\n")
    xl.chmod(0o755)
    return str(xl)


def test_xl_migrate_argv_and_result(tmp_path: Path) -> None:
    xl = fake_xl(tmp_path, "echo 'migration sender: Target reported an error' >&2; exit 1")
    log = str(tmp_path / "xl.log")
    res = Xl(SubprocessRunner(), xl).migrate(7, "root@b", ["-s", "ssh -p 2"], 100, log)
    assert (tmp_path / "argv").read_text() == "migrate -s ssh -p 2 7 root@b\n"
    assert res.returncode == 1 and "Target reported" in res.output and res.seconds >= 0 and not res.overran
    assert not os.path.exists(log)  # read, then removed


def test_xl_migrate_is_never_killed(tmp_path: Path) -> None:
    """Before: at --xl-timeout the runner SIGKILLed xl, possibly mid-suspend, and nothing resumed
    the guest. Now dmmig stops waiting, xl runs on in its own session and ends on its own."""
    xl = fake_xl(tmp_path, f"echo $$ > {tmp_path}/pid; sleep 2; echo done; exit 0")
    log = str(tmp_path / "xl.log")
    t = time.monotonic()
    res = Xl(SubprocessRunner(), xl).migrate(7, "root@b", [], 0.5, log)
    assert res.overran and res.returncode is None and 0.5 <= time.monotonic() - t < 1.5
    pid = int((tmp_path / "pid").read_text())
    assert res.pid == pid and res.log == log
    assert os.getsid(pid) == pid  # its own session: a ^C at dmmig does not reach it either
    os.kill(pid, 0)  # still running, not killed
    deadline = time.monotonic() + 10
    while "done" not in (tmp_path / "xl.log").read_text():
        assert time.monotonic() < deadline, "xl did not finish on its own"
        time.sleep(0.1)


def test_xl_timeout_is_bounded(world: World) -> None:
    world.disk()
    for bad in (0, 59, 8 * 86400):
        with pytest.raises(BadInput, match="--xl-timeout must be 60..604800"):
            world.plan(xl_timeout=bad)
    world.plan(xl_timeout=60)


def test_an_overrun_says_where_xl_writes_and_what_to_do(world: World) -> None:
    name = world.disk()
    p = world.plan()
    err = migrate_domain._overran(p, XlRun(None, "", 3601.0, 4242, "/var/lib/dmmig/xl-migrate-7.log"), 3600)
    assert "pid 4242" in err.message and "did not stop it" in err.message and "xl-migrate-7.log" in err.message
    assert err.hint and "ps -p 4242" in err.hint and f"dmmig abort NAME` for each of {name}" in err.hint
    assert "dmmig finish --force --remove NAME" in err.hint and err.exit_code == 6


def test_destination_block_script_must_share_the_agents_state_dir(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Else the destination's add never sees the incoming migration and never asks the gate."""
    world.disk()
    monkeypatch.setenv("DMMIG_STATE_DIR", str(world.tmp / "elsewhere"))
    with pytest.raises(BadInput, match="would not ask the handover gate"):
        world.plan()


def test_cli_refuses_a_bad_block_size_before_it_looks_for_xenstored(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig.adapters import xenstore
    from dmmig.entry import cli
    monkeypatch.setattr(xenstore.PyxsXenStore, "__enter__", lambda self: pytest.fail("xenstored was asked"))
    assert cli.main(["migrate", "vm1", "root@b", "--block-size", "96K", "--", "-e"]) == 3
    assert "not a power of two" in capsys.readouterr().err


def test_nbd_timeout_is_checked_in_the_plan(world: World) -> None:
    """Before: refused by the cutover, after the whole copy."""
    world.disk()
    for bad in (0, 601):
        world.opts.cutover.nbd_timeout = bad
        with pytest.raises(BadInput, match="--nbd-timeout must be 1..600"):
            world.plan()
    world.opts.cutover.nbd_timeout = 10
    world.plan()


def test_a_block_larger_than_the_disk_is_refused_in_the_plan(world: World) -> None:
    """Before: prepare and the whole copy ran, then dm-mirror refused the region at cutover."""
    name = world.disk(size=8 * MIB)
    with pytest.raises(BadInput, match=r"xvda \(.*\): block size 16777216 bytes is larger than the disk"):
        world.plan(block_bytes=16 * MIB)
    entry = world.stack.journal.load(name)
    assert entry is not None
    entry.block_sectors = 32 * 2048  # prepared by an older dmmig with a 32 MiB block
    world.stack.journal.save(entry, journal.PREPARED)
    with pytest.raises(BadInput, match="larger than the disk"):
        world.plan(block_bytes=64 << 10)
    assert world.mutating() == []


@pytest.mark.parametrize("tool,transport", [("nbd-client", "ssh"), ("ssh", "ssh"), ("era_invalidate", "nbd"),
                                            ("dmsetup", "ssh")])
def test_a_tool_the_source_needs_later_is_refused_in_the_plan(world: World, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, tool: str,
                                                               transport: str) -> None:
    world.disk()
    world.opts.copy.transport = transport
    tools_on_path(tmp_path, monkeypatch, missing=(tool,))
    with pytest.raises(MissingDependency, match=f"^missing tool\\(s\\): {tool} \\(Debian package"):
        world.plan()
    assert world.agent.calls == []  # refused before the destination was even asked


def test_ssh_is_not_needed_with_the_nbd_transport(world: World, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    world.disk()
    world.opts.copy.transport = "nbd"
    world.opts.copy.nbd_address = "192.0.2.2"
    tools_on_path(tmp_path, monkeypatch, missing=("ssh",))
    world.plan()


def test_a_missing_mirror_target_is_refused_in_the_plan(world: World) -> None:
    world.disk()
    world.runner.rules.insert(0, (["dmsetup", "targets"], (0, "era v1.0.0\nlinear v1.4.0\n", "")))
    with pytest.raises(MissingDependency, match="target\\(s\\) missing from the kernel: mirror"):
        world.plan()


def test_qemu_nbd_missing_on_the_destination_is_refused_in_the_plan(world: World, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    world.disk()
    orig = world.agent.server.op_probe

    def probe(**kw: Any) -> dict[str, Any]:  # the destination: this PATH without qemu-nbd
        tools_on_path(tmp_path, monkeypatch, missing=("qemu-nbd",))
        try:
            return orig(**kw)
        finally:
            tools_on_path(tmp_path, monkeypatch)
    world.agent.server.op_probe = probe  # type: ignore[method-assign]
    with pytest.raises(MissingDependency, match=r"on root@b: missing tool\(s\): qemu-nbd \(Debian package qemu-utils"):
        world.plan()


# `xl -N create CONFIG` prints libxl_domain_config_to_json (tools/xl/xl_vmcontrol.c; fields at
# their default are left out, tools/libs/light/gentypes.py). Captured from the Xen rig (xl 4.17,
# tests/xen/test_dmmig_migrate.py's -C test) for its guest; the disks are the test's own
XL_N_CREATE = """{
    "c_info": {
        "type": "pvh",
        "name": "xrcfg",
        "uuid": "7550028f-9c02-4a36-9786-5048e2396f1a",
        "run_hotplug_scripts": "True"
    },
    "b_info": {
        "max_vcpus": 1,
        "avail_vcpus": [
            0
        ],
        "tsc_mode": "native",
        "max_memkb": 131072,
        "target_memkb": 131072,
        "sched_params": {

        },
        "claim_mode": "True",
        "kernel": "/var/cache/dmmig-xenrig/1be7ec0cacad2462/domu-vmlinux.gz",
        "cmdline": "console=hvc0 loglevel=4 XENRIG_JOB=idle",
        "ramdisk": "/var/cache/dmmig-xenrig/1be7ec0cacad2462/domu.cpio.gz",
        "type.pvh": {

        },
        "arch_arm": {

        },
        "arch_x86": {

        }
    },
    "disks": [
%s
    ],
    "on_reboot": "restart",
    "on_crash": "preserve",
    "on_soft_reset": "soft_reset"
}
"""


def xl_disk(target: str, vdev: str, script: str = "block-dmmig", rw: bool = True) -> str:
    d = {"pdev_path": target, "vdev": vdev, "format": "raw", **({"script": script} if script else {}),
         **({"readwrite": 1} if rw else {})}
    return json.dumps(d, indent=4)


def test_a_config_whose_disks_differ_from_the_running_domain_is_refused(world: World) -> None:
    """Before: xl migrate -C sent the destination a config with other disks, unchecked."""
    world.disk()
    params = str(world.dest_dir / "d1")
    cfg = "/etc/xen/vm1.cfg"

    def plan_with(*disks: str) -> migrate_domain.Plan:
        world.runner.rules.insert(0, (["xl", "-N", "create", cfg], (0, XL_N_CREATE % ",\n".join(disks), "")))
        return world.plan(xl_args=["-C", cfg])

    plan_with(xl_disk(params, "xvda"))  # the domain's own disks: fine
    cases = [
        ((xl_disk("/dev/vg0/other", "xvda"),), f"xvda: target /dev/vg0/other in {cfg}, {params} running"),
        ((xl_disk(params, "xvda", script="block"),), "xvda: script block in /etc/xen/vm1.cfg, "
                                                      "/etc/xen/scripts/block-dmmig running"),
        ((xl_disk(params, "xvda", rw=False),), "xvda: read-only in /etc/xen/vm1.cfg, writable running"),
        ((xl_disk(params, "xvdb"),), "xvda .* is in the running domain but not in /etc/xen/vm1.cfg"),
        ((xl_disk(params, "xvda"), xl_disk("/dev/vg0/x", "xvdb")), "xvdb \\(/dev/vg0/x\\) is in /etc/xen/vm1.cfg"),
    ]
    for disks, msg in cases:
        with pytest.raises(BadInput, match=msg):
            plan_with(*disks)
    assert world.agent.calls == ["probe", "probe_tunnel"] and world.mutating() == []  # the first plan's
    world.runner.rules.insert(0, (["xl", "-N", "create", cfg], (1, "", "Failed to parse config: Invalid argument\n")))
    with pytest.raises(BadInput, match="xl cannot parse the config /etc/xen/vm1.cfg: Failed to parse"):
        world.plan(xl_args=["-C", cfg])


def test_a_qdisk_target_matches_its_format_prefixed_params(world: World) -> None:
    world.disk()
    params = str(world.dest_dir / "d1")
    world.xs.data.update(vbd_keys(51728, "xvdb", "raw:/srv/data.img", script="", mode="r"))
    world.runner.rules.insert(0, (["xl", "-N", "create", "c"], (0, XL_N_CREATE % ",\n".join(
        [xl_disk(params, "xvda"), xl_disk("/srv/data.img", "xvdb", script="", rw=False)]), "")))
    world.plan(xl_args=["-C", "c"])


@pytest.mark.parametrize("args,msg", [(["--nbd-timeout", "0"], "--nbd-timeout must be 1..600"),
                                      (["--xl-timeout", "10"], "--xl-timeout must be 60..604800")])
def test_cli_refuses_bad_timeouts_before_it_looks_for_xenstored(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 args: list[str], msg: str) -> None:
    from dmmig.adapters import xenstore
    from dmmig.entry import cli
    monkeypatch.setattr(xenstore.PyxsXenStore, "__enter__", lambda self: pytest.fail("xenstored was asked"))
    assert cli.main(["migrate", "vm1", "root@b", *args]) == 3
    assert msg in capsys.readouterr().err


# ---- issue 15 item 7: the plan checks what the cutover needs here ------------------------
def test_free_count_counts_detached_empty_nbd_devices_and_the_disks_own_legs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig.adapters import nbdkernel
    monkeypatch.setattr(nbdkernel, "UDEV_MARKS", str(tmp_path / "marks"))
    (tmp_path / "marks").mkdir()
    # nbd0 connected; nbd1 free; nbd2 detached but not empty (being set up or torn down)
    sys_block = fake_nbd_devices(tmp_path, 3, attached={0: 2048})
    (Path(sys_block) / "nbd2" / "size").write_text("2048\n")
    r = FakeRunner()
    k = nbdkernel.NbdKernel(r, sys_block=sys_block)
    assert k.free_count() == 1
    # nbd0 is the leg of a disk this migration cuts over again: its cutover drops it first
    (tmp_path / "marks" / "nbd0").write_text(nbdkernel.owner_of(str(tmp_path / "state"), "d1"))
    assert k.free_count([nbdkernel.owner_of(str(tmp_path / "state"), "d1")]) == 2
    assert k.free_count([nbdkernel.owner_of(str(tmp_path / "state"), "d2")]) == 1
    assert r.argvs == []  # the module is loaded: nothing run, nothing changed
    assert k._choose() == "/dev/nbd1"  # the same devices a choice would take


def test_plan_refuses_fewer_free_nbd_devices_than_disks(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig.adapters import nbdkernel
    from dmmig.errors import Busy, Exit
    monkeypatch.setattr(nbdkernel, "UDEV_MARKS", str(world.tmp / "marks"))
    (world.tmp / "marks").mkdir()
    name = world.disk()
    fake_nbd_devices(world.tmp, 4, attached={0: 2048, 1: 2048, 2: 2048, 3: 2048})
    with pytest.raises(Busy, match="1 disk needs 1 free nbd device here for its mirror leg, 0 are free") as e:
        world.plan()
    assert e.value.exit_code == Exit.BUSY and "nbds_max" in (e.value.hint or "")
    assert world.agent.calls == [] and world.mutating() == []  # refused before the destination is asked
    # a rerun: nbd3 is this disk's own leg from before, which its cutover drops first
    (world.tmp / "marks" / "nbd3").write_text(nbdkernel.owner_of(world.stack.journal.dir, name))
    world.plan()


def test_plan_refuses_a_host_without_the_nbd_module(world: World) -> None:
    from dmmig.errors import Exit
    world.disk()
    for d in Path(world.sys_block).iterdir():
        if d.name.startswith("nbd"):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    with pytest.raises(MissingDependency, match="the nbd module is missing") as e:
        world.plan()
    assert e.value.exit_code == Exit.MISSING_DEP
    assert ["modprobe", "nbd"] in world.runner.argvs and world.agent.calls == []


def test_plan_refuses_resync_parts_cutover_would_refuse(world: World) -> None:
    from dmmig.flows import cutover
    world.disk()
    for bad in (65, -1):
        with pytest.raises(BadInput, match=f"--resync-parts {bad}: 1..64"):
            world.plan(cutover=cutover.CutoverOptions(resync_parts=bad))
    assert world.agent.calls == []
    assert "64 dm-mirror targets" in world.plan(cutover=cutover.CutoverOptions(resync_parts=64)).render()


@pytest.mark.parametrize("transport,parts", [("ssh", None), ("nbd", None), ("ssh", 3)])
def test_plan_renders_the_table_cutover_loads(world: World, transport: str, parts: int | None) -> None:
    """The same function and Layout choice as cutover.cutover (parts: --resync-parts, else the
    default, 16 over both transports), with placeholders for the devices cutover makes."""
    from dmmig.core import mirrorlog
    from dmmig.flows import cutover, session
    name = world.disk()
    copy = session.CopyOptions(transport=transport, nbd_address="192.0.2.2" if transport == "nbd" else None)
    p = world.plan(copy=copy, cutover=cutover.CutoverOptions(resync_parts=parts))
    length, bs = 8 * MIB // 512, p.disks[0].estimate["block_bytes"] // 512
    layout = mirrorlog.Layout.choose(length, bs, max_parts=parts or 16)  # both transports
    want = cutover.mirror_table(layout, [f"<log {i}>" for i in range(layout.parts)], f"<dmmig-{name}-era>",
                                "<nbd leg>").render().splitlines()
    text = p.render()
    assert f"{layout.parts} dm-mirror targets side by side" in text
    shown = [ln.strip() for ln in text.splitlines()]
    for ln in (want if len(want) <= 3 else [want[0], want[-1]]):
        assert ln in shown, (ln, text)


def test_plan_refuses_private_dirs_cutover_or_copy_would_refuse(world: World,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig import names
    from dmmig.flows import session
    world.disk()
    # the mirror's log directory under a parent others may write to (not sticky): cutover's
    # private_dir would refuse it after the whole copy
    parent = world.tmp / "run"
    parent.mkdir()
    parent.chmod(0o777)
    monkeypatch.setattr(names, "RUN_DIR", str(parent / "dmmig"))
    with pytest.raises(StateError, match=f"{parent} is writable by others"):
        world.plan()
    parent.chmod(0o1777)  # sticky, as the rigs' /run: nobody else can rename ours away
    world.plan()
    assert not (parent / "dmmig").exists()  # checked, not made
    (parent / "dmmig").symlink_to(world.tmp)  # not a directory of ours
    with pytest.raises(StateError, match="dmmig is not a directory owned by uid"):
        world.plan()
    (parent / "dmmig").unlink()
    assert world.agent.calls.count("probe") == 1  # the refusals came before the destination was asked
    # --transport nbd: the TLS keys' directory in the state directory
    state = Path(world.stack.journal.dir)
    state.chmod(0o777)
    nbd = session.CopyOptions(transport="nbd", nbd_address="192.0.2.2")
    with pytest.raises(StateError, match=f"{state} is writable by others"):
        world.plan(copy=nbd)
    state.chmod(0o700)
    world.plan(copy=nbd)
    assert not list(state.glob("*.tls"))  # checked, not made


@pytest.mark.parametrize("tool,package", [("dmsetup", "dmsetup"), ("losetup", "mount")])
def test_the_block_scripts_tools_missing_on_the_destination_are_refused_in_the_plan(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str, package: str) -> None:
    """block-dmmig's add there wraps the disk in its dm top (a file through a loop device): without
    them xl migrate would fail at the very end, after every disk's copy and cutover."""
    world.disk()
    orig = world.agent.server.op_probe

    def probe(**kw: Any) -> dict[str, Any]:  # the destination: this PATH without TOOL
        tools_on_path(tmp_path, monkeypatch, missing=(tool,))
        try:
            return orig(**kw)
        finally:
            tools_on_path(tmp_path, monkeypatch)
    world.agent.server.op_probe = probe  # type: ignore[method-assign]
    with pytest.raises(MissingDependency, match=rf"on root@b: missing tool\(s\): {tool} \(Debian package {package}"):
        world.plan()


def test_a_destination_export_dir_private_dir_would_refuse_is_refused_in_the_plan(world: World) -> None:
    """The destination's export directory (its state dir's nbd/, where the sockets and TLS keys
    go), checked by the agent's probe as private_dir will check it at the first export."""
    world.disk()
    dstate = world.tmp / "dstate"
    dstate.mkdir(mode=0o777)
    dstate.chmod(0o777)
    with pytest.raises(StateError, match=f"on root@b: {dstate} is writable by others"):
        world.plan()
    dstate.chmod(0o700)
    world.plan()
    assert not (dstate / "nbd").exists()  # checked, not made
    (dstate / "nbd").symlink_to(world.tmp)
    with pytest.raises(StateError, match=f"on root@b: {dstate}/nbd is not a directory owned by uid"):
        world.plan()
