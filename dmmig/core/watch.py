"""The leg watcher: `dmmig watch NAME`, a daemon started by cutover, stopped by finish/abort.

With `handle_errors keep_log` the mirror raises a dm event when a leg fails but holds no
write (the guest never stalls). Nothing in the kernel remembers *when* that happened, so the
watcher sleeps in `dmsetup wait` (no polling) and writes the first failure it sees, with
the time and the dm event counter, to STATE/NAME.health.json, which `status` shows and the
handover gate checks.
"""
from __future__ import annotations

import json
import os
import time

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.dm.targets import MIRRORS
from dmmig.core.records import HEALTH_VERSION, LegFailure, to_json
from dmmig.errors import CommandError
from dmmig.names import Files


def health_path(state: str, name: str) -> str:
    return Files(state, name).health


def read_health(state: str, name: str) -> LegFailure | None:
    """The watcher's record, or None (none, or unreadable: status then says the time is unknown)."""
    path = health_path(state, name)
    try:
        with open(path) as f:
            data = json.load(f)
        return LegFailure.from_json(data, path) if isinstance(data, dict) else None
    except (FileNotFoundError, ValueError, TypeError):
        return None


def record(state: str, name: str, rec: LegFailure) -> None:
    p = health_path(state, name)
    tmp = f"{p}.tmp"
    rec.version = HEALTH_VERSION
    with open(tmp, "w") as f:
        json.dump(to_json(rec), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def watch(dm: DmSetup, state: str, name: str, top: str) -> int:
    while True:
        info = dm.info(top)
        if info is None or not isinstance(dm.table(top).target, MIRRORS):
            return 0  # the mirror is gone: finish/abort/catch-up took over
        st = dm.mirror_status(top)
        if not st.healthy and read_health(state, name) is None:
            record(state, name, LegFailure(failed_at=time.time(), health=st.health, log_health=st.log_health,
                                           events=info.events, failed_legs=st.failed_legs))
        try:
            dm.wait_event(top, info.events, timeout=3600)
        except CommandError as e:
            if not e.timed_out and dm.info(top) is None:
                return 0
            if not e.timed_out:
                time.sleep(1)  # e.g. a table swap in progress: look again
