"""The handover: the source's answer to the destination's gate (is every write there?), and
`dmmig handover` to answer it by hand.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from dmmig.adapters import writefence
from dmmig.adapters.ssh import close_quietly
from dmmig.core import gate, journal
from dmmig.core.copier import Copier
from dmmig.core.records import Handover, to_json
from dmmig.core.stack import Stack
from dmmig.core.window import Window, WindowClosed
from dmmig.errors import DmmigError, RemoteError, StateError
from dmmig.flows.session import Remote, start_export
from dmmig.names import era_name, top_name


# ---- handover gate (the source's side; see dmmig/core/gate.py) --------------------------------
def handover(stack: Stack, name: str, *, timeout: float = 300, cap: float = gate.SUSPEND_CAP_S) -> dict[str, Any]:
    """Wait for the destination's `add` to ask about NAME, then answer it (answer_gate)."""
    entry = mirroring_entry(stack, name)
    with stack.journal.lock(name):
        remote = Remote(entry.destination())
        try:
            asked = remote.agent.call("await_gate", names=[name], timeout=timeout)["asked"]
            if asked is None:
                raise RemoteError(f"the destination did not ask for {name} within {timeout:.0f}s",
                                  hint="its block script asks when `xl migrate` connects the disk there")
            h = answer_gate(stack, entry, remote, cap=cap)
        finally:
            remote.close()
    if not h["ok"]:
        raise RemoteError(f"handover of {name} refused: {h['why']}", hint="the guest stays on this host; "
                          f"`dmmig copy {name}` + `dmmig cutover {name}` to retry, or `dmmig abort {name}`")
    if h["delivered"] is None:
        raise RemoteError(f"{name}: the destination did not confirm the yes within the {cap:.0f}s window: "
                          "whether its `add` got it is unknown",
                          hint="where the guest runs decides: `xl list` on both hosts")
    if not h["delivered"]:
        raise RemoteError(f"the destination stopped waiting for {name} before the answer came",
                          hint="its `add` failed: the guest stays on this host")
    return {"name": name, **h}


MIN_YES_S = 1.0  # a yes needs this much of the window left to reach the destination


def mirroring_entry(stack: Stack, name: str) -> journal.Entry:
    entry = stack.entry_of(name)
    if entry.phase != journal.MIRRORING or not entry.mirror.synced:
        raise StateError(f"{name} is not mirroring (phase {entry.phase}): nothing to hand over",
                         hint=f"`dmmig cutover {name}` first")
    return entry


def answer_gate(stack: Stack, entry: journal.Entry, remote: Remote, *,
                cap: float = gate.SUSPEND_CAP_S) -> dict[str, Any]:
    """The destination asked about ENTRY (its lock is held): vouch for the disk. With the top
    device suspended (every write that was acknowledged is through the mirror), check that
    every region is in sync, every leg alive and no dm event came since the sync; otherwise
    first copy what era recorded since the cutover; a yes is sent while still suspended.
    The window is capped at CAP seconds (dmmig/core/window.py): past it the top resumes whatever
    is under way and the answer is no. A no is sent after the resume. Returns the journaled
    record: ok, why, caught_up_bytes, seconds (suspended), delivered (None: a yes whose
    delivery the destination did not confirm in time)."""
    top, era = top_name(entry.name), era_name(entry.name)
    win = Window(cap, lambda: stack.dm.resume(top))
    ok, why, sent = False, "", 0
    delivered: bool | None = False
    win.start()
    try:
        stack.dm.suspend(top)
        try:
            ok, why, sent = _vouch(stack, entry, remote, top, era, win)
            win.check("before the answer")
            if win.remaining() < MIN_YES_S:
                raise WindowClosed(f"too little of the {cap:.0f}s window was left to deliver a yes")
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the answer is no
            ok, why = False, e.message if isinstance(e, DmmigError) else f"{type(e).__name__}: {e}"
        if ok:  # while suspended: nothing can be written between the check and the yes
            try:
                delivered = bool(remote.agent.call("answer_gate", name=entry.name, ok=True, why=why,
                                                   deadline_s=max(win.remaining(), 0.1))["delivered"])
            except DmmigError as e:
                delivered = None
                why += f"; the destination did not confirm the yes: {e.message}"
    finally:
        seconds = win.close()  # always: if the guest resumes here, it must find its disk
    if not ok:
        try:
            delivered = bool(remote.agent.call("answer_gate", name=entry.name, ok=False, why=why,
                                               deadline_s=gate.NO_DELIVERY_S)["delivered"])
        except DmmigError as e:  # the destination's `add` refuses on its own when no answer comes
            why += f"; the no could not be delivered either: {e.message}"
    entry.mirror.handover = Handover(at=time.time(), ok=ok, why=why, caught_up_bytes=sent,
                                     seconds=round(seconds, 3), cap_seconds=cap, delivered=delivered)
    stack.journal.save(entry)
    return to_json(entry.mirror.handover)


def _vouch(stack: Stack, entry: journal.Entry, remote: Remote, top: str, era: str,
           win: Window) -> tuple[bool, str, int]:
    # an adopted LV that LVM reloaded since: writes went past era and the mirror, nothing tells
    # which; the destination must not start on that disk
    problem = stack.lv_problem(entry)
    if problem is not None:
        return False, problem, 0
    st = stack.dm.mirror_status(top)
    info = stack.dm.info(top)
    assert info is not None
    assert entry.mirror.synced is not None  # mirroring_entry checked it
    at_sync = entry.mirror.synced.events
    if st.synced and st.healthy and info.events == at_sync:
        return True, "every region in sync, every leg alive, no dm event since the sync", 0
    # the leg failed (or something happened) since the sync: era knows every block written since
    # the cutover, and with the top suspended that set is final
    broken = f"the mirror was not intact (health {st.health}, dm events {info.events}, {at_sync} at sync)"
    # should not happen: the mirror takes no discard (cutover.no_discards). One that reached era
    # all the same, with the leg failed, went to leg 0 alone, and if era's limit did not hold
    # either it recorded the first block only: no catch-up in the window can tell, so no
    discarded = writefence.discards_since(entry.copy.discards, stack.discards(entry.name))
    if discarded:
        return False, f"{broken}, and {discarded}: `dmmig copy` sends the whole disk, not in this window", 0
    assert entry.metadata and entry.block_sectors
    ranges, _ = stack.era.dirty(era, entry.metadata, int(entry.copy.next_since or 0))
    win.check("while era was queried")
    bs = entry.block_sectors * 512
    size = stack.dm.table(top).length * 512
    extents = [(r.begin * bs, min(r.end * bs, size) - r.begin * bs) for r in ranges if r.begin * bs < size]
    delta = sum(n for _, n in extents)
    rate = copy_rate(entry)
    if rate and delta / rate > win.remaining():
        return False, (f"{broken}, and the {delta} bytes era recorded since the cutover would take ~"
                       f"{delta / rate:.0f}s at the {rate / (1 << 20):.1f} MiB/s the copy reached: more than the "
                       f"{win.remaining():.0f}s left of the {win.cap:.0f}s the guest's disk may stay suspended"), 0
    export = start_export(remote, entry.destination(), entry.name, deadline_s=max(win.remaining(), 0.1))
    win.check("while the export started")
    # a handshake over a dead link blocks in libnbd: only closing the connection under it ends it
    unhook = win.on_expiry(lambda: close_quietly(remote.ssh))
    try:
        h = remote.nbd(export, entry.name)
    finally:
        unhook()
    win.check("while the NBD client connected")
    kill = _SocketKill(h.aio_get_fd())
    unhook = win.on_expiry(kill)
    try:
        c = Copier(entry.origin, h, dest_zero=False, on_progress=lambda n: win.check("during the catch-up")
                   ).copy(extents)
        h.shutdown()
    except BaseException:
        kill()  # in-flight writes die with the connection: none lands after the answer
        raise
    finally:
        unhook()
        kill.close()
    win.check("during the catch-up")
    # the top's suspension does not stop writes through an LV that LVM reloaded during the
    # catch-up (they go straight to the PV): asked again right before the yes
    problem = stack.lv_problem(entry)
    if problem is not None:
        return False, problem, c.read
    return True, f"{broken}: copied the {c.read} bytes era recorded since the cutover first", c.read


def copy_rate(entry: journal.Entry) -> float | None:
    """The best rate (bytes/s) a pass of the copy reached, from passes large enough to tell."""
    rates = [p.read / p.seconds for p in entry.copy.passes() if p.read >= (4 << 20) and p.seconds > 0]
    return max(rates) if rates else None


class _SocketKill:
    """Shuts down (from the window's timer) the socket a libnbd handle polls on: libnbd holds
    its handle lock while it polls, so no call on the handle could end the wait. A dup of the
    fd, so it is never a number the handle closed and the kernel gave to someone else."""

    def __init__(self, fd: int) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(fileno=os.dup(fd))

    def __call__(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
