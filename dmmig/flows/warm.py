"""Warm copies: the way back sends only what was written since the two disks were identical.

A migration A -> B that finishes (`dmmig finish` on A, the mirror in sync with healthy legs
and no dm event since its sync, checked with the top suspended) records a generation on both
hosts, NAME.warm.json (records.Warm): an id for the pair, the disk, its size, and a write
fence (dmmig/adapters/writefence.py), the kernel's write counters of the disk (and the file
behind a loop device) at that moment.

- On A (role "kept"): the old disk must stay untouched. Any write to it since the fence, by
  whoever, through dmmig or not, makes it untrusted: a copy back is then a full one. So A's
  side of the union of dirty blocks is empty whenever a copy is warm.
- On B (role "took-over"): `dmmig wrap NAME DISK` checks that DISK is the generation's and
  untouched since the fence, and puts era under the new top before it returns (nothing can
  have written through the top yet), recording the era and both devices' write counters
  (the journal's copy.warm, records.WarmTrack). A write to the origin past era shows as a
  difference between the two devices' counters (writefence.bypassed).
- `dmmig copy NAME USER@A --dest-disk PATH` on B then checks its tracking (drained: the top
  suspended for the counters' read) and passes the generation with prepare_disk; A's agent
  checks its record there and consumes it before anything writes the disk. Both intact: no
  base pass, the rounds send what era recorded since the generation's era. Anything else:
  a full copy, and the summary and the log say why ("cold: full copy, because ...").

`dmmig migrate` (Xen) has no finish: the handover gate's yes records the generation instead
(dmmig/flows/handover.py), block-dmmig's `add` on B calls track() before blkback opens the disk,
and A's half over block-dmmig's loop device becomes a fence of the file itself before that loop
device goes (kept_file).

Sound by construction: each check fails towards a full copy; nothing here ever makes a copy
skip a block unless both hosts proved it unwritten.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from dmmig.adapters import writefence
from dmmig.adapters.writefence import Counters
from dmmig.core import journal
from dmmig.core.generation import drop, load, names, new_generation, record, save, settle
from dmmig.core.records import KEPT, TOOK_OVER, CopyState, Warm, WarmTrack, read_warm
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, StateError
from dmmig.names import Files, era_name, top_name
from dmmig.validate import disk_name

log = logging.getLogger("dmmig.warm")

COLD = "cold: full copy, because "
# how long a fence taken in a suspended window (unsettled) may take to settle afterwards
SETTLE_WAIT_S = writefence.CTIME_SETTLE_S + 0.5
__all__ = ["COLD", "decide", "drop", "forget", "identical", "kept", "kept_file", "load", "local_verdict", "names",
           "new_generation", "record", "save", "settle_kept", "status", "track"]


# ---- A: finish ----------------------------------------------------------------------------
def identical(stack: Stack, entry: journal.Entry) -> str | None:
    """Why the two legs of ENTRY's mirror may differ now (None: they are identical). Called
    with the top suspended: every acknowledged write went through the mirror, none is in
    flight. A leg that failed and came back leaves no out-of-sync region (the mirror has no
    handle_errors), so the dm event counter must not have moved since the sync either."""
    top = top_name(entry.name)
    if entry.phase != journal.MIRRORING or entry.mirror.synced is None:
        return f"the mirror never was in sync (phase {entry.phase})"
    st = stack.dm.mirror_status(top)
    info = stack.dm.info(top)
    if info is None:
        return f"{top} is gone"
    if not (st.synced and st.healthy):
        return f"the mirror is not in sync with healthy legs ({st.in_sync}/{st.regions}, health {st.health})"
    if info.events != entry.mirror.synced.events:
        return f"dm events came since the sync ({info.events}, {entry.mirror.synced.events} at sync)"
    return None


def kept(stack: Stack, entry: journal.Entry, generation: str, *, wait: bool = True) -> tuple[Warm | None, str]:
    """At finish or the gate's yes, the top suspended: A's half of a new generation (its
    origin's fence; WAIT False: not waited for, settled after the window, settle), or None
    and why not."""
    why = identical(stack, entry)
    if why is None:
        size = stack.dm.table(top_name(entry.name)).length * 512
        peer = entry.dest.host if entry.dest else ""
        try:
            return record(stack.journal.dir, entry.name, KEPT, entry.origin, size, generation, peer,
                          stack.runner, wait=wait), ""
        except OSError as e:
            why = f"{entry.origin} cannot be fenced: {e.strerror or e}"
    drop(stack.journal.dir, entry.name)  # an older generation no longer holds either
    return None, why


def settle_kept(stack: Stack, name: str, generation: str) -> str | None:
    """After the gate's window (the top resumed): settle the fence of NAME's kept GENERATION,
    taken in the window without waiting for its file's ctime. None if it holds; else why not,
    and the generation is dropped here (a copy back is a full one)."""
    rec = load(stack.journal.dir, name)
    if rec is None or rec.generation != generation:
        return f"the record of generation {generation[:12]} is gone here"
    try:
        settle(stack.journal.dir, rec, stack.runner, max_wait_s=SETTLE_WAIT_S)
    except OSError as e:
        return f"{rec.path} cannot be fenced: {e.strerror or e}"
    return None


def kept_file(stack: Stack, name: str, node: str, file: str) -> str | None:
    """Before the loop device NODE over FILE goes (block-dmmig attached it; the disk was handed
    over): NAME's kept generation fences NODE, which will not exist any more. If nothing wrote
    NODE or FILE since, fence FILE alone from now on: the file's stamp was taken with its ctime
    settled, so any later write to it moves the ctime (a new loop device over it too). Anything
    else drops the generation. Returns what happened (None: no kept generation of NODE)."""
    rec = load(stack.journal.dir, name)
    if rec is None or rec.role != KEPT or os.path.realpath(rec.path) != os.path.realpath(node):
        return None
    try:  # the gate's settle may not have run yet (killed, or still under way)
        rec = settle(stack.journal.dir, rec, stack.runner, max_wait_s=SETTLE_WAIT_S)
    except OSError as e:
        drop(stack.journal.dir, name)
        log.warning("%s: %s; a copy back will be a full one", name, e)
        return f"forgot the generation of {name}: {e}"
    f = rec.fence
    why = writefence.written_since(f, stack.runner)
    if why is None and (f.file is None or f.file_path is None
                        or os.path.realpath(f.file_path) != os.path.realpath(file)):
        why = f"{node} was not a loop device over {file} at the generation"
    if why is not None:
        drop(stack.journal.dir, name)
        log.warning("%s: %s; a copy back will be a full one", name, why)
        return f"forgot the generation of {name}: {why}"
    rec.path = file
    rec.fence = writefence.Fence(file, f.boot_id, None, f.file, file)
    save(stack.journal.dir, rec)
    return f"generation {rec.generation[:12]} now fences {file} itself ({node} goes)"


# ---- B: wrap ------------------------------------------------------------------------------
def track(stack: Stack, name: str) -> str | None:
    """After `wrap NAME ORIGIN` here: if ORIGIN is the disk a migration handed over to this
    host (a generation TOOK_OVER, not tracked yet), untouched since, put era under the top now
    and remember from which era it tracks. Returns what happened, for the operator (None:
    no generation here)."""
    state = stack.journal.dir
    rec = load(state, name)
    if rec is None or rec.role != TOOK_OVER or rec.tracking or rec.broken:
        return None
    entry = stack.entry_of(name)
    origin_then: Counters | None = None
    why: str | None = None
    try:
        # the gate's yes took the fence in the source's suspended window without waiting for
        # the file's ctime: settled here, before era and before anything opens the disk
        rec = settle(state, rec, stack.runner, max_wait_s=SETTLE_WAIT_S)
    except OSError as e:
        why = f"its fence could not be settled: {e.strerror or e}"
    if why is None:
        try:
            # first: the counters only grow, so if the fence still holds after this read, it
            # held at it, and any write from now on that does not pass through era shows at the copy
            origin_then = writefence.counters(entry.origin_devno, stack.runner)
            why = _can_track(stack, entry, rec)
        except OSError as e:
            why = f"the write counters of {entry.origin} cannot be read: {e.strerror or e}"
    if why is not None or origin_then is None:
        rec.broken = f"{entry.origin} was not tracked from the handover on: {why}"
        save(state, rec)
        log.warning("%s: %s", name, rec.broken)
        return f"cold: {rec.broken}; a copy back will be a full one"
    # not confined: a discard makes the copy back cold all the same (bypassed), and the guest
    # would pay the split discards for as long as it runs here
    stack.prepare(name, confine=False)
    era_dev = writefence.devno_of(f"/dev/mapper/{era_name(name)}")
    assert era_dev is not None
    # a dm device counts from zero when made; its diskseq names this very one
    made = writefence.counters(era_dev)
    era_then = Counters(era_dev, made.diskseq, 0, 0)
    now = stack.dm.era_status(era_name(name)).current_era
    with stack.journal.lock(name):
        entry = stack.entry_of(name)
        entry.copy.warm = WarmTrack(generation=rec.generation, era=now, origin=origin_then, era_dev=era_then)
        stack.journal.save(entry)
    rec.tracking = True
    save(state, rec)
    return f"warm: era tracks every write to {name} since generation {rec.generation[:12]} (era {now})"


def _can_track(stack: Stack, entry: journal.Entry, rec: Warm) -> str | None:
    if entry.phase != journal.WRAPPED:
        return f"{entry.name} is in phase {entry.phase}"
    info = stack.dm.info(top_name(entry.name))
    if info is None or info.open_count:
        return f"{top_name(entry.name)} was already open when the tracking could start"
    if os.path.realpath(entry.origin) != os.path.realpath(rec.path) and not _loop_over(entry.origin_devno, rec.path):
        return f"{entry.origin} is not the disk the generation names ({rec.path})"
    return writefence.written_since(rec.fence, stack.runner)


def _loop_over(devno: str, path: str) -> bool:
    """DEVNO is a loop device over the file PATH (block-dmmig's add attached it), whole."""
    if not os.path.isfile(path):
        return False
    file = writefence.backing_file(devno)
    try:
        m = writefence.mapping_of_loop(devno)
    except OSError:
        return False
    return file is not None and os.path.realpath(file) == os.path.realpath(path) and m == (0, 0)


# ---- B: copy ------------------------------------------------------------------------------
def local_verdict(stack: Stack, entry: journal.Entry, *, drained: bool = True) -> tuple[WarmTrack | None, str]:
    """Whether this host's half of a warm copy holds: (the tracking, "") or (None, why not).
    DRAINED: read the counters with the top suspended (a copy); else as they are (a dry run,
    which changes nothing: a write in flight may then show as a difference)."""
    w = entry.copy.warm
    if w is None:
        rec = load(stack.journal.dir, entry.name)
        if rec is None:
            return None, "no generation is recorded for this disk here (no migration finished onto it)"
        if rec.role != TOOK_OVER:
            return None, "this host kept the old disk of the last migration; it did not take it over"
        return None, rec.broken or (f"its writes are not tracked since generation {rec.generation[:12]} "
                                    "(era goes under the top at `dmmig wrap`, before the first write)")
    rec = load(stack.journal.dir, entry.name)
    if rec is None or rec.generation != w.generation:
        return None, f"the record of generation {w.generation[:12]} is gone here (`dmmig forget`?)"
    if w.decision is not None and not w.warm:
        return None, w.decision.removeprefix(COLD)
    if drained:
        top = top_name(entry.name)
        stack.dm.suspend(top)
        try:
            why = writefence.bypassed(w.origin, w.era_dev, stack.runner)
        finally:
            stack.dm.resume(top)
    else:
        why = writefence.bypassed(w.origin, w.era_dev, stack.runner)
    return (w, "") if why is None else (None, why)


def decide(stack: Stack, entry: journal.Entry, track: WarmTrack | None, local_why: str,
           reply: dict[str, Any] | None, size: int) -> bool:
    """Journal this copy's choice from both halves: this host's (TRACK, or LOCAL_WHY not) and
    the destination's (REPLY's "warm", from prepare_disk). Once made, it stands for the
    migration (a resumed copy does not ask again: the destination forgot the generation).
    Warm: no base pass (SIZE bytes counted as sent), the rounds send every block era recorded
    since the generation's era (zeros as zeros); journaled with the decision in one save, so
    a dmmig killed after it resumes with both or neither."""
    w = entry.copy.warm
    if w is not None and w.decision is not None:
        if w.warm:
            _skip_base(entry, w.era, size)  # a journal an earlier version saved between the two
            stack.journal.save(entry)
        return w.warm
    there = (reply or {}).get("warm") or {}
    if w is not None and track is not None and there.get("ok") is True:
        w.decision = f"warm: only the blocks written here since generation {w.generation[:12]} (era {w.era})"
        _skip_base(entry, w.era, size)
        log.info("%s: %s", entry.name, w.decision)
    else:
        why = local_why or f"on the destination, {there.get('why') or 'the generation was not checked'}"
        if w is not None:
            w.decision = COLD + why
            log.warning("%s: %s%s", entry.name, COLD, why)
        else:
            log.info("%s: %s%s", entry.name, COLD, why)
    stack.journal.save(entry)
    return bool(w and w.warm)


def _skip_base(entry: journal.Entry, era: int, size: int) -> None:
    st = entry.copy
    st.base_era = st.next_since = era
    # the local verdict found no discard through era since the generation's era: the rounds
    # count from the mark then (a discard since makes their first round a full one)
    if entry.copy.warm is not None:
        st.discards = writefence.discard_mark(entry.copy.warm.era_dev)
    st.base_offset, st.base_done = size, True


# ---- forget / status ----------------------------------------------------------------------
def forget(stack: Stack, name: str) -> list[str]:
    """Drop NAME's generation here and the era tracking it started (era removed, the top back
    to linear over the origin). Refused while a copy of NAME is under way: `abort` first."""
    disk_name(name)
    state = stack.journal.dir
    entry = stack.journal.load(name)
    done: list[str] = []
    tracked = entry is not None and entry.copy.warm is not None
    if tracked and entry is not None and entry.phase != journal.PREPARED:
        raise StateError(f"a migration of {name} is in progress (phase {entry.phase}) on its warm tracking",
                         hint=f"`dmmig abort {name}` first")
    if tracked and entry is not None and entry.copy.base_era is not None:
        raise StateError(f"a copy of {name} began on its warm tracking", hint=f"`dmmig abort {name}` first")
    if tracked:
        done += stack.abort(name)
        with stack.journal.lock(name):
            e2 = stack.journal.load(name)
            if e2 is not None:
                e2.copy = CopyState()
                stack.journal.save(e2)
        done.append(f"stopped tracking {name}'s writes (era removed; dmmig-{name} is linear over its origin)")
    if drop(state, name):
        done.append(f"forgot the generation of {name}")
    if not done:
        raise BadInput(f"{name} has no warm state here")
    return done


def status(stack: Stack, name: str, entry: journal.Entry | None) -> dict[str, Any] | None:
    """NAME's warm state here for `status`: the generation, its role, the tracking and the era
    metadata it costs (the file's allocated bytes), and what abort/finish do to it."""
    state = stack.journal.dir
    try:
        rec = read_warm(Files(state, name).warm)
    except ValueError as e:
        return {"error": str(e), "effect": "no copy of it is warm; `dmmig forget` removes it"}
    w = entry.copy.warm if entry else None
    if rec is None and w is None:
        return None
    out: dict[str, Any] = {}
    if rec is not None:
        out.update(generation=rec.generation, role=rec.role, path=rec.path, size=rec.size, at=rec.at,
                   peer=rec.peer, tracking=rec.tracking, broken=rec.broken)
        if rec.role == KEPT:
            out["untouched"] = writefence.written_since(rec.fence, stack.runner) is None
            out["effect"] = ("a copy back onto this disk from the host that took it over sends only what that "
                             "host wrote, while nothing writes this disk; any write here makes it a full copy")
    if w is not None:
        meta = entry.metadata_file if entry else None
        try:
            cost = os.stat(meta).st_blocks * 512 if meta else None
        except OSError:
            cost = None
        out["tracking"] = {"since_era": w.era, "decision": w.decision, "era_metadata_bytes": cost}
        out["effect"] = ("`dmmig copy` back sends only the blocks written since; `dmmig abort` or `dmmig forget` "
                         "drop the tracking (the next copy is a full one); `dmmig finish` records a new generation")
    return out
