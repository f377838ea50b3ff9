"""NBD adapters: the destination's export (qemu-nbd) and the source's client (libnbd).

qemu-nbd with --cache=directsync opens the disk O_DIRECT|O_DSYNC: a write is acknowledged
only once it is on the device, below any page cache, which is what blkback on the
destination will read. (nbd-server's `sync` and nbdkit's file plugin give weaker or less
documented guarantees; see the README.)
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from dmmig.errors import DmmigError, RemoteError
from dmmig.runner import Runner


@dataclass
class Export:
    name: str
    path: str
    addr: str
    port: int
    pid: int
    cache: str

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            return False
        return bool(cmd) and cmd[0].endswith(b"qemu-nbd") and self.path.encode() in cmd


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def direct_io_ok(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def start_export(runner: Runner, name: str, path: str, addr: str, pidfile: str) -> Export:
    # directsync = O_DIRECT|O_DSYNC; on a file system without O_DIRECT (tmpfs), writethrough
    # (O_DSYNC through the page cache) still acknowledges only what is stable.
    cache = "directsync" if direct_io_ok(path) else "writethrough"
    for _ in range(5):
        port = free_port(addr)
        res = runner.run(["qemu-nbd", "--fork", f"--pid-file={pidfile}", "--persistent", "--shared=8",
                          "--format=raw", f"--cache={cache}", "--discard=unmap", f"--bind={addr}",
                          f"--port={port}", f"--export-name={name}", path], check=False, timeout=30)
        if res.returncode == 0:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            return Export(name, path, addr, port, pid, cache)
        if "Address already in use" not in res.stderr:
            raise DmmigError(f"qemu-nbd could not export {path}: {res.stderr.strip()}")
    raise DmmigError(f"qemu-nbd found no free port on {addr}")


def stop_export(exp: Export, timeout: float = 10) -> None:
    if not exp.alive():
        return
    os.kill(exp.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while exp.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if exp.alive():
        os.kill(exp.pid, signal.SIGKILL)


def open_client(sock: socket.socket | None, *, addr: str | None = None, port: int | None = None,
                export: str) -> Any:
    """A libnbd handle on the export, over an existing socket (SSH tunnel) or TCP."""
    try:
        import nbd
    except ImportError as e:
        raise DmmigError("python3-libnbd is missing (Debian package python3-libnbd)",
                         hint="run the README's install command (the venv must see Debian's packages)") from e
    h = nbd.NBD()
    h.set_export_name(export)
    try:
        if sock is not None:
            h.connect_socket(sock.detach())
        else:
            assert addr is not None and port is not None
            h.connect_tcp(addr, str(port))
    except nbd.Error as e:
        raise RemoteError(f"cannot connect to the NBD export {export!r}: {e}") from None
    return h
