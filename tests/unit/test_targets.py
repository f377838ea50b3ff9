"""dmmig.adapters.dm.targets without a kernel: exact rendering, validation, and parsing of text the
real kernel wrote (captured by tests/kernel/test_targets.py into fixtures/kernel_output.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.dm.targets import (
    CoreLog,
    DiskLog,
    Era,
    EraStatus,
    Linear,
    Mirror,
    MirrorSet,
    MirrorStatus,
    Other,
    ParseError,
    Table,
)

KERNEL = json.loads((Path(__file__).parent / "fixtures" / "kernel_output.json").read_text())


# ---- rendering: exact strings -------------------------------------------------------------

@pytest.mark.parametrize("target, text", [
    (Linear(2048, "7:0"), "0 2048 linear 7:0 0"),
    (Linear(28672, "/dev/loop3", 2048), "0 28672 linear /dev/loop3 2048"),
    (Era(131072, "7:2", "254:1", 128), "0 131072 era 7:2 254:1 128"),
    (Era(100, "/dev/m", "/dev/o", 24), "0 100 era /dev/m /dev/o 24"),  # kernel: multiple of 8, any
    (Mirror(32768, CoreLog(128), ("7:0", "7:1")), "0 32768 mirror core 1 128 2 7:0 0 7:1 0"),
    (Mirror(32768, CoreLog(128, "nosync"), ("7:0", "7:1")),
     "0 32768 mirror core 2 128 nosync 2 7:0 0 7:1 0"),
    (Mirror(32768, CoreLog(1024, "sync"), ("7:0", "7:1", "7:2")),
     "0 32768 mirror core 2 1024 sync 3 7:0 0 7:1 0 7:2 0"),
    (Mirror(32768, DiskLog("7:2", 128), ("7:0", "7:1")), "0 32768 mirror disk 2 7:2 128 2 7:0 0 7:1 0"),
    (Mirror(32768, DiskLog("7:2", 128, "nosync"), ("7:0", "7:1")),
     "0 32768 mirror disk 3 7:2 128 nosync 2 7:0 0 7:1 0"),
    (Mirror(41943040, CoreLog(1024), ("253:3", "43:0"), handle_errors=True),
     "0 41943040 mirror core 1 1024 2 253:3 0 43:0 0 1 handle_errors"),
    (Mirror(64, DiskLog("7:5", 2), ("7:0", "7:1"), handle_errors=True, keep_log=True),
     "0 64 mirror disk 2 7:5 2 2 7:0 0 7:1 0 2 handle_errors keep_log"),
    (Other(32768, "error"), "0 32768 error"),
    (Other(32768, "flakey", ("7:1", "0", "0", "5", "1", "error_writes")),
     "0 32768 flakey 7:1 0 0 5 1 error_writes"),
])
def test_render_exact(target: Any, text: str) -> None:
    t = Table(target)
    assert t.render() == text
    assert t.length == target.length
    assert Table.parse(text) == t
    assert Table.parse(text + " \n") == t  # the kernel leaves a trailing space on some targets


def test_region_count_rounds_up() -> None:
    assert Mirror(32768, CoreLog(128), ("a", "b")).region_count == 256
    assert Mirror(32769, CoreLog(128), ("a", "b")).region_count == 257
    assert Mirror(1, CoreLog(2), ("a", "b")).region_count == 1


def test_targets_are_value_objects() -> None:
    a = Mirror(64, CoreLog(8, "nosync"), ("7:0", "7:1"), handle_errors=True)
    b = Mirror(64, CoreLog(8, "nosync"), ("7:0", "7:1"), handle_errors=True)
    assert a == b and hash(a) == hash(b)
    assert a != Mirror(64, CoreLog(8), ("7:0", "7:1"), handle_errors=True)
    assert Linear(8, "7:0") != Linear(8, "7:0", 8)


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("rs", [0, 1, 3, 96, 100, 1000, -128])
def test_mirror_region_size_must_be_power_of_two(rs: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Mirror(32768, CoreLog(rs), ("a", "b"))
    with pytest.raises(ValueError, match="power of two"):
        Mirror(32768, DiskLog("l", rs), ("a", "b"))


@pytest.mark.parametrize("rs", [2, 8, 128, 1024, 1 << 20])
def test_mirror_region_size_powers_of_two_accepted(rs: int) -> None:
    assert Mirror(1 << 21, CoreLog(rs), ("a", "b")).log.region_sectors == rs


def test_keep_log_requires_handle_errors() -> None:
    with pytest.raises(ValueError, match="keep_log requires handle_errors"):
        Mirror(64, CoreLog(8), ("a", "b"), keep_log=True)
    Mirror(64, CoreLog(8), ("a", "b"), handle_errors=True, keep_log=True)


@pytest.mark.parametrize("legs", [(), ("a",), tuple("abcdefghij")])
def test_mirror_leg_count(legs: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="2..9 legs"):
        Mirror(64, CoreLog(8), legs)


def test_mirror_nine_legs_ok() -> None:
    m = Mirror(64, CoreLog(8), tuple("abcdefghi"))
    assert Table.parse(Table(m).render()) == Table(m)


@pytest.mark.parametrize("bs", [0, -8, 1, 4, 12, 100, 130])
def test_era_block_size_multiple_of_8(bs: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        Era(1024, "m", "o", bs)


@pytest.mark.parametrize("bs", [8, 24, 128, 1000, 2048])
def test_era_block_size_ok(bs: int) -> None:
    assert Era(1024, "m", "o", bs).block_sectors == bs


# ---- table parsing -------------------------------------------------------------------------

def test_parse_unknown_target_is_other() -> None:
    t = Table.parse("0 100 striped 2 8 7:0 0 7:1 0\n")
    assert t == Table(Other(100, "striped", ("2", "8", "7:0", "0", "7:1", "0")))
    assert t.target.name == "striped"
    assert t.render() == "0 100 striped 2 8 7:0 0 7:1 0"


def test_parse_mirror_variants() -> None:
    m = Table.parse("0 32768 mirror core 2 128 nosync 2 7:0 0 254:0 0 1 handle_errors").target
    assert m == Mirror(32768, CoreLog(128, "nosync"), ("7:0", "254:0"), handle_errors=True)
    m = Table.parse("0 64 mirror disk 3 7:2 8 sync 2 7:0 0 7:1 0 2 handle_errors keep_log").target
    assert m == Mirror(64, DiskLog("7:2", 8, "sync"), ("7:0", "7:1"), True, True)
    m = Table.parse("0 64 mirror disk 2 7:2 8 2 7:0 0 7:1 0").target
    assert isinstance(m, Mirror) and isinstance(m.log, DiskLog) and m.log.sync is None
    assert not m.handle_errors and not m.keep_log


@pytest.mark.parametrize("text, why", [
    ("", "0 lines"),
    ("0 10 linear 7:0 0\n10 10 linear 7:1 0\n", "not a mirror set"),
    ("0 8 mirror core 1 8 2 7:0 0 7:1 0\n16 8 mirror core 1 8 2 7:0 16 7:1 16\n", "does not follow"),
    ("0 8 mirror core 1 8 2 7:0 0 7:1 0\n8 8 mirror core 1 8 2 7:0 0 7:1 0\n", "maps its legs from 0"),
    ("0 8 mirror core 1 8 2 7:0 0 7:1 0\n8 8 mirror core 1 8 2 7:0 8 7:1 9\n", r"offsets \[8, 9\] differ"),
    ("0 10", "bad table line"),
    ("8 10 linear 7:0 0", "does not start at sector 0"),
    ("0 10 linear 7:0", "linear table needs 2 args"),
    ("0 10 linear 7:0 0 extra", "linear table needs 2 args"),
    ("0 10 era 7:0 7:1", "era table needs 3 args"),
    ("0 10 era 7:0 7:1 8 9", "era table needs 3 args"),
    ("0 64 mirror userspace 2 x 8 2 7:0 0 7:1 0", "unknown mirror log type"),
    ("0 64 mirror core 1 8 2 7:0 0", "bad mirror table"),
    ("0 64 mirror core 1 8", "bad mirror table"),
    ("0 64 mirror core", "bad mirror table"),
    ("0 64 mirror core 1 8 2 7:0 0 7:1 2048", "offsets"),
])
def test_parse_errors(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        Table.parse(text)


def test_parse_mirror_validation_still_applies() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Table.parse("0 64 mirror core 1 96 2 7:0 0 7:1 0")


# ---- status parsing ------------------------------------------------------------------------

def test_era_status_synthetic() -> None:
    assert EraStatus.parse("0 131072 era 8 20/1024 3 -") == EraStatus(8, 20, 1024, 3, None)
    assert EraStatus.parse("0 131072 era 8 12/1024 2 28\n") == EraStatus(8, 12, 1024, 2, 28)


@pytest.mark.parametrize("line", [
    "0 131072 linear", "0 131072 mirror 2 7:0 7:1 1/1 1 AA 1 core", "0 131072 era 8 20 3 -",
    "0 131072 era 8 20/1024 3", "0 131072 era 8 x/1024 3 -", "0 131072 era 8 20/1024 3 snap", "",
])
def test_era_status_errors(line: str) -> None:
    with pytest.raises(ParseError):
        EraStatus.parse(line)


def test_mirror_status_synthetic() -> None:
    st = MirrorStatus.parse("0 131072 mirror 2 254:1 43:0 1024/1024 1 AA 1 core")
    assert st == MirrorStatus(("254:1", "43:0"), 1024, 1024, "AA", "core")
    assert st.synced and st.healthy and st.failed_legs == []
    st = MirrorStatus.parse("0 131072 mirror 2 254:1 43:0 12/128 1 AD 3 disk 7:2 A")
    assert st == MirrorStatus(("254:1", "43:0"), 12, 128, "AD", "disk", "7:2", "A")
    assert not st.synced and not st.healthy and st.failed_legs == [1]
    st = MirrorStatus.parse("0 64 mirror 3 7:0 7:1 7:2 1/1 1 SAR 1 core")
    assert st.failed_legs == [0, 2]


def test_mirror_status_log_failure_is_unhealthy() -> None:
    st = MirrorStatus.parse("0 64 mirror 2 7:0 7:1 1/1 1 AA 3 disk 7:2 D")
    assert st.health == "AA" and st.log_health == "D" and not st.healthy
    assert not MirrorStatus.parse("0 64 mirror 2 7:0 7:1 1/1 1 AA 3 disk 7:2 F").healthy


def test_mirror_status_sync_ratio_alone_does_not_mean_healthy() -> None:
    # without handle_errors a dead leg still reaches N/N
    st = MirrorStatus.parse("0 64 mirror 2 7:0 7:1 256/256 1 AD 1 core")
    assert st.synced and not st.healthy


@pytest.mark.parametrize("line", [
    "0 64 era 8 20/1024 3 -",
    "0 64 mirror 2 7:0 7:1 1/1 1 AAA 1 core",   # 2 legs, 3 health chars
    "0 64 mirror 2 7:0 7:1 1of1 1 AA 1 core",
    "0 64 mirror 2 7:0 7:1 1/1 1 AA",
    "0 64 mirror 2 7:0 7:1 1/1 1 AA 3 disk 7:2",
    "0 64 mirror",
])
def test_mirror_status_errors(line: str) -> None:
    with pytest.raises(ParseError):
        MirrorStatus.parse(line)


# ---- real kernel output (Linux 6.1, captured) ----------------------------------------------

CASES = sorted(k for k in KERNEL if not k.startswith("_"))


def test_capture_has_every_case() -> None:
    assert set(CASES) >= {"linear", "era", "mirror_core", "mirror_disk", "mirror_failed_flakey",
                          "mirror_failed_error"}
    assert KERNEL["_about"]["kernel"].startswith("6.1")


@pytest.mark.parametrize("case", CASES)
def test_kernel_table_roundtrips(case: str) -> None:
    c = KERNEL[case]
    t = Table.parse(c["table"])
    assert t.render() == c["table"].strip() == c["rendered"]
    assert Table.parse(c["rendered"]) == t


def test_kernel_linear() -> None:
    c = KERNEL["linear"]
    t = Table.parse(c["table"]).target
    assert isinstance(t, Linear) and t.offset == 2048 and t.length == 28672
    # linear has no status fields (just a trailing space)
    assert c["status"].split() == ["0", "28672", "linear"]


def test_kernel_era() -> None:
    c = KERNEL["era"]
    t = Table.parse(c["table"]).target
    assert isinstance(t, Era) and t.block_sectors == c["block_sectors"] == 128
    st = EraStatus.parse(c["status"])
    assert st.metadata_block_sectors == 8 and st.current_era == c["first_era"] >= 1
    assert st.snapshot_block is None and 0 < st.metadata_used < st.metadata_total
    snap = EraStatus.parse(c["status_snap"])
    assert snap.current_era == st.current_era + 1 and snap.snapshot_block is not None
    dropped = EraStatus.parse(c["status_dropped"])
    assert dropped.snapshot_block is None and dropped.current_era == snap.current_era


def test_kernel_mirror_core() -> None:
    c = KERNEL["mirror_core"]
    t = Table.parse(c["table"]).target
    assert isinstance(t, Mirror) and t.log == CoreLog(128, "nosync") and list(t.legs) == c["legs"]
    st = MirrorStatus.parse(c["status"])
    assert st == MirrorStatus(tuple(c["legs"]), 256, 256, "AA", "core")
    assert st.healthy and st.synced


def test_kernel_mirror_disk() -> None:
    c = KERNEL["mirror_disk"]
    t = Table.parse(c["table"]).target
    assert isinstance(t, Mirror) and t.log == DiskLog(c["log"], 128) and not t.handle_errors
    st = MirrorStatus.parse(c["status"])
    assert st == MirrorStatus(tuple(c["legs"]), 256, 256, "AA", "disk", c["log"], "A")
    assert st.healthy and st.synced
    first = MirrorStatus.parse(c["status_first"])
    assert first.log_kind == "disk" and first.regions == 256


@pytest.mark.parametrize("kind", ["flakey", "error"])
def test_kernel_mirror_failed_leg(kind: str) -> None:
    c = KERNEL[f"mirror_failed_{kind}"]
    t = Table.parse(c["table"]).target
    assert isinstance(t, Mirror) and t.handle_errors and not t.keep_log and list(t.legs) == c["legs"]
    before = MirrorStatus.parse(c["status_before"])
    assert before.healthy and before.synced
    for key in ("status", "status_after_resume"):
        st = MirrorStatus.parse(c[key])
        assert st.health == "AD" and st.failed_legs == [1] and not st.healthy
        assert st.legs == tuple(c["legs"]) and st.log_kind == "core"
        assert st.in_sync < st.regions  # the failed write's region went out of sync
    bad = Table.parse(c["bad_table"]).target
    assert isinstance(bad, Other) and bad.kind == kind


def test_a_mirror_set_renders_one_line_per_part_and_parses_back() -> None:
    parts = tuple(Mirror(8, DiskLog(f"7:{2 + i}", 8), ("254:1", "43:0"), handle_errors=True, keep_log=True,
                         offset=8 * i) for i in range(3))
    t = Table(MirrorSet(parts))
    assert t.render().splitlines() == [
        f"{8 * i} 8 mirror disk 2 7:{2 + i} 8 2 254:1 {8 * i} 43:0 {8 * i} 2 handle_errors keep_log" for i in range(3)]
    assert Table.parse(t.render()) == t and t.length == 24 and t.target.legs == ("254:1", "43:0")


def test_the_status_of_a_mirror_set_adds_up_and_is_as_sick_as_its_worst_part() -> None:
    text = ("0 8 mirror 2 254:1 43:0 3/4 1 AA 3 disk 7:2 A\n"
            "8 8 mirror 2 254:1 43:0 4/4 1 AD 3 disk 7:3 A\n"
            "16 8 mirror 2 254:1 43:0 1/4 1 AA 3 disk 7:4 F\n")
    st = MirrorStatus.parse_lines(text)
    assert (st.in_sync, st.regions, st.health, st.log_health) == (8, 12, "AD", "F")
    assert not st.healthy and not st.synced and st.failed_legs == [1]
    ok = MirrorStatus.parse_lines(text.replace("AD", "AA").replace("7:4 F", "7:4 A").replace("3/4", "4/4")
                                  .replace("1/4", "4/4"))
    assert ok.healthy and ok.synced
