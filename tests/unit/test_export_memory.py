"""The export's qemu-nbd keeps its write buffers: no fresh pages per request (dmmig/adapters/nbd.py,
QEMU_NBD_MALLOC). Real qemu-nbd, real libnbd, this machine's kernel; no root."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dmmig.adapters import nbd
from dmmig.adapters.runner import SubprocessRunner

libnbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd (qemu-utils)")

MiB = 1 << 20


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.parametrize("way", ["unix", "tcp"])
def test_the_export_does_not_fault_in_a_fresh_buffer_per_write(tmp_path: Path, way: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: 258 page faults per 1 MiB write (each buffer a fresh mmap, unmapped after), which
    made a TLS copy 4x slower in the rig."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    if way == "unix":
        exp = nbd.start_export(SubprocessRunner(), "d1", str(disk), str(tmp_path / "pid"),
                               socket_path=str(tmp_path / "s"))
    else:
        exp = nbd.start_export(SubprocessRunner(), "d1", str(disk), str(tmp_path / "pid"), addr="127.0.0.1")
    try:
        h = libnbd.NBD()
        h.set_export_name("d1")
        if exp.socket:
            h.connect_unix(exp.socket)
        else:
            h.connect_tcp("127.0.0.1", str(exp.port))
        data = os.urandom(MiB)
        for i in range(32):  # the heap grows to what the requests need (steady after ~30 here)
            h.pwrite(data, i * MiB)
        before = minor_faults(exp.pid)
        for i in range(32, 64):
            h.pwrite(data, i * MiB)
        per_write = (minor_faults(exp.pid) - before) / 32
        h.shutdown()
        # this machine, 2026-12-06: 258 before, 1 after
        assert per_write < 32, f"qemu-nbd faulted in {per_write:.0f} pages per 1 MiB write (a fresh MiB is 256)"
    finally:
        nbd.stop_export(exp)


def test_an_operators_glibc_tunables_come_after_dmmigs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert nbd.qemu_nbd_env() == {"GLIBC_TUNABLES": nbd.QEMU_NBD_MALLOC}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")  # theirs wins
    assert nbd.qemu_nbd_env() == {"GLIBC_TUNABLES": f"{nbd.QEMU_NBD_MALLOC}:glibc.malloc.trim_threshold=0"}
