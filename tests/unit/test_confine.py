"""The agent's confinement rules (dmmig/core/confine.py) without root: paths, roots, symlinks,
sizes, LVM names, the configuration file. Commands answer through the fake runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmmig.core import confine
from dmmig.core.confine import Policy, Refused
from dmmig.errors import BadInput
from tests.unit.fakes import FakeRunner

GIB = 1 << 30


@pytest.mark.parametrize("bad", ["rel/x", "/a/../b", "/a/./b", "//a", "/a/", "/a//b", "/a\nb", "/a\x00b", "", 7])
def test_paths_must_be_absolute_and_normalised(bad: object) -> None:
    with pytest.raises(Refused):
        confine.clean_path(bad)


def test_a_file_only_under_a_root_and_its_symlinks_resolved(tmp_path: Path) -> None:
    root, out = tmp_path / "images", tmp_path / "etc"
    root.mkdir()
    out.mkdir()
    (root / "vm1.img").write_bytes(b"\0" * 4096)
    (out / "shadow").write_text("secret")
    (root / "link.img").symlink_to(out / "shadow")
    p = Policy(file_roots=(str(root),))
    assert p.existing(str(root / "vm1.img")) == "file"
    with pytest.raises(Refused, match="not under this agent's file roots"):
        p.existing(str(out / "shadow"))
    with pytest.raises(Refused, match=r"link.img \(really .*/etc/shadow\) is not under"):
        p.existing(str(root / "link.img"))
    with pytest.raises(Refused, match="not under"):  # the root itself is no disk
        p.existing(str(root))
    with pytest.raises(Refused, match="neither a block device nor a regular file"):
        p.existing("/dev/null")
    with pytest.raises(Refused, match="file_roots = none"):
        Policy(file_roots=()).existing(str(root / "vm1.img"))
    with pytest.raises(BadInput, match="does not exist"):
        p.existing(str(root / "nothere.img"))


def test_a_refusal_outside_the_confinement_tells_nothing_of_what_exists(tmp_path: Path) -> None:
    p = Policy(file_roots=(str(tmp_path / "images"),))
    msgs = []
    for path in ("/etc/passwd", "/etc/no-such-file"):
        with pytest.raises(Refused) as e:
            p.existing(path)
        msgs.append(e.value.message.replace(path, "P"))
    assert msgs[0] == msgs[1]


def test_the_default_roots_are_xens_image_directories() -> None:
    p = Policy()
    assert p.file_roots == ("/var/lib/xen/images", "/srv/xen") and p.devices == ("/dev/*",)
    with pytest.raises(Refused, match="not under"):
        p.existing("/etc/passwd")


def test_create_a_file_within_the_free_space_and_the_cap(tmp_path: Path) -> None:
    p = Policy(file_roots=(str(tmp_path),))
    r = FakeRunner()
    assert p.creatable(str(tmp_path / "new.img"), 1 << 20, r) == ("file", str(tmp_path), "")
    with pytest.raises(Refused, match="do not fit in the .* bytes free"):
        p.creatable(str(tmp_path / "huge.img"), 1 << 60, r)
    with pytest.raises(Refused, match="max_create"):
        Policy(file_roots=(str(tmp_path),), max_create=GIB).creatable(str(tmp_path / "x.img"), 2 * GIB, r)
    with pytest.raises(Refused, match="creates no disks"):
        Policy(file_roots=(str(tmp_path),), create=False).creatable(str(tmp_path / "x.img"), 4096, r)
    with pytest.raises(Refused, match="not under"):
        p.creatable("/etc/dmmig-huge.img", 4096, r)
    with pytest.raises(Refused, match="not a directory"):
        p.creatable(str(tmp_path / "no" / "x.img"), 4096, r)
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Refused, match="it exists"):
        p.creatable(str(tmp_path / "dangling"), 4096, r)
    # a directory that is a link out of the root
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(Refused, match=r"really /etc/x.img"):
        p.creatable(str(tmp_path / "out" / "x.img"), 4096, r)
    assert r.argvs == []


def test_create_an_lv_in_a_vg_with_room() -> None:
    r = FakeRunner([(["vgs", "--noheadings", "--units"], (0, "  10737418240\n", ""))])
    p = Policy()
    assert p.creatable("/dev/vg0/vm1", 4 * GIB, r) == ("lv", "vg0", "vm1")
    assert r.argvs[0] == ["vgs", "--noheadings", "-o", "vg_name", "vg0"]
    with pytest.raises(Refused, match="do not fit in the 10737418240 bytes free in volume group vg0"):
        p.creatable("/dev/vg0/vm1", 20 * GIB, r)
    with pytest.raises(Refused, match="matches none of its device patterns .devices = /dev/vg1/."):
        Policy(devices=("/dev/vg1/*",)).creatable("/dev/vg0/vm1", GIB, r)
    with pytest.raises(Refused, match="no valid LV name"):
        p.creatable("/dev/vg0/-x", GIB, r)


@pytest.mark.parametrize("vg", ["-x", "--config=x", "mapper", "shm"])
def test_an_option_or_a_dev_directory_is_never_taken_for_a_vg(vg: str) -> None:
    r = FakeRunner()
    with pytest.raises(Refused):
        Policy(file_roots=()).creatable(f"/dev/{vg}/x", 4096, r)
    assert not any(a[0] == "vgs" and vg in a for a in r.argvs), r.argvs


def test_digest_ranges_stay_within_the_disk() -> None:
    assert confine.range_ok("/d", 8192, 4096, 4096, 4096) == (4096, 4096, 4096)
    with pytest.raises(Refused, match="beyond the migrated disk's 8192 bytes"):
        confine.range_ok("/d", 8192, 4096, 8192, 4096)
    for bad in [(-1, 1, 512), (0, 1, 0), (0, 1, 100), (0, 1, confine.MAX_CHUNK * 2), (0, True, 512)]:
        with pytest.raises(Refused):
            confine.range_ok("/d", 1 << 40, *bad)
    for bad_size in [0, -512, 1000, True, "4096", 1 << 62]:
        with pytest.raises(Refused):
            confine.size_ok(bad_size)


def test_the_configuration_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("# the images\nfile_roots = /srv/xen, /data/images  # two\ndevices = /dev/vg0/* /dev/md*\n"
                    "max_create = 2T\ncreate = no\n")
    p = confine.load(str(conf))
    assert p.file_roots == ("/srv/xen", "/data/images") and p.devices == ("/dev/vg0/*", "/dev/md*")
    assert p.max_create == 2 << 40 and not p.create and p.origin == str(conf)
    conf.write_text("[agent]\nfile_roots = none\n")
    assert confine.load(str(conf)).file_roots == ()
    p = confine.load(str(conf), file_roots=("/srv",), create=None)
    assert p.file_roots == ("/srv",) and p.create and "flags" in p.origin
    monkeypatch.setenv("DMMIG_AGENT_CONF", str(conf))
    assert confine.load().file_roots == ()
    for text, msg in [("file_root = /x\n", "unknown setting"), ("[other]\nx=1\n", "unknown section"),
                      ("file_roots = rel\n", "not an absolute"), ("create = maybe\n", "yes or no"),
                      ("max_create = lots\n", "invalid size"), ("devices = dev/*\n", "absolute path pattern")]:
        conf.write_text(text)
        with pytest.raises(BadInput, match=msg):
            confine.load(str(conf))
    with pytest.raises(BadInput, match="does not exist"):
        confine.load(str(tmp_path / "nothere.conf"))
    monkeypatch.delenv("DMMIG_AGENT_CONF")
    monkeypatch.setattr(confine, "DEFAULT_CONF", str(tmp_path / "nothere.conf"))
    assert confine.load() == Policy()  # no file at the default place: the defaults


def test_the_cli_passes_the_flags_and_a_bad_file_stops_the_agent(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dmmig.entry import agent, cli
    seen: list[Policy | None] = []
    monkeypatch.setattr(agent, "main", lambda state, mode=None, arg=None, forced=False, policy=None:
                        seen.append(policy) or 0)
    conf = tmp_path / "agent.conf"
    conf.write_text("file_roots = /srv/xen\n")
    assert cli.main(["agent", "--config", str(conf), "--device", "/dev/vg0/*", "--max-create", "1G"]) == 0
    assert seen[0] is not None and seen[0].file_roots == ("/srv/xen",) and seen[0].devices == ("/dev/vg0/*",)
    assert seen[0].max_create == 1 << 30
    conf.write_text("bogus = 1\n")
    assert cli.main(["agent", "--config", str(conf)]) == 3
    assert "unknown setting" in capsys.readouterr().err and len(seen) == 1
    assert os.path.exists(conf)
