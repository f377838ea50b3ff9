"""The end of a disk's migration: finish (the new owner has it) or abort (back to linear over
the origin), on this host and on the destination.
"""
from __future__ import annotations

import os
import time

from dmmig.core import gate, journal
from dmmig.core.records import KEPT, CopyState, Incoming, Unreadable
from dmmig.core.stack import Stack
from dmmig.errors import StateError
from dmmig.flows import warm
from dmmig.flows.destination import AgentServer, incoming
from dmmig.flows.session import stop_remote
from dmmig.names import Files, disk_name_for, era_name, top_name


# ---- finish -------------------------------------------------------------------------------
def finish(stack: Stack, name: str, *, force: bool = False, remove: bool = False,
           remote: bool = True) -> tuple[list[str], list[str]]:
    """The new owner has the disk: tear down both sides (this side only without REMOTE),
    keep the data on both. Returns (done, left behind on the destination)."""
    entry = stack.entry_of(name)
    top = top_name(name)
    if not force:
        if entry.phase != journal.MIRRORING:
            raise StateError(f"{name} is not mirroring (phase {entry.phase}): the destination may miss writes",
                             hint=f"`dmmig cutover {name}` first, `dmmig abort {name}` to give up, "
                                  "or --force to finish anyway")
        stack.check_lv(entry)  # an adopted LV that LVM reloaded: the destination misses writes
        st = stack.dm.mirror_status(top)
        vouched = entry.mirror.handover and entry.mirror.handover.ok  # the gate already checked or caught up
        if not (st.synced and st.healthy) and not vouched:
            raise StateError(f"the mirror of {name} is not in sync with healthy legs "
                             f"({st.in_sync}/{st.regions}, health {st.health}): the destination misses writes",
                             hint=f"catch up with `dmmig copy {name}` + `dmmig cutover {name}`, or --force")
    if remove and entry.adopted is None:  # an adopted disk's top is held by its LV, which finish restores
        info = stack.dm.info(top)
        if info is not None and info.open_count > 0:
            raise StateError(f"{top} is still open ({info.open_count} opener(s)); it cannot be removed",
                             hint="stop the domain on this host first, or finish without --remove")
    dest = entry.dest
    generation: str | None = None
    notes: list[str] = []
    with stack.journal.lock(name):
        entry = stack.entry_of(name)  # as it is now: another finish (block-dmmig's remove) may have run
        # this host's warm state is decided once, before the teardown changes the journal: a
        # finish run again after one that failed or was killed partway (block-dmmig's remove at
        # its deadline, then `dmmig migrate`) finds no handover there any more, and keeps what
        # the first decided (the gate's generation: dropping it made the way back cold)
        if not _finished_partway(entry):
            gate_gen = gate_generation(stack, entry)  # the handover's yes recorded both halves already
            # an adopted LV: no generation (its kept disk would be dmmig-NAME-lv, which finish removes;
            # a fence on the LV's own device is not built yet): a copy back is a full one
            if remote and not force and dest is not None and entry.adopted is None and gate_gen is None:
                generation = _generation(stack, entry, notes)
            if generation is None and gate_gen is None:
                warm.drop(stack.journal.dir, name)  # whatever an earlier migration left holds no more
        try:
            done = stack.abort_held(name, phase=journal.FINISHING)  # its swap resumes the top
        except BaseException:
            if generation is not None:
                warm.drop(stack.journal.dir, name)
                info = stack.dm.info(top)
                if info is not None and info.suspended:
                    stack.dm.resume(top)
            raise
        if remove and stack.dm.info(top) is not None:
            stack.dm.remove(top)
            done.append(f"remove {top}")
        if remove:
            stack.journal.delete(name)
    done += notes
    left = stop_remote(name, dest, remove_created=False, done=done,
                       warm={"generation": generation, "peer": os.uname().nodename} if generation else None
                       ) if remote else []
    return done, left


def gate_generation(stack: Stack, entry: journal.Entry) -> str | None:
    """The generation the handover gate's yes recorded for ENTRY (both halves: this host's as
    the yes went out, the destination's as its export stopped), if this host's record is it."""
    h = entry.mirror.handover
    gen = h.generation if entry.handed_over and h is not None else None
    rec = warm.load(stack.journal.dir, entry.name) if gen else None
    return gen if rec is not None and rec.generation == gen and rec.role == KEPT else None


def _finished_partway(entry: journal.Entry) -> bool:
    """An earlier finish of ENTRY's migration got past its warm decision and stopped: in its
    teardown (phase finishing: a step failed, or it was killed there), or after it, before the
    top was removed (wrapped right after finishing, the mirror's record and its handover reset)."""
    last = [h[-1] for h in entry.history[-2:] if isinstance(h, list) and h]
    return entry.phase == journal.FINISHING or (entry.phase == journal.WRAPPED
                                                and last == [journal.FINISHING, journal.WRAPPED])


def _generation(stack: Stack, entry: journal.Entry, notes: list[str]) -> str | None:
    """A new generation (warm copies, dmmig/flows/warm.py) if both disks are identical now:
    checked with the top suspended, and left suspended for finish's swap back to linear when
    one is recorded (a write after the check goes to this disk alone, and its fence sees it)."""
    top = top_name(entry.name)
    stack.dm.arm_guard()
    stack.dm.suspend(top)
    try:
        rec, why = warm.kept(stack, entry, warm.new_generation())
    except BaseException:
        stack.dm.resume(top)
        raise
    if rec is None:
        stack.dm.resume(top)
        notes.append(f"no generation recorded ({why}): a copy back will be a full one")
        return None
    notes.append(f"recorded generation {rec.generation[:12]}: a copy back onto {entry.origin} sends only what "
                 f"the destination writes, as long as nothing writes {entry.origin} here")
    return rec.generation


def finish_handed_over(stack: Stack, name: str | None, *, node: str | None, params: str,
                       close_wait_s: float) -> list[str]:
    """The end of a migration on the source, once the destination runs the guest on NAME's
    disk (the gate said yes): this host's stack is history. Waits up to CLOSE_WAIT_S for
    blkback to let go of the top device (it does so from deferred work), tears the stack down
    keeping the data, and detaches NODE, the loop device block-dmmig's add attached over the
    file PARAMS (only if it still is one). Both the block script's remove (libxl runs it as it
    destroys the guest here, within its budget) and `dmmig migrate` (for whatever remove left)
    end a migration with this. NAME None: nothing journaled is left, only the loop device."""
    done: list[str] = []
    entry = stack.journal.load(name) if name is not None else None
    if name is not None and entry is not None:
        top = top_name(name)
        deadline = time.monotonic() + close_wait_s
        while True:
            info = stack.dm.info(top)
            # an adopted LV: blkback holds the LV's own device, which holds the top until finish
            # gives the LV its table back (a live swap, whoever holds the LV): nothing to wait for
            if info is None or info.open_count == 0 or entry.adopted is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if info is not None and info.open_count > 0 and entry.adopted is None:
            raise StateError(f"{name} was handed over, but {top} is still open ({info.open_count} opener(s)) "
                             f"after {close_wait_s:.0f}s", hint=f"`dmmig finish --remove {name}` once it is closed")
        # force: the mirror's leg is gone (the destination stopped its export at the yes), and
        # the yes is the proof that the destination has every write
        done, _ = finish(stack, name, force=True, remove=True, remote=False)
    file = os.path.realpath(params)
    if node and os.path.isfile(file) and node in stack.loop.find(file):
        note = warm.kept_file(stack, name or disk_name_for(params), node, file)
        if note:
            done.append(note)
        stack.loop.detach(node)
        done.append(f"detach {node} ({file})")
    elif node:
        done.append(f"left {node} alone: no longer a loop device over {file}")
    return done


# ---- abort --------------------------------------------------------------------------------
def abort(stack: Stack, name: str) -> tuple[list[str], list[str]]:
    """Abort locally (always possible), then stop the destination's export and remove a
    disk dmmig created there. Returns (done, left behind on the destination)."""
    entry = stack.journal.load(name)
    if entry is None and stack.dm.info(top_name(name)) is None and stack.dm.info(era_name(name)) is None:
        rec = incoming(stack.journal.dir).get(name)
        if rec is not None:
            return _abort_incoming(stack, name, rec), []
        if gate.stale_socket(stack.journal.dir, name):  # all a killed agent left of NAME here
            return gate.remove_stale(stack.journal.dir, name), []
    dest = entry.dest if entry else None
    done = stack.abort(name)
    if warm.drop(stack.journal.dir, name):  # whatever it was, the disks of that generation now differ
        done.append(f"forgot the generation of {name} (a copy back will be a full one)")
    left = stop_remote(name, dest, remove_created=True, done=done)
    e2 = stack.journal.load(name)
    if e2 is not None and (e2.dest or e2.copy != CopyState()):
        e2.dest = None
        e2.copy = CopyState()
        stack.journal.save(e2)
    return done, left


def _abort_incoming(stack: Stack, name: str, rec: Incoming | Unreadable) -> list[str]:
    """On the destination, whose source is gone: what the source's abort would have told this
    host's agent to do. A disk that was handed over is the guest's now: it stays."""
    keep = isinstance(rec, Incoming) and bool(rec.handed_over)
    with stack.journal.lock(name):
        if isinstance(rec, Unreadable):
            os.unlink(Files(stack.journal.dir, name).incoming)
            return [f"removed the unreadable record of incoming {name}"]
        done: list[str] = AgentServer(stack.runner, stack.journal.dir).op_stop(name, remove_created=not keep)["done"]
    return done + [f"forgot incoming {name}" + (f" ({rec.path} was handed over and stays)" if keep else "")]
