"""Fixtures. Kernel tests (marked `kernel`) run their commands in a real Linux kernel:
user-mode-linux, booted here by the suite itself. A rig that cannot boot is an error,
never a skip."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.rig import kernel_log, leaks
from tests.rig.uml import ROOT, UmlHost

ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UmlHost]:
    host = UmlHost("a", log_dir=str(tmp_path_factory.mktemp("rig")))
    host.start()
    print(f"\n[rig] kernel a booted in {host.boot_seconds:.1f}s")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UmlHost, UmlHost]]:
    from tests.rig.pair import Pair
    p = Pair(str(tmp_path_factory.mktemp("pair")))
    try:
        a, b = p.start()
        print(f"\n[rig] pair booted: a {a.boot_seconds:.1f}s, b {b.boot_seconds:.1f}s")
        yield a, b
    finally:
        p.stop()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails any kernel test that leaves dm devices, loop devices, nbd attachments,
    processes or journal files behind (and cleans them, so the next test starts clean), and
    any after which a rig kernel logged a BUG, a WARNING or an Oops (with the log lines)."""
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    hosts: list[UmlHost] = []
    for fx in ("rig", "pair"):
        if fx in request.fixturenames:
            v = request.getfixturevalue(fx)
            hosts += list(v) if isinstance(v, tuple) else [v]
    before = leaks.snapshots(hosts)
    for h in hosts:
        h.kmsg_seen = before[h.name].kmsg_last
    yield
    found = []
    logged = []
    alive = [h for h in hosts if h.alive()]
    afters = leaks.snapshots(alive, {h.name: h.kmsg_seen for h in alive})
    for h in alive:
        after = afters[h.name]
        logged += kernel_log.report(h.name, after.kmsg_lines)
        lk = leaks.leaks(before[h.name], after)
        if lk:
            found.append(f"{h.name}: " + ", ".join(lk))
            leaks.clean(h, before[h.name], after)
    if found or logged:
        pytest.fail("\n".join((["test leaked: " + "; ".join(found)] if found else []) + logged), pytrace=False)


def kernel_complaints(hosts: list[UmlHost]) -> list[str]:
    """What `_no_leaks` fails a test with after it: each live host's BUG, WARNING or Oops
    since the mark it took before (the same snapshot, the same report)."""
    return [r for h in hosts if h.alive()
            for r in kernel_log.report(h.name, leaks.snapshot(h, kmsg_since=h.kmsg_seen).kmsg_lines)]


class Disks:
    """Scratch disks in the guest: files in its /dev/shm (fast) behind loop devices."""

    def __init__(self, host: UmlHost) -> None:
        self.host = host
        self.made: list[tuple[str, str]] = []

    def __call__(self, size_mib: int, *, fill_seed: int | None = None) -> str:
        f = f"/dev/shm/disk-{uuid.uuid4().hex[:8]}"
        self.host.run(["truncate", "-s", f"{size_mib}M", f])
        dev = self.host.run(["losetup", "--find", "--show", f]).out.strip()
        self.made.append((dev, f))
        if fill_seed is not None:
            self.host.run([python(), ORACLE, "fill", dev, "--seed", str(fill_seed)])
        return dev

    def cleanup(self) -> None:
        for dev, f in reversed(self.made):
            self.host.run(["losetup", "-d", dev], check=False)
            self.host.run(["rm", "-f", f], check=False)


def python() -> str:
    return str(ROOT / ".venv" / "bin" / "python")


@pytest.fixture
def disks(rig: UmlHost) -> Iterator[Callable[..., str]]:
    d = Disks(rig)
    yield d
    d.cleanup()


@pytest.fixture
def pdisks(pair: tuple[UmlHost, UmlHost]) -> Iterator[tuple[Disks, Disks]]:
    da, db = Disks(pair[0]), Disks(pair[1])
    yield da, db
    da.cleanup()
    db.cleanup()


@pytest.fixture
def name() -> str:
    return f"t{uuid.uuid4().hex[:6]}"
