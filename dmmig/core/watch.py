"""The leg watcher: `dmmig watch NAME`, a daemon started by cutover, stopped by finish/abort.
cutover runs it as `python -m dmmig.entry.watch` (the lean entry there).

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
from collections.abc import Callable

from dmmig.adapters import proc
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.dm.targets import MIRRORS, ParseError
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


def watch(dm: DmSetup, state: str, name: str, top: str, gate: Callable[[], object] | None = None) -> int:
    """GATE: returns once the cutover that started this watcher swapped the mirror in or gave
    up (MirrorSide.start_watcher); the first look is after it."""
    if gate is not None:
        gate()
        proc.reclaim_cpu()  # started at nice 19 (MirrorSide.start_watcher): it watches at 0
    # the counter the last wake returned: a wake then costs a status only. Each of the
    # resync's parts raises an event when in sync, and every process here is taken from the
    # CPU the resync runs on (a rig kernel has one)
    events: int | None = None
    while True:
        if events is None:
            info = dm.info(top)
            if info is None or not isinstance(dm.table(top).target, MIRRORS):
                return 0  # the mirror is gone: finish/abort/catch-up took over
            events = info.events
        try:
            st = dm.mirror_status(top)
        except ParseError:
            events = None  # not a mirror's status any more: look at the table again
            time.sleep(1)
            continue
        if not st.healthy and read_health(state, name) is None:
            record(state, name, LegFailure(failed_at=time.time(), health=st.health, log_health=st.log_health,
                                           events=events, failed_legs=st.failed_legs))
        try:
            events = dm.wait_event(top, events, timeout=3600)
        except CommandError as e:
            if not e.timed_out and dm.info(top) is None:
                return 0
            if not e.timed_out:
                time.sleep(1)  # e.g. a table swap in progress: look again
            events = None

