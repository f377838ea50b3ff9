"""udev adapter (pyudev): wait until udev has processed a device-mapper device.

dmsetup already waits for udev through its cookie semaphore when udev runs with lvm2's
rules; we still confirm from the udev database, because a /dev/mapper path that does not
exist yet would let a later write silently create a plain file in /dev.
"""
from __future__ import annotations

import os
import threading
import time

import pyudev

from dmmig.errors import TimedOut

# One udev context per process: each new one looks libudev up with `ldconfig -p` (a process,
# ~0.2 s in the rig; a copy made two, prepare three). libudev is not thread-safe: the lock
# keeps one wait at a time on it (the copy waits in two threads).
_lock = threading.Lock()
_ctx: list[pyudev.Context] = []


def wait_dm_node(name: str, *, present: bool = True, timeout: float = 10.0) -> None:
    """Wait until /dev/mapper/NAME exists (or is gone) and udev has settled on it."""
    with _lock:
        if not _ctx:
            _ctx.append(pyudev.Context())
        _wait(_ctx[0], name, present, timeout)


def _wait(ctx: pyudev.Context, name: str, present: bool, timeout: float) -> None:
    path = f"/dev/mapper/{name}"
    mon = pyudev.Monitor.from_netlink(ctx)
    mon.filter_by("block")
    mon.start()
    deadline = time.monotonic() + timeout
    while True:
        exists = os.path.exists(path)
        if exists == present and (not present or _udev_knows(ctx, path)):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            state = "appear" if present else "go away"
            raise TimedOut(f"{path} did not {state} within {timeout:.0f}s",
                             hint="is systemd-udevd running with lvm2's dm rules (55-dm.rules)?")
        mon.poll(timeout=min(left, 0.5))


def _udev_knows(ctx: pyudev.Context, path: str) -> bool:
    try:
        dev = pyudev.Devices.from_device_file(ctx, path)
    except (pyudev.DeviceNotFoundError, OSError, ValueError):
        return False
    return bool(dev.properties.get("DM_NAME"))
