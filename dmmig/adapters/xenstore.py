"""XenStore adapter (pyxs): the few operations dmmig needs, with str paths and values.

Paths may be relative: xenstored resolves them against the caller's domain home
(/local/domain/0 in dom0), which is how libxl hands a hotplug script its XENBUS_PATH.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Protocol

from dmmig.errors import ToolError


class XenStoreError(ToolError):
    """xenstored refused or is unreachable."""


class XenStore(Protocol):
    def read(self, path: str) -> str | None:
        """The value at PATH, or None if PATH does not exist."""
        ...

    def write(self, path: str, value: str) -> None: ...

    def list(self, path: str) -> list[str]:
        """The names of PATH's children; [] if PATH does not exist."""
        ...


class PyxsXenStore:
    """One connection to xenstored's unix socket (pyxs's default: $XENSTORED_PATH or
    /var/run/xenstored/socket). Use as a context manager.

    pyxs waits for each answer without a timeout: callers that must finish in time (the
    hotplug script) bound the whole run with an alarm instead."""

    def __init__(self, socket_path: str | None = None) -> None:
        # imported here: 40 ms of every `dmmig agent` start in the rig, which only a Xen host's
        # handover uses
        import pyxs
        self._client = pyxs.Client(unix_socket_path=socket_path)
        self._error: type[Exception] = pyxs.PyXSError
        self._socket = socket_path

    def __enter__(self) -> PyxsXenStore:
        try:
            self._client.connect()
        except (self._error, OSError) as e:
            raise XenStoreError(f"cannot connect to xenstored ({self._socket or 'default socket'}): {e}",
                                hint="is xenstored running, and are we root in dom0?") from e
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._client.close()

    def read(self, path: str) -> str | None:
        try:
            raw: bytes = self._client.read(_enc("path", path))
        except self._error as e:
            if e.args and e.args[0] == errno.ENOENT:
                return None
            raise XenStoreError(f"xenstore read {path}: {e}") from e
        return raw.decode("ascii", errors="replace")

    def write(self, path: str, value: str) -> None:
        try:
            self._client.write(_enc("path", path), _enc("value", value))
        except self._error as e:
            raise XenStoreError(f"xenstore write {path}: {e}") from e


    def list(self, path: str) -> list[str]:
        try:
            raw: list[bytes] = self._client.list(_enc("path", path))
        except self._error as e:
            if e.args and e.args[0] == errno.ENOENT:
                return []
            raise XenStoreError(f"xenstore list {path}: {e}") from e
        return [c.decode("ascii", errors="replace") for c in raw if c]


def _enc(what: str, s: str) -> bytes:
    # XenStore carries 7-bit ASCII only (pyxs refuses anything else with a bare ValueError)
    try:
        b = s.encode("ascii")
    except UnicodeEncodeError:
        raise XenStoreError(f"xenstore {what} {s!r} is not ASCII") from None
    if any(c < 0x20 or c == 0x7f for c in b) or not b:
        raise XenStoreError(f"xenstore {what} {s!r} is empty or has control characters")
    return b


def default_socket() -> str:
    """xenstored's socket, as pyxs finds it."""
    return os.environ.get("XENSTORED_PATH") or os.path.join(os.environ.get("XENSTORED_RUNDIR", "/var/run/xenstored"),
                                                            "socket")


def is_dom0() -> bool:
    try:
        with open("/proc/xen/capabilities") as f:
            return "control_d" in f.read()
    except OSError:
        return False


@contextmanager
def local() -> Iterator[XenStore | None]:
    """This host's XenStore; None on a host that runs no Xen. A dom0 whose xenstored cannot be
    reached is an error: what its domains use cannot be told then."""
    sock = default_socket()
    if not os.path.exists(sock):
        if is_dom0():
            raise XenStoreError(f"this host is a Xen dom0, but xenstored's socket {sock} is missing: cannot tell "
                                "which disks its domains use", hint="start xenstored")
        yield None
        return
    with PyxsXenStore() as xs:
        yield xs
