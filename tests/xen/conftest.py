"""Fixtures for tests on real Xen (marked `xen`): Xen 4.17 + Debian's 6.1 dom0 under QEMU's
software emulation, built from Debian's packages by tests/xenrig. Booted once per session; a
rig that cannot boot is an error, never a skip. The numbers the tests measure (boot
milestones, downtime, QEMU's memory) are printed at the end of the run."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.xenrig.host import XenHost
from tests.xenrig.pair import XenPair, single_host

_REPORT: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    # registered here: pyproject.toml's marker list belongs to the kernel rig's owners
    config.addinivalue_line("markers", "xen: needs the Xen-in-QEMU rig (tests/xenrig; ~1.5 GB RAM per host)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Xen tests boot QEMU machines (minutes of CPU): they run only when asked for with a -m
    expression naming `xen` (e.g. `pytest tests/xen -m xen`), never as part of a plain run."""
    if "xen" in (config.getoption("markexpr") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("xen") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("xen") is not None])
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A Xen test's failure, printed the moment it happens: a run takes many minutes, and
    one interrupted later prints nothing of the failures it had."""
    if report.failed and "xen" in report.keywords:
        import sys
        print(f"\n---- {report.nodeid} ({report.when}) failed ----\n{report.longreprtext}\n", file=sys.stderr,
              flush=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT:
        return
    terminalreporter.section("xen rig measurements")
    for key, value in _REPORT.items():
        terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def xen_report() -> dict[str, Any]:
    """Tests put what they measured here; shown in the terminal summary."""
    return _REPORT


@pytest.fixture(scope="session")
def xen_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenHost]:
    host = single_host(str(tmp_path_factory.mktemp("xenrig")))
    host.start()
    _REPORT["host a milestones (s since QEMU start)"] = dict(host.milestones)
    try:
        yield host
    finally:
        _REPORT["host a QEMU RSS MiB (now, peak)"] = tuple(round(x) for x in host.rss_mib())
        host.stop()


@pytest.fixture(scope="session")
def xen_pair(xen_host: XenHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenPair]:
    """Host b joined to xen_host (pair.a): both run sshd and trust each other."""
    pair = XenPair(str(tmp_path_factory.mktemp("xenpair")), a=xen_host)
    try:
        _, b = pair.start()
        _REPORT["host b milestones (s since QEMU start)"] = dict(b.milestones)
        yield pair
    finally:
        if pair.b is not None:
            _REPORT["host b QEMU RSS MiB (now, peak)"] = tuple(round(x) for x in pair.b.rss_mib())
        pair.stop()
