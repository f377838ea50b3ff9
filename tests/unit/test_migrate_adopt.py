"""`dmmig migrate` of a domain whose disk is a `phy:` LV on the stock block script (issue 16
part 2): the plan adopts it, the config xl migrate gets with -C (dmmig/adapters/xlcfg.py:
the operator's file with that disk on block-dmmig, checked against the running domain and
parsed again), the -C on xl's command line, and the adopt before the copy. The device side
answers through the fake runner; `xl -N create` through a fake of libxl's parse (the real one
runs in tests/xen/test_dmmig_migrate.py's adopt test)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.blockdev import BlockDev
from dmmig.adapters.ssh import SshOptions
from dmmig.adapters.xl import XlRun
from dmmig.adapters.xlcfg import diff_configs, disk_spec, rewrite
from dmmig.core import journal
from dmmig.core.records import Adopted, Destination, MirrorState, Synced
from dmmig.errors import BadInput, StateError
from dmmig.flows import finish as finish_flow
from dmmig.flows import migrate_domain
from dmmig.names import disk_name_for
from tests.unit.fakes import DOMID, INFO, MIB, World, vbd_keys

UUID_LV = "LVM-" + "a" * 32 + "b" * 32
RUNNING_UUID = "7550028f-9c02-4a36-9786-5048e2396f1a"
MAC = "00:16:3e:12:34:56"
SECTORS = 8 * MIB // 512


class FakeDev(BlockDev):
    def size_bytes(self) -> int:
        return 8 * MIB


def base_json(disks: list[dict[str, Any]], name: str = "vm1", mac: str | None = MAC,
              uuid: str = "0d3f1c2e-1111-4222-8333-944455556666") -> dict[str, Any]:
    """libxl_domain_config_to_json's shape (tests/unit/test_migrate_domain.py's XL_N_CREATE)."""
    return {"c_info": {"type": "pvh", "name": name, "uuid": uuid},
            "b_info": {"max_vcpus": 1, "max_memkb": 131072, "kernel": "/boot/k"},
            "disks": disks, "nics": [{"mac": mac} if mac else {}], "on_crash": "preserve"}


def parse_specs(text: str) -> list[dict[str, Any]]:
    """The fake's libxl: the last `disk = [...]` line's keyword specs as libxl's JSON."""
    line = [ln for ln in text.splitlines() if ln.startswith("disk = [")][-1]
    out = []
    for spec in re.findall(r"'([^']*)'", line):
        d: dict[str, Any] = {}
        for kv in spec.split(","):
            k, _, v = kv.partition("=")
            if k == "target":
                d["pdev_path"] = v
            elif k == "access":
                d["readwrite"] = 1 if v == "rw" else 0
            elif k in ("vdev", "format", "script"):
                d[k] = v
            elif k == "backendtype":
                d["backend"] = v
        if not d.get("readwrite"):
            d.pop("readwrite", None)
        out.append(d)
    return out


class AdoptWorld(World):
    """vm1 with xvda = `phy:/dev/.../lv` (an LV, 253:0, the stock block script), no disk on
    block-dmmig; its config file in tmp_path."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        tmp_path.mkdir()
        super().__init__(tmp_path)
        lv = self.dest_dir / "lv"  # the destination's disk: a file the agent may use
        lv.write_bytes(b"")
        os.truncate(lv, 8 * MIB)
        self.lv = str(lv)
        self.name = disk_name_for(self.lv)
        monkeypatch.setattr("dmmig.core.stack.block_device", lambda p: FakeDev(p, 253, 0))
        self.runner.rules[:0] = [
            (INFO + ["-j", "253", "-m", "0"], (0, f"vg0-lv;253;0;L--w;1;1;0;{UUID_LV}\n", "")),
            (["dmsetup", "table", "-j", "253", "-m", "0"], (0, f"0 {SECTORS} linear 7:0 2048\n", "")),
            (["xl", "list", "-l", str(DOMID)], (0, json.dumps([{"domid": DOMID, "config": base_json(
                [{"pdev_path": self.lv, "vdev": "xvda", "backend": "phy", "script": "block", "readwrite": 1}],
                uuid=RUNNING_UUID)}]), "")),
            (["xl", "-N", "create"], self.xl_parse),
        ]
        self.xs.data.update(vbd_keys(51712, "xvda", self.lv, script="/etc/xen/scripts/block", pdev="fd:0"))
        self.cfg = tmp_path / "vm1.cfg"
        self.cfg.write_text(f"name = \"vm1\"\n# the operator's comment\nvif = [ 'mac={MAC},bridge=br0' ]\n"
                            f"disk = [ 'phy:{self.lv},xvda,w' ]\n")
        self.file_json = base_json([{"pdev_path": self.lv, "vdev": "xvda", "format": "raw", "readwrite": 1}])
        self.parsed: list[str] = []
        self.opts.config = str(self.cfg)

    def xl_parse(self, argv: list[str]) -> tuple[int, str, str]:
        path = argv[-1]
        text = Path(path).read_text()
        self.parsed.append(text)
        cfg = json.loads(json.dumps(self.file_json))
        if "# dmmig migrate" in text:  # the rewritten file: its disks from its own last disk line
            cfg["disks"] = parse_specs(text)
            cfg["c_info"]["uuid"] = re.findall(r'uuid = "([^"]*)"', text)[-1]
        return 0, json.dumps(cfg), ""


@pytest.fixture
def aw(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdoptWorld:
    """conftest's world's environment (tools, RUN_DIR), with the LV."""
    monkeypatch.setenv("DMMIG_STATE_DIR", str(tmp_path / "adopt" / "dstate"))
    return AdoptWorld(tmp_path / "adopt", monkeypatch)


# ---- the plan --------------------------------------------------------------------------------

def test_a_phy_lv_on_the_stock_script_is_planned_as_adopt_with_a_config_for_xl(aw: AdoptWorld) -> None:
    """Before: refused ("does not adopt a running domain's LV yet")."""
    p = aw.plan()
    [d] = p.disks
    assert (d.name, d.phase, d.dest_disk, d.size) == (aw.name, "adopt", aw.lv, 8 * MIB)
    assert d.adopt is not None and d.adopt.lv == "vg0-lv" and d.adopt.devno == "253:0"
    text = p.render()
    assert f"xvda: {aw.lv} (script /etc/xen/scripts/block): adopted first, live, as dmmig disk {aw.name}" in text
    assert f"swap vg0-lv (live, its openers keep it open): 0 {SECTORS} linear <dmmig-{aw.name}> 0" in text
    assert "hold LVM changes to vg0-lv" in text and "base copy sends" in text
    assert f"xl migrate -C: {aw.cfg} with xvda on script=block-dmmig" in text
    assert p.xl_config is not None and p.xl_config.text is not None
    new = p.xl_config.text
    # the operator's file verbatim, then the override: the disk on block-dmmig, the uuid kept
    assert new.startswith(aw.cfg.read_text())
    assert new.endswith(f"disk = [ 'format=raw,vdev=xvda,access=rw,script=block-dmmig,target={aw.lv}' ]\n"
                        f'uuid = "{RUNNING_UUID}"\n')
    # parsed by libxl twice (the file, the rewrite); nothing left in the state dir, nothing changed
    assert len(aw.parsed) == 3 and "# dmmig migrate" in aw.parsed[-1]
    assert not [f for f in os.listdir(aw.stack.journal.dir) if f.endswith(".cfg")]
    assert aw.mutating() == [] and aw.stack.journal.load(aw.name) is None
    assert aw.agent.calls == ["probe", "probe_tunnel"]


def test_the_default_config_is_etc_xen_domain_cfg_and_a_missing_one_is_refused(aw: AdoptWorld) -> None:
    aw.opts.config = None
    with pytest.raises(BadInput, match="dmmig needs its config file, and /etc/xen/vm1.cfg is none"):
        aw.plan()


@pytest.mark.parametrize("what,change,msg", [
    ("a stale target", lambda w: w.file_json["disks"][0].update(pdev_path="/dev/vg0/old"),
     "does not describe vm1's disks: xvda: target /dev/vg0/old in"),
    ("another domain's file", lambda w: w.file_json["c_info"].update(name="vm2"), "is the config of 'vm2', not of vm1"),
    ("a vif without mac", lambda w: w.file_json["nics"][0].pop("mac"),
     f"vif 0 has no mac= in .*random MAC on the destination instead of {MAC}"),
    ("a vif with another mac", lambda w: w.file_json["nics"][0].update(mac="00:16:3e:00:00:01"),
     "vif 0 has mac 00:16:3e:00:00:01 in .* but 00:16:3e:12:34:56 running"),
    ("a read-only disk", lambda w: w.file_json["disks"][0].pop("readwrite"), "xvda: read-only in"),
    ("another disk", lambda w: w.file_json["disks"].append({"vdev": "xvdb", "pdev_path": "/dev/vg0/b"}),
     r"xvdb \(/dev/vg0/b\) is in"),
])
def test_a_stale_or_other_config_is_refused_before_anything_changes(aw: AdoptWorld, what: str, change: Any,
                                                                     msg: str) -> None:
    change(aw)
    with pytest.raises(BadInput, match=msg):
        aw.plan()
    assert aw.mutating() == [] and aw.agent.calls == []


def test_a_rewrite_libxl_reads_otherwise_is_refused(aw: AdoptWorld) -> None:
    """The round trip is what proves the rewrite: a field lost on the way is a refusal."""
    aw.file_json["disks"][0]["direct_io_safe"] = "True"  # the fake libxl drops it from the rewrite
    with pytest.raises(BadInput, match="is not that file with xvda on block-dmmig: disk xvda: direct_io_safe"):
        aw.plan()
    assert not [f for f in os.listdir(aw.stack.journal.dir) if f.endswith(".cfg")]


def test_the_operators_own_C_is_checked_for_block_dmmig_on_the_adopted_disks(aw: AdoptWorld) -> None:
    aw.opts.config = None
    with pytest.raises(BadInput, match=r"xvda: script \(none\) in .*\(adopted: block-dmmig there\)"):
        aw.plan(xl_args=["-C", str(aw.cfg)])
    aw.file_json["disks"][0]["script"] = "block-dmmig"
    p = aw.plan(xl_args=["-C", str(aw.cfg)])
    assert p.xl_config is not None and p.xl_config.text is None
    assert f"xl migrate -C {aw.cfg} (yours): xvda on script=block-dmmig there" in p.render()
    with pytest.raises(BadInput, match="--config and `-- -C` both name xl's config"):
        aw.plan(xl_args=["-C", str(aw.cfg)], config=str(aw.cfg))


@pytest.mark.parametrize("info,table,msg", [
    (None, "", "not a device-mapper device: a partition or a loop device cannot be adopted"),
    (f"vg0-lv;253;0;L--w;1;1;0;{UUID_LV}\n", f"0 {SECTORS} thin 253:7 1\n", "thin segments"),
    ("mpatha;253;0;L--w;1;1;0;mpath-3600\n", f"0 {SECTORS} linear 7:0 0\n", "not an LVM logical volume"),
])
def test_a_partition_loop_or_other_dm_device_is_refused_with_the_reason(aw: AdoptWorld, info: str | None,
                                                                         table: str, msg: str) -> None:
    aw.runner.rules[:0] = [(INFO + ["-j", "253", "-m", "0"], (1, "", "Device does not exist.\n") if info is None
                            else (0, info, "")), (["dmsetup", "table", "-j", "253", "-m", "0"], (0, table, ""))]
    with pytest.raises(BadInput, match=f"can neither move nor adopt: xvda \\({re.escape(aw.lv)}\\): .*{msg}"):
        aw.plan()
    with pytest.raises(BadInput, match="nothing for dmmig to move"):  # --shared: xl migrate finds it on b
        aw.plan(shared_ok=True, config=None)


def test_blkback_serving_another_device_than_the_lv_is_refused(aw: AdoptWorld) -> None:
    aw.xs.data[f"/local/domain/0/backend/vbd/{DOMID}/51712/physical-device"] = "fd:1"
    with pytest.raises(BadInput, match="blkback serves fd:1, which is not"):
        aw.plan()


# ---- the disk specs dmmig writes ----------------------------------------------------------------

@pytest.mark.parametrize("disk,msg", [
    ({"vdev": "xvda", "pdev_path": "/dev/vg0/a'b"}, "target .* has characters"),
    ({"vdev": "xvda", "pdev_path": "/dev/vg0/a,script=/tmp/evil"}, "target .* has characters"),
    ({"vdev": "xvda", "pdev_path": "/dev/vg0/a\nname = 'x'"}, "target .* has characters"),
    ({"vdev": "xvda", "pdev_path": "/dev/vg0/../../etc/shadow"}, "target .* has characters"),
    ({"vdev": "xvda", "pdev_path": "dev/vg0/a"}, "target .* has characters"),
    ({"vdev": "xvda,target=/x", "pdev_path": "/dev/vg0/a"}, "is not a plain device name"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "script": "block' ]\nkernel='/x"}, "script .* has characters"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "format": "raw,script=x"}, "unknown format"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "backend": "vbd3"}, "unknown backend type"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "colo_enable": "True"}, "cannot write its colo_enable"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "backend_domid": 3}, "served from driver domain 3"),
    ({"vdev": "xvda", "pdev_path": "/dev/a", "removable": 1}, "removable but not a cdrom"),
])
def test_odd_or_malicious_disks_are_refused_not_written(disk: dict[str, Any], msg: str) -> None:
    with pytest.raises(BadInput, match=msg):
        disk_spec(disk)


def test_disk_specs_say_every_field_they_know() -> None:
    assert disk_spec({"vdev": "xvda", "pdev_path": "/dev/vg0/vm-1_a.b+c", "format": "raw", "backend": "phy",
                      "script": "block", "readwrite": 1, "direct_io_safe": "True", "discard_enable": "False",
                      "trusted": "True"}, "block-dmmig") == (
        "format=raw,vdev=xvda,access=rw,backendtype=phy,script=block-dmmig,direct-io-safe,no-discard,trusted,"
        "target=/dev/vg0/vm-1_a.b+c")
    assert disk_spec({"vdev": "hdc", "pdev_path": "/srv/x.iso", "is_cdrom": 1, "removable": 1}) == \
        "vdev=hdc,access=ro,devtype=cdrom,target=/srv/x.iso"
    assert disk_spec({"vdev": "hdc", "is_cdrom": 1, "removable": 1, "format": "empty"}) == \
        "format=empty,vdev=hdc,access=ro,devtype=cdrom"


def test_rewrite_appends_and_refuses_a_bad_uuid_or_an_unknown_vdev() -> None:
    disks = [{"vdev": "xvda", "pdev_path": "/dev/a", "readwrite": 1}]
    out = rewrite("name = 'vm1'  # no newline", disks, {"xvda": "block-dmmig"}, RUNNING_UUID.upper())
    assert out.startswith("name = 'vm1'  # no newline\n\n# dmmig migrate")
    assert out.endswith(f'uuid = "{RUNNING_UUID}"\n')
    with pytest.raises(BadInput, match="is not a uuid"):
        rewrite("", disks, {}, 'x"\nkernel="/evil')
    with pytest.raises(BadInput, match="the config has no disk xvdb"):
        rewrite("", disks, {"xvdb": "block-dmmig"}, RUNNING_UUID)


def test_diff_configs_sees_only_what_the_rewrite_was_not_for() -> None:
    a = base_json([{"vdev": "xvda", "pdev_path": "/dev/a"}])
    b = json.loads(json.dumps(a))
    b["disks"][0]["script"] = "block-dmmig"
    b["c_info"]["uuid"] = RUNNING_UUID
    assert diff_configs(a, b, {"xvda": "block-dmmig"}) == []
    assert diff_configs(a, b, {}) == ["disk xvda: script None became 'block-dmmig'"]
    b["b_info"]["max_memkb"] = 1
    assert diff_configs(a, b, {"xvda": "block-dmmig"})[0].startswith("b_info:")


# ---- the flow ------------------------------------------------------------------------------------

class RecordingXl:
    def __init__(self) -> None:
        self.argv: list[str] = []
        self.config: str | None = None

    def find(self, domain: str) -> Any:
        return None  # gone from here: it runs on b

    def migrate(self, domid: int, host: str, extra: list[str], timeout: float, log: str) -> XlRun:
        self.argv = list(extra)
        path = extra[extra.index("-C") + 1]
        st = os.stat(path)
        assert st.st_mode & 0o077 == 0
        self.config = Path(path).read_text()
        return XlRun(0, "", 1.0)


def test_migrate_adopts_before_the_copy_and_gives_xl_the_config_with_C(aw: AdoptWorld) -> None:
    p = aw.plan(xl_args=["-e"])
    order: list[str] = []

    def adopt(stack: Any, name: str, path: str) -> tuple[str, float]:
        order.append(f"adopt {name} {path}")
        stack.journal.save(journal.Entry(name, f"/dev/mapper/dmmig-{name}-lv", "253:1", dest=None,
                                         adopted=Adopted("vg0-lv", path, "253:0", UUID_LV, "0 8 linear 7:0 0",
                                                         "253:2")), journal.WRAPPED)
        return f"/dev/mapper/dmmig-{name}", 0.01

    def to_mirror(stack: Any, disks: list[tuple[str, str]], *a: Any) -> list[Any]:
        order.append(f"mirror {disks}")
        e = stack.journal.load(aw.name)
        e.dest = Destination(host="b", user="root", port=22, known_hosts="/dev/null", disk=aw.lv)
        e.mirror = MirrorState(synced=Synced(at=0.0, events=0, seconds=0.0))
        stack.journal.save(e, journal.MIRRORING)
        return [{"copy": {"read": 0}, "cutover": {"suspended_seconds": 0.0, "resync_regions": 0}}]

    class Agent:
        def call(self, op: str, **kw: Any) -> dict[str, Any]:
            return {"asked": None if kw.get("timeout") == 0 else aw.name}

    class Remote:
        agent = Agent()

        def close(self) -> None:
            pass
    xl = RecordingXl()
    ops = migrate_domain.Ops(remote=lambda d: Remote(), to_mirror=to_mirror, adopt=adopt,
                             answer_gate=lambda s, e, r: {"ok": True, "why": "in sync", "delivered": True},
                             finish=lambda s, d, dest: {"done": [], "seconds": 0.0},
                             abort=lambda s, n: ([], []))
    said: list[str] = []
    summary = migrate_domain.migrate(aw.stack, xl, p, SshOptions(), aw.opts,  # type: ignore[arg-type]
                                     lambda d, i: None, said.append, ops)  # type: ignore[arg-type,return-value]
    assert order == [f"adopt {aw.name} {aw.lv}", f"mirror [('{aw.name}', '{aw.lv}')]"]
    cfg = os.path.join(aw.stack.journal.dir, f"xl-migrate-{DOMID}.cfg")
    assert xl.argv == ["-e", "-C", cfg]
    assert p.xl_config is not None and xl.config == p.xl_config.text
    assert not os.path.exists(cfg)  # removed once xl ended
    assert any("adopted" in s and "hold LVM changes to vg0-lv" in s for s in said)
    assert summary["disks"][aw.name]["adopt_swap_seconds"] == 0.01


def test_a_failed_adopt_gives_back_the_lvs_adopted_before_and_nothing_is_copied(aw: AdoptWorld) -> None:
    p = aw.plan()
    second = migrate_domain.Disk(p.disks[0].vbd, "other", aw.lv, 8 * MIB, "adopt", aw.lv, True, [],
                                 adopt=p.disks[0].adopt)
    p.disks.append(second)
    aborted: list[str] = []

    def adopt(stack: Any, name: str, path: str) -> tuple[str, float]:
        if name == "other":
            raise StateError("the table of vg0-lv changed while dmmig adopted it")
        return "", 0.0

    ops = migrate_domain.Ops(adopt=adopt, abort=lambda s, n: (aborted.append(n), ([], []))[1],
                             to_mirror=lambda *a: pytest.fail("copied"))
    with pytest.raises(StateError, match="adopting .* failed, so every LV adopted before got its own table back"):
        migrate_domain.migrate(aw.stack, RecordingXl(), p, SshOptions(),  # type: ignore[arg-type]
                               aw.opts, lambda d, i: None, lambda s: None, ops)  # type: ignore[arg-type,return-value]
    assert aborted == [aw.name]


def test_finish_on_the_source_does_not_wait_for_an_adopted_top_to_close(aw: AdoptWorld,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: it waited CLOSE_WAIT_S for the top to close, which the LV (linear over it) holds
    until finish gives the LV its table back, then refused: every adopted migration ended in
    an error on the source, with the LV still on dmmig's table."""
    name = aw.name
    aw.stack.journal.save(journal.Entry(name, f"/dev/mapper/dmmig-{name}-lv", "253:1",
                                        adopted=Adopted("vg0-lv", aw.lv, "253:0", UUID_LV, "0 8 linear 7:0 0",
                                                        "253:2")), journal.MIRRORING)
    aw.runner.rules.insert(0, (INFO + [f"dmmig-{name}"], (0, f"dmmig-{name};253;2;L--w;1;1;0;DMMIG-top-{name}\n", "")))
    finished: list[str] = []
    monkeypatch.setattr(finish_flow, "finish", lambda stack, n, **kw: (finished.append(n), (["swap back"], []))[1])
    done = finish_flow.finish_handed_over(aw.stack, name, node=None, params=aw.lv, close_wait_s=0.5)
    assert finished == [name] and done == ["swap back"]
    # a wrapped disk's top still open: refused as before
    e = aw.stack.journal.load(name)
    assert e is not None
    e.adopted = None
    aw.stack.journal.save(e)
    with pytest.raises(StateError, match="is still open"):
        finish_flow.finish_handed_over(aw.stack, name, node=None, params=aw.lv, close_wait_s=0.3)


def test_a_config_path_xl_would_take_for_an_option_is_refused(aw: AdoptWorld, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in ("-e", "--debug"):
        (tmp_path / bad).write_text(aw.cfg.read_text())  # a file of that name is there
        with pytest.raises(BadInput, match="not starting with '-'"):
            aw.plan(config=bad)
    assert not [a for a in aw.runner.argvs if a[:3] == ["xl", "-N", "create"]]


def test_a_disk_an_earlier_run_adopted_resumes_and_a_reloaded_one_is_refused(aw: AdoptWorld) -> None:
    """Before: a second `dmmig migrate` after one killed past its adopt was refused ("already a
    dmmig disk"), and only `dmmig abort` (a new copy from scratch) got it going again."""
    name = aw.name
    aw.stack.journal.save(journal.Entry(name, f"/dev/mapper/dmmig-{name}-lv", "253:1",
                                        adopted=Adopted("vg0-lv", aw.lv, "253:0", UUID_LV,
                                                        f"0 {SECTORS} linear 7:0 2048", "253:2")), journal.WRAPPED)
    aw.runner.rules[:0] = [
        (INFO + [f"dmmig-{name}"], (0, f"dmmig-{name};253;2;L--w;1;1;0;DMMIG-top-{name}\n", "")),
        (["dmsetup", "table", f"dmmig-{name}"], (0, f"0 {SECTORS} linear 253:1 0\n", "")),
        (["dmsetup", "table", "-j", "253", "-m", "0"], [(0, f"0 {SECTORS} linear 253:2 0\n", ""),  # the plan's
                                                        (0, f"0 {SECTORS} linear 7:0 2048\n", "")]),  # then
    ]
    p = aw.plan()
    [d] = p.disks
    assert (d.name, d.phase, d.adopt) == (name, journal.WRAPPED, None)  # nothing to adopt again
    assert p.xl_config is not None and p.xl_config.adopted == ["xvda"]  # still needs block-dmmig on b
    assert aw.mutating() == []
    # LVM reloaded the LV since (its own table again, not over dmmig's top): refused, abort says how
    with pytest.raises(StateError, match="LVM reloaded it") as e:
        aw.plan()
    assert e.value.hint is not None and f"dmmig abort {name}" in e.value.hint
