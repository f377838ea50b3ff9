"""The destination's TCP export (--transport nbd) answers with Nagle's algorithm off.

qemu-nbd 7.2 (Debian 12) leaves Nagle on for the connections it accepts (QEMU turned it off
in 8.0, "nbd/server: Request TCP_NODELAY"): with two requests in flight on the mirror's leg,
the second 16-byte reply waited for the source's delayed ACK, 40 ms (bench/leg_latency.py,
the nbd rows with 16 mirror parts). The oracle is the kernel's own state of the socket qemu-nbd
accepted, read from qemu-nbd's file table (pidfd_getfd), not anything dmmig reports."""
from __future__ import annotations

import ctypes
import os
import shutil
import socket
from pathlib import Path

import pytest

from dmmig.adapters import nbd, tlscreds
from dmmig.adapters.runner import SubprocessRunner

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (unified syscall table)


def nodelay_of_accepted(pid: int, port: int) -> list[int]:
    """TCP_NODELAY of each socket of process PID connected on local PORT (accepted, not listening)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            ours = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if ours < 0:
                err = ctypes.get_errno()
                if err in (1, 38):  # EPERM (yama ptrace_scope), ENOSYS: this machine cannot look
                    pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
                continue
            s = socket.socket(fileno=ours)
            try:
                if (s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockname()[1] == port
                        and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    found.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return found


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd (qemu-utils)")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_every_connection_the_tcp_export_accepts_has_nagle_off(tmp_path: Path, tls: bool) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\0" * (1 << 20))
    creds = None
    if tls:
        creds = str(tmp_path / "tls")
        os.makedirs(creds, mode=0o700)
        tlscreds.make(creds, "127.0.0.1")
    exp = nbd.start_export(SubprocessRunner(), "d1", str(disk), str(tmp_path / "pid"), addr="127.0.0.1", tls=creds)
    try:
        assert exp.port and exp.alive()
        clients = [socket.create_connection(("127.0.0.1", exp.port)) for _ in range(2)]
        for c in clients:  # the newstyle greeting: qemu-nbd has accepted this one
            assert c.recv(8) == b"NBDMAGIC"
        assert nodelay_of_accepted(exp.pid, exp.port) == [1, 1]
        for c in clients:
            c.close()
    finally:
        nbd.stop_export(exp)
