"""NBD adapters: the destination's export (qemu-nbd) and the source's client (libnbd).

qemu-nbd with --cache=directsync opens the disk O_DIRECT|O_DSYNC: a write is acknowledged
only once it is on the device, below any page cache, which is what blkback on the
destination will read. (nbd-server's `sync` and nbdkit's file plugin give weaker or less
documented guarantees; see the README.)
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from dmmig.adapters import listen, proc
from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput, CommandError, MissingDependency, RemoteError


@dataclass
class Export:
    """A qemu-nbd export. --transport ssh: on a unix socket in a root-only directory, reached
    only through SSH; --transport nbd: on ADDR:PORT, with TLS (a directory of x509 credentials,
    verify-peer) unless the operator chose --insecure. A record written before unix sockets
    existed has only addr and port."""
    name: str
    path: str
    pid: int
    cache: str
    addr: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: str | None = None

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            return False
        return bool(cmd) and cmd[0].endswith(b"qemu-nbd") and self.path.encode() in cmd

    @property
    def where(self) -> str:
        if self.socket:
            return f"unix socket {self.socket}"
        return f"{self.addr}:{self.port}" + (" (TLS)" if self.tls else " (no TLS)")


def answers(addr: str, port: int, timeout: float) -> bool:
    """Whether something accepts a TCP connection on ADDR:PORT within TIMEOUT seconds. Asked
    before nbd-client connects there: its connect has no timeout of its own, and a host that
    black-holes the link would hold it for minutes (the kernel's SYN retries)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
        try:
            s.bind((addr, 0))
        except OSError as e:
            raise BadInput(f"cannot listen on {addr} here: {e.strerror}",
                           hint="--nbd-address must be an address of the destination host") from e
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


# qemu-nbd allocates each write's buffer (the copier's are 1 MiB) and frees it once written. Over
# glibc's default mmap threshold every one was a fresh mmap and a munmap: 258 page faults per MiB
# written, ~1 with these once its heap has grown (tests/unit/test_export_memory.py). Under
# user-mode-linux a fault costs ~0.14 ms; with TLS, whose decryption writes those pages in
# userspace, qemu-nbd in a rig kernel spent 3.3-3.7 s of CPU on 96 MiB and the copy took 4.4-4.9
# s, against 1.2 s with the buffers kept (2026-12-06). Fixed thresholds keep up to 32 MiB of
# freed buffers in its heap for the next requests (the copier has 16 in flight).
QEMU_NBD_MALLOC = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432"


def qemu_nbd_env() -> dict[str, str]:
    """qemu-nbd's environment on top of ours: QEMU_NBD_MALLOC, then the operator's own glibc
    tunables, if any (a later setting wins)."""
    own = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{QEMU_NBD_MALLOC}:{own}" if own else QEMU_NBD_MALLOC}


def start_export(runner: Runner, name: str, path: str, pidfile: str, *, socket_path: str | None = None,
                 addr: str | None = None, tls: str | None = None) -> Export:
    """On SOCKET_PATH (a unix socket; its directory must be root-only), or on ADDR (a free TCP
    port) with the x509 server credentials in directory TLS, if given."""
    # directsync = O_DIRECT|O_DSYNC; on a file system without O_DIRECT (tmpfs), writethrough
    # (O_DSYNC through the page cache) still acknowledges only what is stable.
    cache = "directsync" if direct_io_ok(path) else "writethrough"
    base = ["qemu-nbd", "--fork", f"--pid-file={pidfile}", "--persistent", "--shared=8", "--format=raw",
            f"--cache={cache}", "--discard=unmap", f"--export-name={name}"]
    if tls:  # only a client with a certificate of this migration's CA gets in
        base += ["--object", f"tls-creds-x509,id=dmmig-tls,dir={tls},endpoint=server,verify-peer=on",
                 "--tls-creds=dmmig-tls"]
    if socket_path is not None:
        if os.path.lexists(socket_path):
            os.unlink(socket_path)
        res = runner.run([*base, f"--socket={socket_path}", path], check=False, timeout=30, env=qemu_nbd_env())
        if res.returncode != 0:
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr,
                               hint=f"qemu-nbd could not export {path}")
        return Export(name, path, _pid(pidfile), cache, socket=socket_path)
    assert addr is not None
    # TCP: qemu-nbd socket-activated on a listener dmmig.adapters.listen makes (a free port, Nagle off;
    # qemu-nbd 7.2 leaves Nagle on, and a second reply in flight then waits for the client's
    # 40 ms delayed ACK: see dmmig/adapters/listen.py); it prints the port before it execs qemu-nbd
    free_port(addr)  # an address not of this host is the operator's input to fix (BadInput)
    res = runner.run([sys.executable, "-m", "dmmig.adapters.listen", addr, *base, path], check=False, timeout=30,
                     env=qemu_nbd_env())  # listen execs qemu-nbd with it
    port = res.stdout.split()[0] if res.stdout.split() else ""
    if res.returncode == listen.NOT_FOUND:
        raise MissingDependency("command not found: qemu-nbd", hint="install it (see README: the install command)")
    if res.returncode != 0 or not port.isdigit():
        raise CommandError(res.argv, res.returncode, res.stdout, res.stderr,
                           hint=f"qemu-nbd could not export {path} on {addr}")
    return Export(name, path, _pid(pidfile), cache, addr=addr, port=int(port), tls=tls)


def _pid(pidfile: str) -> int:
    with open(pidfile) as f:
        return int(f.read().strip())


def stop_export(exp: Export, timeout: float = 10) -> bool:
    """Stop qemu-nbd; remove its socket and its TLS credentials. Returns whether it is gone,
    every thread of it (proc.exited): then every write it took has reached the disk (a thread
    leaves the kernel only once its write returned; the last one's exit_aio waits for its
    in-flight AIO) and no connection of its can take another."""
    started = proc.start_time(exp.pid) if exp.alive() else None
    if started is not None:
        os.kill(exp.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not proc.exited(exp.pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not proc.exited(exp.pid, started):
            os.kill(exp.pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while not proc.exited(exp.pid, started) and time.monotonic() < deadline:
                time.sleep(0.05)
    if exp.socket and os.path.lexists(exp.socket):
        os.unlink(exp.socket)
    if exp.tls:
        shutil.rmtree(exp.tls, ignore_errors=True)
    return started is None or proc.exited(exp.pid, started)


def load_client() -> None:
    """Load libnbd's binding now, where the caller has time to spare (the copy: while the
    destination's agent starts); 0.13 s in the rig otherwise, on the copy's critical path.
    Missing, it is open_client that says so."""
    try:
        import nbd  # noqa: F401
    except ImportError:
        pass


def open_client(sock: socket.socket | None, *, addr: str | None = None, port: int | None = None,
                export: str, tls: str | None = None) -> Any:
    """A libnbd handle on the export, over an existing socket (the SSH relay) or TCP; with TLS
    DIR (ca-cert.pem, client-cert.pem, client-key.pem) the server must prove it holds this
    migration's server certificate, for ADDR, and the client presents its own."""
    try:
        import nbd
    except ImportError as e:
        raise MissingDependency("python3-libnbd is missing (Debian package python3-libnbd)",
                         hint="run the README's install command (the venv must see Debian's packages)") from e
    h = nbd.NBD()
    h.set_export_name(export)
    try:
        if tls:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(tls)
            h.set_tls_verify_peer(True)
        if sock is not None:
            h.connect_socket(sock.detach())
        else:
            assert addr is not None and port is not None
            h.connect_tcp(addr, str(port))
    except nbd.Error as e:
        raise RemoteError(f"cannot connect to the NBD export {export!r}: {e}") from e
    return h
