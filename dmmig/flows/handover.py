"""The handover: the source's answer to the destination's gate (is every write there?), and
`dmmig handover` to answer it by hand.
"""
from __future__ import annotations

import logging
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
from dmmig.flows import warm
from dmmig.flows.session import Remote, start_export
from dmmig.names import era_name, top_name

log = logging.getLogger("dmmig.handover")


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
                cap: float = gate.SUSPEND_CAP_S, settle: bool = True) -> dict[str, Any]:
    """The destination asked about ENTRY (its lock is held): vouch for the disk. With the top
    device suspended (every write that was acknowledged is through the mirror), check that
    every region is in sync, every leg alive and no dm event came since the sync; otherwise
    first copy what era recorded since the cutover; a yes is sent while still suspended.
    The window is capped at CAP seconds (dmmig/core/window.py): past it the top resumes whatever
    is under way and the answer is no. A no is sent after the resume. Returns the journaled
    record: ok, why, caught_up_bytes, seconds (suspended), delivered (None: a yes whose
    delivery the destination did not confirm in time), generation (warm copies: recorded on
    both hosts; SETTLE False: its fence here is settled later, by settle_generation)."""
    top, era = top_name(entry.name), era_name(entry.name)
    win = Window(cap, lambda: stack.dm.resume(top))
    ok, why, sent = False, "", 0
    delivered: bool | None = False
    kept_gen: str | None = None
    steps: dict[str, int] = {}  # where the window's time went, in ms (the journal's steps_ms)
    t = time.monotonic()

    def lap(what: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps[what] = round((now - t) * 1000)
        t = now
    win.start()
    try:
        stack.dm.suspend(top)
        lap("suspend")
        kw: dict[str, Any] = {}
        generation: str | None = None
        try:
            ok, why, sent = _vouch(stack, entry, remote, top, era, win)
            lap("vouch")
            if ok:  # before the window's last check: a fence taken after a resume would be unsound
                kw, generation = _generation(stack, entry, remote, win)
                lap("fence")
            win.check("before the answer")
            if win.remaining() < MIN_YES_S:
                raise WindowClosed(f"too little of the {cap:.0f}s window was left to deliver a yes")
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the answer is no
            ok, why = False, e.message if isinstance(e, DmmigError) else f"{type(e).__name__}: {e}"
        if not ok and generation is not None:
            warm.drop(stack.journal.dir, entry.name)
        if ok:  # while suspended: nothing can be written between the check and the yes
            try:
                reply = remote.agent.call("answer_gate", name=entry.name, ok=True, why=why,
                                          deadline_s=max(win.remaining(), 0.1), **kw)
                delivered = bool(reply["delivered"])
                lap("answer")
                there = reply.get("steps_ms")
                if isinstance(there, dict):  # the destination's share of the answer
                    steps.update({f"dest_{k}": int(v) for k, v in there.items()
                                  if isinstance(k, str) and isinstance(v, (int, float))})
                kept_gen = _warm_outcome(stack, entry, generation, reply, delivered)
            except DmmigError as e:
                delivered = None
                why += f"; the destination did not confirm the yes: {e.message}"
                kept_gen = _warm_outcome(stack, entry, generation, None, None)
    finally:
        seconds = win.close()  # always: if the guest resumes here, it must find its disk
        lap("resume")
    if kept_gen is not None and settle:
        kept_gen = _settled(stack, entry, kept_gen)
        lap("settle_after")
    if not ok:
        try:
            delivered = bool(remote.agent.call("answer_gate", name=entry.name, ok=False, why=why,
                                               deadline_s=gate.NO_DELIVERY_S)["delivered"])
        except DmmigError as e:  # the destination's `add` refuses on its own when no answer comes
            why += f"; the no could not be delivered either: {e.message}"
    entry.mirror.handover = Handover(at=time.time(), ok=ok, why=why, caught_up_bytes=sent,
                                     seconds=round(seconds, 3), cap_seconds=cap, delivered=delivered,
                                     generation=kept_gen, steps_ms=steps or None)
    stack.journal.save(entry)
    return to_json(entry.mirror.handover)


def _settled(stack: Stack, entry: journal.Entry, generation: str) -> str | None:
    """This host's fence of GENERATION was taken in the window without waiting for its file's
    ctime to settle (up to writefence.CTIME_SETTLE_S): settled now, the guest's disk no longer
    frozen. GENERATION if it holds, else None (dropped here: a copy back is a full one)."""
    t0 = time.monotonic()
    problem = warm.settle_kept(stack, entry.name, generation)
    if problem is not None:
        warm.drop(stack.journal.dir, entry.name)
        log.warning("%s: generation %s dropped: %s; a copy back will be a full one", entry.name, generation[:12],
                    problem)
        return None
    log.info("%s: generation %s settled in %.2fs after the window", entry.name, generation[:12],
             time.monotonic() - t0)
    return generation


def settle_generation(stack: Stack, entry: journal.Entry) -> None:
    """After answer_gate(settle=False) (every disk's gate answered first, so that no disk's
    answer waits for another's ctime): settle the generation its yes recorded, journaled."""
    h = entry.mirror.handover
    if h is not None and h.generation is not None and _settled(stack, entry, h.generation) is None:
        h.generation = None
        stack.journal.save(entry)


# the yes's half of a generation needs this much of the window: the fences on both hosts are
# taken at once (a sync and a stat each; a file's ctime is settled after the window)
WARM_NEEDS_S = MIN_YES_S + 1.0


def _generation(stack: Stack, entry: journal.Entry, remote: Remote, win: Window) -> tuple[dict[str, Any], str | None]:
    """A new generation (warm copies, dmmig/flows/warm.py) for the yes, the top suspended:
    this host's half (role kept) recorded now if both legs are provably identical, and the
    arguments that ask the destination's agent to record its half as it stops its export.
    Anything in doubt records none (and drops an older one): a copy back is a full one."""
    why: str | None
    if remote.agent.hello.get("warm_gate") is not True:
        why = "the destination's dmmig records no generation at the handover (an older version)"
    elif entry.adopted is not None:  # as finish: its kept disk would be dmmig-NAME-lv, which goes
        why = "an adopted LV keeps no generation"
    elif win.remaining() < WARM_NEEDS_S:
        why = f"too little of the {win.cap:.0f}s window was left to record a generation"
    else:
        try:
            # not waited for: a file's ctime is settled after the window (settle_kept)
            rec, why = warm.kept(stack, entry, warm.new_generation(), wait=False)
        except (OSError, DmmigError) as e:
            rec, why = None, f"{type(e).__name__}: {e}"
        if rec is not None:
            return {"warm": {"generation": rec.generation, "peer": os.uname().nodename}}, rec.generation
    warm.drop(stack.journal.dir, entry.name)
    log.info("%s: no generation recorded at the handover (%s): a copy back will be a full one", entry.name, why)
    return {}, None


def _warm_outcome(stack: Stack, entry: journal.Entry, generation: str | None, reply: dict[str, Any] | None,
                  delivered: bool | None) -> str | None:
    """What became of the yes's generation: kept only if the yes reached the destination and
    its agent recorded its half; else this host's half goes too."""
    if generation is None:
        return None
    there = (reply or {}).get("warm") or {}
    if delivered and there.get("ok") is True:
        return generation
    warm.drop(stack.journal.dir, entry.name)
    why = there.get("why") or ("the yes was not delivered" if not delivered else "the destination recorded none")
    log.warning("%s: generation %s dropped: %s; a copy back will be a full one", entry.name, generation[:12], why)
    return None


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
    # fresh: the broken leg's connection may still hold writes on their way there; once the old
    # qemu-nbd has exited none can land over the catch-up's
    export = start_export(remote, entry.destination(), entry.name, deadline_s=max(win.remaining(), 0.1), fresh=True)
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
