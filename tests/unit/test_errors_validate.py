"""dmmig.errors.Undo and dmmig.validate."""
from __future__ import annotations

import pytest

from dmmig.errors import BadInput, DmmigError, Exit, TeardownError, Undo
from dmmig.validate import disk_name, era_block_size, parse_size

# ---- Undo -----------------------------------------------------------------------------------


def test_undo_runs_every_step_in_reverse_order() -> None:
    done: list[str] = []
    u = Undo()
    for s in "abc":
        u.push(f"step {s}", lambda s=s: done.append(s))
    u.run("cleanup")
    assert done == ["c", "b", "a"]
    u.run("again")  # the steps were consumed
    assert done == ["c", "b", "a"]


def test_undo_goes_on_after_failures_and_reports_each() -> None:
    done: list[str] = []

    def fail(msg: str) -> None:
        done.append(msg)
        raise RuntimeError(msg)

    u = Undo()
    u.push("remove era", lambda: done.append("era"))
    u.push("resume top", lambda: fail("resume failed"))
    u.push("remove mirror", lambda: done.append("mirror"))
    u.push("detach nbd", lambda: fail("nbd busy"))
    with pytest.raises(TeardownError) as e:
        u.run("abort disk1")
    assert done == ["nbd busy", "mirror", "resume failed", "era"]
    err = e.value
    assert len(err.errors) == 2
    assert [str(x) for x in err.errors] == ["detach nbd: nbd busy", "resume top: resume failed"]
    assert all(isinstance(x, DmmigError) for x in err.errors)
    assert "abort disk1: 2 step(s) failed" in err.message
    assert "detach nbd: nbd busy" in err.message and "resume top: resume failed" in err.message
    assert err.exit_code == Exit.STATE and err.hint


def test_undo_does_not_swallow_keyboard_interrupt() -> None:
    u = Undo()

    def interrupt() -> None:
        raise KeyboardInterrupt

    u.push("x", interrupt)
    with pytest.raises(KeyboardInterrupt):
        u.run("x")


# ---- disk_name --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["disk1", "vm-01_root", "a", "A.b+c-d_e", "x" * 96, "9lives", "ab."])
def test_disk_name_ok(name: str) -> None:
    assert disk_name(name) == name


@pytest.mark.parametrize("name", [
    "", "a/b", "/abs", "a b", " a", "a\tb", "a\nb", "..", "a..b", "../etc", ".hidden", "-rf", "_x",
    "a;b", "a$b", "$(id)", "a&b", "a|b", "`id`", "a`b", "a>b", "a<b", "a*b", "a?b", "a'b", 'a"b',
    "a\\b", "a:b", "é", "x" * 97,
])
def test_disk_name_rejected(name: str) -> None:
    with pytest.raises(BadInput, match="invalid disk name"):
        disk_name(name)


# ---- parse_size -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n", [
    ("4096", 4096), ("0", 0), ("64K", 64 << 10), ("64k", 64 << 10), ("1M", 1 << 20), ("1G", 1 << 30),
    ("2T", 2 << 40), ("1.5G", 3 << 29), ("64KiB", 64 << 10), ("64KB", 64 << 10), ("512B", 512),
    (" 8 M ", 8 << 20),
])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "K", "-1K", "1X", "1 MB B", "one", "1,5G", "0x10"])
def test_parse_size_rejected(text: str) -> None:
    with pytest.raises(BadInput, match="invalid size"):
        parse_size(text)


# ---- era_block_size -----------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, sectors", [(4096, 8), (8192, 16), (65536, 128), (1 << 20, 2048)])
def test_era_block_size_ok(nbytes: int, sectors: int) -> None:
    assert era_block_size(nbytes) == sectors


@pytest.mark.parametrize("nbytes", [0, -4096, 512, 1024, 4095, 6000, 65537])
def test_era_block_size_not_multiple_of_4k(nbytes: int) -> None:
    with pytest.raises(BadInput, match="multiple of 4 KiB"):
        era_block_size(nbytes)


@pytest.mark.parametrize("nbytes", [12288, 3 * 65536, 100 * 4096])
def test_era_block_size_not_power_of_two(nbytes: int) -> None:
    with pytest.raises(BadInput, match="power of two"):
        era_block_size(nbytes)
