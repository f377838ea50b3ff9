"""The block hotplug script's logic without Xen or root: the disk name it derives, the libxl
environment it accepts, and what it writes to XenStore. XenStore is an in-memory dict with the
adapter's interface; device-mapper and losetup go through the project's fake runner (the real
thing runs under libxl in tests/xen/test_block_dmmig.py)."""
from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dmmig import names
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core import journal
from dmmig.core.records import Handover, MirrorState
from dmmig.core.stack import Stack
from dmmig.entry import hotplug
from dmmig.errors import BadInput, CommandError
from dmmig.validate import disk_name
from tests.unit.fakes import INFO, NOT_THERE, FakeRunner, MemXenStore

BE = "backend/vbd/7/51712"


def top_info(name: str, open_count: int) -> list[tuple[list[str], Any]]:
    """Runner rules: dmsetup info shows dmmig-NAME with OPEN_COUNT openers, no other device."""
    line = f"dmmig-{name};253;4;L--w;{open_count};1;0;DMMIG-top-{name}\n"
    return [(INFO + [f"dmmig-{name}"], (0, line, "")), (["dmsetup", "info"], NOT_THERE)]


def backend_keys(**kv: str) -> dict[str, str]:
    return {f"{BE}/{k.replace('_', '-')}": v for k, v in kv.items()}


class Lines(list[str]):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def stack(tmp_path: Path, rules: list[tuple[list[str], Any]] | None = None) -> tuple[Stack, FakeRunner]:
    r = FakeRunner(rules)
    return Stack(r, DmSetup(r), journal.Journal(str(tmp_path / "state"))), r


def run(action: str, xs: MemXenStore, st: Stack) -> tuple[int, Lines]:
    log = Lines()
    rc = hotplug.run(action, xs, st, hotplug.Backend(BE), log, close_wait_s=0)
    return rc, log


# ---- the disk name ---------------------------------------------------------------------------

@pytest.mark.parametrize("params,name", [
    ("/dev/vg0/vm1", "vg0-vm1"),
    ("/dev/loop3", "loop3"),
    ("/srv/xen/vm1.img", "srv-xen-vm1.img"),
    ("/dev/vg0/vm-1", "vg0-vm--1"),              # as lvm2 names /dev/mapper/vg0-vm--1
    ("/dev/mapper/vg0-vm1", "mapper-vg0--vm1"),
    ("/dev//vg0/./vm1", "vg0-vm1"),              # the same path, so the same disk
    ("/srv/vm 1.img", "srv-vm+201.img"),
    ("/srv/a+b", "srv-a+2bb"),
    ("/srv/a..b", "srv-a.+2eb"),                 # '..' is never part of a dmmig name
    ("/srv/-x-", "srv-+2dx+2d"),
    ("/srv/\u00e9.img", "srv-+c3+a9.img"),
])
def test_disk_name_from_params(params: str, name: str) -> None:
    assert names.disk_name_for(params) == name
    assert disk_name(name) == name


def test_disk_names_are_one_to_one_under_dev() -> None:
    """Two different targets must never get one top device (two guests on one disk): names of
    distinct normalised paths differ, also for paths made of the troublesome characters."""
    rng = random.Random(5)
    alphabet = "ab-/._ +"
    paths = {"/dev/a/b-c", "/dev/a-b/c", "/dev/a/-b/c", "/dev/a-/b", "/dev/a--b", "/dev/a/--b", "/dev/a-/-b",
             "/dev/a/b", "/dev/a-b", "/dev/a.b", "/dev/a+2db"}
    for _ in range(4000):
        paths.add("/dev/a" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
    seen: dict[str, str] = {}
    for p in {os.path.normpath(p) for p in paths}:
        try:
            name = names.disk_name_for(p)
        except BadInput:
            continue
        assert seen.setdefault(name, p) == p, (name, p, seen[name])
    assert len(seen) > 1000


@pytest.mark.parametrize("params,why", [
    ("vg0/vm1", "not an absolute path"),
    ("", "not an absolute path"),
    ("/dev/", "names no disk"),
    ("/dev/_x", "invalid disk name"),            # a name must start with a letter or digit
    ("/srv/" + "x" * 100, "invalid disk name"),  # at most 96 characters
])
def test_disk_name_refusals(params: str, why: str) -> None:
    with pytest.raises(BadInput, match=why):
        names.disk_name_for(params)


@pytest.mark.parametrize("mode,want", [("w", "w"), ("r", "r"), ("rw", "w"), ("ro", "r"), ("w!", "!")])
def test_mode_as_xen_canonicalises_it(mode: str, want: str) -> None:
    assert hotplug.canonical_mode(mode) == want


def test_physical_device_is_hex_without_0x() -> None:
    assert names.format_devno(os.makedev(253, 10)) == "fd:a"
    assert names.format_devno(os.makedev(7, 0)) == "7:0"
    assert names.format_devno(os.makedev(259, 4096)) == "103:1000"


# ---- the environment libxl gives ---------------------------------------------------------------

@pytest.mark.parametrize("path", [BE, "/local/domain/0/backend/vbd/12/768"])
def test_backend_from_env(path: str) -> None:
    assert hotplug.Backend.from_env({"XENBUS_PATH": path, "XENBUS_TYPE": "vbd"}).key("params") == f"{path}/params"


@pytest.mark.parametrize("env,why", [
    ({}, "XENBUS_PATH=''"),
    ({"XENBUS_PATH": "backend/vif/7/0", "XENBUS_TYPE": "vbd"}, "not a vbd backend path"),
    ({"XENBUS_PATH": "backend/vbd/7/51712/../../x", "XENBUS_TYPE": "vbd"}, "not a vbd backend path"),
    ({"XENBUS_PATH": BE}, "XENBUS_TYPE=''"),
    ({"XENBUS_PATH": BE, "XENBUS_TYPE": "vif"}, "only vbd"),
])
def test_backend_env_refusals(env: dict[str, str], why: str) -> None:
    with pytest.raises(hotplug.HotplugError, match=why):
        hotplug.Backend.from_env(env)


def test_main_without_a_backend_fails_before_touching_xenstore(capsys: pytest.CaptureFixture[str]) -> None:
    rc = hotplug.main("add", {"XENBUS_TYPE": "vbd"})
    assert rc != 0
    assert "block-dmmig: add ?: error: XENBUS_PATH=''" in capsys.readouterr().err


# ---- add: errors become hotplug-error + hotplug-status=error + a non-zero exit -----------------------

def assert_failed(xs: MemXenStore, rc: int, *fragments: str) -> str:
    assert rc != 0
    err = xs.data[f"{BE}/hotplug-error"]
    assert xs.data[f"{BE}/hotplug-status"] == "error"
    assert err.startswith("block-dmmig: ") and "\n" not in err and err.isascii()
    for f in fragments:
        assert f in err, err
    assert f"{BE}/physical-device" not in xs.data
    return err


@pytest.mark.parametrize("params,why", [
    ("vg0/vm1", "target 'vg0/vm1' is not an absolute path"),
    ("/nonexistent/vm1", "target /nonexistent/vm1 does not exist"),
    ("/dev/null", "target /dev/null is neither a block device nor a regular file"),
])
def test_add_refuses_a_bad_target_before_changing_anything(tmp_path: Path, params: str, why: str) -> None:
    xs = MemXenStore(backend_keys(params=params, mode="w"))
    st, r = stack(tmp_path, [(["dmsetup", "info"], NOT_THERE)])
    rc, log = run("add", xs, st)
    assert_failed(xs, rc, why)
    assert [a for a in r.argvs if a[:2] != ["dmsetup", "info"]] == []
    assert any(why in ln for ln in log)


def test_add_without_params_fails(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(mode="w"))
    st, r = stack(tmp_path)
    rc, _ = run("add", xs, st)
    assert_failed(xs, rc, f"{BE}/params is missing")
    assert r.calls == []


def test_add_called_twice_changes_nothing(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:3"))
    st, r = stack(tmp_path)
    rc, log = run("add", xs, st)
    assert rc == 0 and xs.writes == [] and r.calls == []
    assert any("called twice" in ln for ln in log)


def test_add_refuses_a_top_device_another_domain_has_open(tmp_path: Path) -> None:
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * 4096)
    name = names.disk_name_for(str(img))
    xs = MemXenStore(backend_keys(params=str(img), mode="w"))
    st, r = stack(tmp_path, top_info(name, 1))
    rc, _ = run("add", xs, st)
    assert_failed(xs, rc, f"dmmig-{name} (target {img}) is already open (1 opener(s))")
    assert all(a[:2] == ["dmsetup", "info"] for a in r.argvs)


class FailingWrapStack(Stack):
    """Stack whose wrap fails as a dmsetup create can (or returns a path of the caller's choice),
    and whose unwraps are recorded: the real wrap needs a block device and root."""

    wrap_result: str | None = None
    unwrapped: list[str]

    def wrap(self, name: str, origin_path: str) -> str:
        if self.wrap_result is None:
            raise CommandError(["dmsetup", "create", f"dmmig-{name}"], 1, "",
                               "device-mapper: reload ioctl on dmmig-x failed: Device or resource busy")
        return self.wrap_result

    def unwrap(self, name: str, *, force: bool = False) -> None:
        self.unwrapped.append(name)


def failing_stack(tmp_path: Path, wrap_result: str | None) -> tuple[FailingWrapStack, FakeRunner]:
    r = FakeRunner([(["dmsetup", "info"], NOT_THERE), (["losetup", "--find"], (0, "/dev/loop5\n", ""))])
    st = FailingWrapStack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")))
    st.wrap_result, st.unwrapped = wrap_result, []
    return st, r


def test_add_of_a_file_detaches_its_loop_device_when_wrap_fails(tmp_path: Path) -> None:
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * 4096)
    xs = MemXenStore(backend_keys(params=str(img), mode="w"))
    st, r = failing_stack(tmp_path, None)
    rc, _ = run("add", xs, st)
    assert_failed(xs, rc, "`dmsetup create dmmig-", "Device or resource busy")
    assert ["losetup", "--find", "--show", str(img)] in r.argvs
    assert r.argvs[-1] == ["losetup", "-d", "/dev/loop5"]
    assert st.unwrapped == [] and f"{BE}/node" not in xs.data


def test_add_undoes_the_wrap_when_the_result_cannot_be_handed_over(tmp_path: Path) -> None:
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * 4096)
    xs = MemXenStore(backend_keys(params=str(img), mode="w"))
    # wrap "succeeds" with a path that is no block device: physical-device cannot be derived
    st, r = failing_stack(tmp_path, str(img))
    rc, _ = run("add", xs, st)
    assert_failed(xs, rc, "is not a block device")
    name = names.disk_name_for(str(img))
    assert st.unwrapped == [name]
    assert r.argvs[-1] == ["losetup", "-d", "/dev/loop5"]


def test_add_read_only_still_wraps_and_says_so(tmp_path: Path) -> None:
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * 4096)
    xs = MemXenStore(backend_keys(params=str(img), mode="r"))
    st, r = failing_stack(tmp_path, None)
    rc, log = run("add", xs, st)
    assert rc != 0 and ["losetup", "--find", "--show", str(img)] in r.argvs  # it went on to wrap
    assert any("mode r:" in ln and "read-only between domains is not supported" in ln for ln in log), log


def test_add_refuses_a_file_already_on_a_loop_device(tmp_path: Path) -> None:
    img = tmp_path / "vm1.img"
    img.write_bytes(b"\0" * 4096)
    xs = MemXenStore(backend_keys(params=str(img), mode="w"))
    st, r = stack(tmp_path, [(["dmsetup", "info"], NOT_THERE), (["losetup", "--noheadings"], (0, "/dev/loop2\n", ""))])
    rc, _ = run("add", xs, st)
    assert_failed(xs, rc, f"{img} is already attached as /dev/loop2", "losetup -d /dev/loop2")
    assert not any(a[:2] == ["losetup", "--find"] or a[:2] == ["losetup", "-d"] for a in r.argvs)


def test_error_write_failure_is_logged_and_still_non_zero(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="relative", mode="w"), refuse=("hotplug-error",))
    st, _ = stack(tmp_path)
    rc, log = run("add", xs, st)
    assert rc != 0 and any("could not write hotplug-error" in ln for ln in log)


def test_hotplug_error_is_one_ascii_line() -> None:
    msg = hotplug.one_line("a\n  b\tc \u00e9" + "x" * 2000)
    assert msg.startswith("a b c ?") and len(msg) == 900 and msg.endswith("...")


# ---- remove ----------------------------------------------------------------------------------------

def journal_entry(st: Stack, name: str, phase: str) -> None:
    st.journal.save(journal.Entry(name, "/dev/vg0/vm1", "254:1"), phase)


@pytest.mark.parametrize("phase", [journal.MIRRORING, journal.COPYING, journal.CUTTING_OVER])
def test_remove_leaves_a_disk_in_migration_to_dmmig(tmp_path: Path, phase: str) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w"))
    st, r = stack(tmp_path)
    journal_entry(st, "vg0-vm1", phase)
    rc, log = run("remove", xs, st)
    assert rc == 0 and r.calls == [] and xs.writes == []
    assert st.journal.load("vg0-vm1") is not None
    assert any(f"phase {phase!r} of a migration: left for dmmig" in ln for ln in log)


@pytest.mark.parametrize("delivered", [True, False])
def test_remove_finishes_a_disk_handed_over_to_the_destination(tmp_path: Path, delivered: bool) -> None:
    """After a completed migration libxl destroys the source domain: remove tears this host's
    stack down once the destination's add got our yes, and only then."""
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    st, r = stack(tmp_path, [(["dmsetup", "table", "dmmig-vg0-vm1"], (0, "0 2048 linear 254:1 0\n", ""))]
                  + top_info("vg0-vm1", 0))
    e = journal.Entry("vg0-vm1", "/dev/vg0/vm1", "254:1")
    e.mirror = MirrorState(handover=Handover(ok=True, delivered=delivered, why="in sync"))
    st.journal.save(e, journal.MIRRORING)
    rc, log = run("remove", xs, st)
    assert rc == 0 and xs.writes == []
    if delivered:
        assert ["dmsetup", "remove", "--retry", "dmmig-vg0-vm1"] in r.argvs
        assert st.journal.load("vg0-vm1") is None
        assert any("handed over to the destination: finished here" in ln for ln in log)
    else:
        assert not any(a[1] == "remove" for a in r.argvs)
        assert st.journal.load("vg0-vm1") is not None
        assert any("of a migration: left for dmmig" in ln for ln in log)


def test_remove_leaves_an_open_top_device(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    st, r = stack(tmp_path, top_info("vg0-vm1", 1))
    journal_entry(st, "vg0-vm1", journal.WRAPPED)
    rc, log = run("remove", xs, st)
    assert rc == 0 and all(a[:2] == ["dmsetup", "info"] for a in r.argvs)
    assert any("still open (1 opener(s))" in ln for ln in log)


def test_remove_unwraps_a_closed_top_device(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    st, r = stack(tmp_path, top_info("vg0-vm1", 0))
    journal_entry(st, "vg0-vm1", journal.WRAPPED)
    rc, log = run("remove", xs, st)
    assert rc == 0, log
    assert ["dmsetup", "remove", "--retry", "dmmig-vg0-vm1"] in r.argvs
    assert st.journal.load("vg0-vm1") is None
    assert xs.writes == []


@pytest.mark.parametrize("physical_device", [None, "fd:9"])
def test_remove_touches_only_what_this_backends_add_connected(tmp_path: Path, physical_device: str | None) -> None:
    """libxl runs remove after a failed add too: a refused add (e.g. the disk is another
    domain's) must not take the other domain's top device with it."""
    keys = backend_keys(params="/dev/vg0/vm1", mode="w")
    if physical_device:
        keys[f"{BE}/physical-device"] = physical_device
    xs = MemXenStore(keys)
    st, r = stack(tmp_path, top_info("vg0-vm1", 0))
    journal_entry(st, "vg0-vm1", journal.WRAPPED)
    rc, log = run("remove", xs, st)
    assert rc == 0 and not any(a[:2] == ["dmsetup", "remove"] for a in r.argvs)
    assert st.journal.load("vg0-vm1") is not None
    assert any("never connected" in ln or "not the device this backend used (fd:9)" in ln for ln in log), log


def test_remove_failure_is_reported(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    st, r = stack(tmp_path, top_info("vg0-vm1", 0) + [
        (["dmsetup", "remove"], (1, "", "device-mapper: remove ioctl failed: Device or resource busy"))])
    journal_entry(st, "vg0-vm1", journal.WRAPPED)
    rc, _ = run("remove", xs, st)
    # libxl ignores remove's status, but the log and XenStore say why
    assert rc != 0 and "Device or resource busy" in xs.data[f"{BE}/hotplug-error"]


def test_unknown_action(tmp_path: Path) -> None:
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w"))
    st, _ = stack(tmp_path)
    rc, _ = run("migrate", xs, st)
    assert_failed(xs, rc, "unknown action 'migrate'")


def test_log_goes_to_stderr_and_the_hotplug_log(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = hotplug.Log(f"add {BE}", stream=stream, file=str(tmp_path / "xen-hotplug.log"))
    log("hello")
    assert stream.getvalue() == f"block-dmmig: add {BE}: hello\n"
    assert (tmp_path / "xen-hotplug.log").read_text().endswith(f" block-dmmig: add {BE}: hello\n")
    # no log directory (Xen not installed): stderr only
    assert hotplug.Log("x", stream=stream, file=str(tmp_path / "nodir" / "log")).file is None


def test_cli_has_the_hotplug_verb() -> None:
    from dmmig.entry.cli import build_parser
    a = build_parser().parse_args(["hotplug", "remove"])
    assert a.action == "remove" and a.fn.__name__ == "cmd_hotplug"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["hotplug", "attach"])


# ---- the 40 s libxl allows ---------------------------------------------------------------------------

def test_deadline_interrupts_a_xenstore_answer_that_never_comes() -> None:
    # pyxs waits for each answer on a threading.Condition without a timeout
    cond = threading.Condition()
    t = time.monotonic()
    with pytest.raises(hotplug.HotplugTimeout, match="gave up after"):
        with hotplug.deadline(0.3, 0.3):
            with cond:
                cond.wait()
    assert time.monotonic() - t < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_interrupts_a_hung_command_and_then_a_hung_cleanup() -> None:
    t = time.monotonic()
    with pytest.raises(hotplug.HotplugTimeout, match="cleanup after the timeout"):
        with hotplug.deadline(0.3, 0.3):
            try:
                SubprocessRunner().run(["sleep", "20"])
            except hotplug.HotplugTimeout:
                SubprocessRunner().run(["sleep", "20"])
    assert time.monotonic() - t < 3
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


class TrackingStack(Stack):
    """A stack whose abort (era out, top linear again) and unwrap are recorded: the real ones
    need dm and root."""

    calls: list[str]

    def abort(self, name: str) -> list[str]:
        self.calls.append(f"abort {name}")
        e = self.journal.load(name)
        assert e is not None
        self.journal.save(e, journal.WRAPPED)
        return [f"aborted {name}"]

    def unwrap(self, name: str, *, force: bool = False) -> None:
        self.calls.append(f"unwrap {name}")
        self.journal.delete(name)


@pytest.mark.parametrize("migrating", [False, True])
def test_remove_ends_the_tracking_of_a_disk_handed_over_here_then_unwraps(tmp_path: Path, migrating: bool) -> None:
    """A domain that came here by `dmmig migrate` has era under its top (the way back is warm);
    when it stops here, remove ends that tracking and unwraps. A migration of it under way
    (a destination set) is dmmig's: left alone."""
    from dmmig.adapters.writefence import Counters
    from dmmig.core import generation
    from dmmig.core.records import TOOK_OVER, CopyState, Destination, WarmTrack
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    r = FakeRunner(top_info("vg0-vm1", 0))
    st = TrackingStack(r, DmSetup(r), journal.Journal(str(tmp_path / "state")))
    st.calls = []
    e = journal.Entry("vg0-vm1", "/dev/vg0/vm1", "254:1")
    e.copy = CopyState(migration="m", warm=WarmTrack("g1", 1, Counters("254:1", 3, 0, 0), Counters("253:5", 4, 0, 0)))
    if migrating:
        e.dest = Destination(host="b", disk="/dev/vg0/vm1", user="root", port=22, known_hosts="/k")
    st.journal.save(e, journal.PREPARED)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    generation.record(st.journal.dir, "vg0-vm1", TOOK_OVER, str(disk), 4096, "g1", "a", r)
    rc, log = run("remove", xs, st)
    assert rc == 0, log
    if migrating:
        assert st.calls == [] and any("left for dmmig" in ln for ln in log), log
        assert generation.load(st.journal.dir, "vg0-vm1") is not None
        return
    assert st.calls == ["abort vg0-vm1", "unwrap vg0-vm1"], st.calls
    assert any("stopped tracking vg0-vm1" in ln for ln in log) and any("forgot the generation" in ln for ln in log)
    assert generation.load(st.journal.dir, "vg0-vm1") is None and st.journal.load("vg0-vm1") is None


ERA_INFO = "dmmig-vg0-vm1-era;253;5;L--w;0;1;0;DMMIG-era-vg0-vm1\n"


def _deadline(argv: list[str]) -> tuple[int, str, str]:
    # what the script's SIGALRM handler raises in the main thread while a command runs
    raise hotplug.HotplugTimeout("gave up after 26s (libxl allows 40s)")


@pytest.mark.parametrize("gate_generation", [True, False])
@pytest.mark.parametrize("how", ["era busy", "deadline at the top's removal"])
def test_the_gates_generation_survives_a_remove_that_failed_partway(
        tmp_path: Path, how: str, gate_generation: bool) -> None:
    """The order on Xen after the gate's yes: libxl destroys the guest on the source and runs
    block-dmmig's remove, which finishes the handed-over disk (finish_handed_over); `dmmig
    migrate` then finishes whatever it left with the same call. A remove that fails partway
    leaves the journal in phase finishing (a teardown step failed: here the era device is held),
    or wrapped with the mirror's record reset (the script's deadline while the top was being
    removed). The second finish must keep the generation the gate's yes recorded: it dropped it
    as if the yes had recorded none (the Xen warm test found no NAME.warm.json on a). A gate
    that recorded none still leaves none, an older record included."""
    from dmmig.adapters import writefence
    from dmmig.core import generation
    from dmmig.core.records import KEPT, Warm
    from dmmig.flows.finish import finish_handed_over
    name = "vg0-vm1"
    xs = MemXenStore(backend_keys(params="/dev/vg0/vm1", mode="w", physical_device="fd:4"))
    table = (["dmsetup", "table", f"dmmig-{name}"], (0, "0 2048 linear 254:1 0\n", ""))
    era: list[tuple[list[str], Any]] = [(INFO + [f"dmmig-{name}-era"], (0, ERA_INFO, ""))]
    if how == "era busy":
        fail: list[tuple[list[str], Any]] = era + [(["dmsetup", "remove", "--retry", f"dmmig-{name}-era"],
                                                    (1, "", "remove ioctl failed: Device or resource busy"))]
    else:
        fail = [(["dmsetup", "remove", "--retry", f"dmmig-{name}"], _deadline)]
    st, _ = stack(tmp_path, [table] + fail + top_info(name, 0))
    e = journal.Entry(name, "/dev/vg0/vm1", "254:1")
    e.mirror = MirrorState(handover=Handover(ok=True, delivered=True, why="in sync",
                                             generation="g1" if gate_generation else None))
    st.journal.save(e, journal.MIRRORING)
    # the gate's half here (or an older one, when the yes recorded none: the gate drops it;
    # here it was left, so that the finish's own drop shows)
    generation.save(st.journal.dir, Warm(name, "g1" if gate_generation else "g0", KEPT, "/dev/vg0/vm1", 2048 * 512,
                                         time.time(), writefence.Fence("/dev/vg0/vm1", "boot")))

    rc, log = run("remove", xs, st)  # block-dmmig's remove on the source
    left = st.journal.load(name)
    assert rc != 0 and left is not None, log
    assert left.phase == (journal.FINISHING if how == "era busy" else journal.WRAPPED), left.phase

    # `dmmig migrate`'s _finish_source, once xl migrate ended: nothing fails now
    st2, _ = stack(tmp_path, [table] + (era if how == "era busy" else []) + top_info(name, 0))
    done = finish_handed_over(st2, name, node=None, params="/dev/vg0/vm1", close_wait_s=0)
    assert st2.journal.load(name) is None, done
    rec = generation.load(st2.journal.dir, name)
    if gate_generation:
        assert rec is not None and rec.generation == "g1" and rec.role == KEPT, (done, log)
    else:
        assert rec is None, rec
