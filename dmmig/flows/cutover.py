"""`dmmig cutover`: from era rounds to a mirror whose second leg is the destination, in two
single-ioctl swaps, then the kernel's resync of what was left.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from dmmig.adapters import nbd, writefence
from dmmig.adapters.blockdev import block_device
from dmmig.adapters.dm.targets import MIRRORS, DiskLog, Linear, Mirror, MirrorSet, Table
from dmmig.adapters.era import BlockRange, merge
from dmmig.core import journal, mirrorlog
from dmmig.core.records import Destination, MirrorState, Synced, Tunnel
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, CommandError, RemoteError, StateError, Steps
from dmmig.flows.started import Started
from dmmig.names import Files, era_name, top_name
from dmmig.progress import Progress, Stopwatch
from dmmig.validate import nbd_timeout, require_tools

log = logging.getLogger("dmmig.migrate")


# ---- cutover -------------------------------------------------------------------------------
@dataclass
class CutoverOptions:
    nbd_timeout: int = 10       # seconds before a request to a dead peer fails the leg
    sync_timeout: float = 3600
    resync_parts: int | None = None  # mirror targets side by side (regions recovered at once); None: by transport


def check_no_discard_while_mirroring(name: str, leg: str | None, then: str | None, now: str | None) -> None:
    """Fail the cutover if era's discard mark moved from THEN (right after the swap) to NOW (at
    the sync), or cannot be told (see cutover)."""
    during = writefence.discards_since(then, now)
    if during:
        raise StateError(f"{name}: a discard reached the era device while the mirror resynced ({during}); "
                         "the destination may hold data the guest discarded",
                         hint=f"check {leg}'s queue/discard_max_bytes (dmmig set it to 0); `dmmig copy {name}` "
                              f"then `dmmig cutover {name}`, or `dmmig abort {name}`")


def no_discards(stack: Stack, leg_dev: str) -> None:
    """Set the NBD leg LEG_DEV's discard_max_bytes to 0 before a mirror is loaded over it, and
    check it held (the mirror then takes no discard: see cutover)."""
    lim = stack.queue.set_discard_max(leg_dev, 0)
    if lim.max_bytes:
        raise StateError(f"cannot turn discards off on the mirror's NBD leg {leg_dev}: discard_max_bytes is still "
                         f"{lim.max_bytes}", hint="check the nbd device's queue limits; the cutover changed nothing")


def cutover(stack: Stack, name: str, opts: CutoverOptions, progress: Progress) -> dict[str, Any]:
    """Swap the top table to mirror(era device, nbd leg) and let the kernel resync exactly
    the regions era recorded since the last copy round. Race-free in three steps:
    1. era is queried (D1: eras >= the last round's) and the logs mark D1 out of sync, outside
       any window; meanwhile the NBD leg on the export the copy left running comes up in a
       thread (--transport ssh: through its tunnel; the agent is asked only if that export does
       not answer, in a thread too; the leg's thread journals the tunnel's pid and the device,
       under the journal's lock; the export's thread nothing: this thread journals it).
       On a failure this thread waits for them before it tears down, so nothing of theirs comes
       up after the teardown.
    2. one resume swaps to the mirror: its suspend drains every write so far to leg 0; from
       then on every write lands on both legs or, in a region out of sync, on leg 0 and is
       resynced; a write to a region being recovered waits for that region's copy.
    3. what was written between the query and the swap is in eras >= `first` and done (the
       swap drained it): a second query (D2) and, if D2 has a region that D1 did not (those
       the kernel recovers after the swap, so their copy reads D2's writes), a second swap to
       fresh logs holding the running logs' state plus D2 (_add_regions). 3 runs while the
       kernel already resyncs D1; the mirror counts as in sync only after it."""
    entry = stack.prepared(name)
    if entry.phase not in (journal.COPIED, journal.CUTTING_OVER, journal.MIRRORING) or not entry.copy.base_done:
        raise StateError(f"{name} has not been copied (phase {entry.phase})",
                         hint=f"`dmmig copy {name} HOST` first")
    nbd_timeout(opts.nbd_timeout)
    ssh = entry.destination().transport == "ssh"
    parts = opts.resync_parts or mirrorlog.MAX_PARTS
    if not 1 <= parts <= 64:
        raise BadInput(f"--resync-parts {parts}: 1..64")
    require_tools("nbd-client", *(["ssh"] if ssh else []))
    stack.dm.require_targets("mirror")
    top, era = top_name(name), era_name(name)
    with stack.journal.lock(name):
        def save() -> None:
            stack.journal.save(entry)

        sw, par = Stopwatch(), Stopwatch()
        # a rerun after a leg that failed or was cut short: writes of that leg may still be on
        # their way over its connection, and would land over this cutover's. The destination
        # restarts its export first (fresh): this leg never goes on the copy's. A leg is
        # journaled before it connects (MirrorSide.attach_nbd), and a copy drops it
        fence = entry.mirror.nbd is not None
        with sw("drop a previous mirror"):
            length = drop_mirror(stack, entry)  # a rerun starts again from linear over era
        stack.journal.save(entry, journal.CUTTING_OVER)
        assert entry.metadata and entry.block_sectors and length is not None
        bs = entry.block_sectors
        since = int(entry.copy.next_since or 0)
        # SET-UP: what waits on the destination (OpenSSH's tunnel login; the connection, its
        # agent's start, the export) runs in threads while this host makes the logs and queries
        # era. The copy left its export running, so the leg's thread first tries that one
        # (--transport ssh: through the tunnel, which checks the host key and logs in itself;
        # --transport nbd: over TCP once a connect with a deadline got through, since nbd-client's
        # own connect to a host that black-holes would hang for minutes); the agent is asked only
        # if it does not answer.
        dest = entry.destination().copy()
        exporting: Started[nbd.Export] | None = None
        copied = None if fence else dest.export  # the copy's export: the same unless it moved
        # the tunnel's pid (ssh) and the leg on the copy's export
        on_copied: Started[tuple[int | None, str | None]] | None = None
        held = False  # an era query's metadata snapshot, still to drop
        dropping: Started[None] | None = None  # the first query's, dropped in a thread
        gate: int | None = None  # the leg watcher looks once this pipe closes (after the swap)
        try:
            # started now: its Python start overlaps the set-up's waits, not the resync
            gate = stack.mirror.start_watcher(entry, save)
            if ssh and dest.tunnel in ("relay", "forward" if copied and copied.socket else None):
                tun = stack.mirror.plan_tunnel(entry)
                save()  # the tunnel's log names it: a killed dmmig's is found by it
                # with the copy's export: the leg too, in the same thread (it journals the tunnel's
                # pid and the device under the journal's lock), beside the log preparation
                on_copied = Started(partial(_tunnel_and_leg, stack, entry, dest.copy(), tun, copied, opts.nbd_timeout,
                                            save, par))
            elif not ssh and copied and copied.addr and copied.port and not copied.socket:
                # --transport nbd: the copy left its export listening (TLS with this migration's
                # credentials, or --insecure as asked): the leg on it, no SSH login or agent start
                # (2-4 s of the set-up's critical path in the rig); the agent only if it does not answer
                nbd_leg = partial(_leg_on_copied, stack, entry, copied, opts.nbd_timeout, save, par)
                on_copied = Started(lambda: (None, nbd_leg()))
            if on_copied is None or not copied:
                exporting = Started(partial(_connect_export, stack, name, dest, par, fence))
            # 1. what era recorded since the last round, into the logs. A write in flight now is
            # tagged below `first` and done once the swap's suspend is
            with sw("era query"):
                # its snapshot is dropped while this thread waits for the leg (below)
                first_ranges, first = stack.era.dirty_ranges(era, entry.metadata, since,
                                                             Files(stack.journal.dir, name).dirty, hold=True)
                held = True
            with sw("logs"):
                try:  # streamed: a scattered delta of millions of blocks is never a list here
                    # the parts cut where this delta lies: each recovers one region at a time
                    layout = mirrorlog.Layout.choose(length, bs, max_parts=parts,
                                                     delta=((r.begin, r.end) for r in first_ranges),
                                                     delta_blocks=first_ranges.blocks)
                    marked = layout.blank()  # for the summary: what both steps mark
                    logs = stack.mirror.make_logs(entry, layout, 0, save)
                    images = layout.blank()
                    layout.mark(images, ((r.begin, r.end) for r in first_ranges), bs)
                    layout.mark(marked, ((r.begin, r.end) for r in first_ranges), bs)
                    shown = list(itertools.islice(first_ranges, SHOWN_RANGES + 1))
                finally:
                    first_ranges.close()
                for dev, img in zip(logs, images):
                    mirrorlog.write(dev, img.bytes())
            # a dmsetup process neither on the set-up's critical path nor on the resync's tail
            dropping, held = Started(partial(stack.drop_era_snapshot, name)), False
            leg: str | None = None
            tried = False  # the copy's export, through the tunnel: a relay tunnel serves one connection only
            if exporting is None:
                assert on_copied is not None
                with sw("wait for the leg"):
                    leg = on_copied.result()[1]
                    tried = True
                if leg is None:
                    exporting = Started(partial(_connect_export, stack, name, dest, par, fence))
            if leg is None:
                assert exporting is not None
                with sw("wait for the destination"):
                    export = exporting.result()
                    # plan_transport's decisions (a destination an older dmmig journaled), the export
                    dest.export = export
                    entry.dest = dest
                    save()
                with sw("nbd leg"):
                    if ssh:
                        pid = on_copied.result()[0] if on_copied is not None else None
                        if pid is not None and (tried or export.socket != (copied.socket if copied else None)):
                            stack.mirror.stop_tunnel(name, pid)  # used up, or forwards to where the export was
                            pid = None
                        if pid is None:
                            tun = stack.mirror.plan_tunnel(entry)
                            save()
                            pid = stack.mirror.start_tunnel(name, dest.copy(), tun, export.socket)
                        assert entry.mirror.tunnel is not None
                        entry.mirror.tunnel.pid = pid
                        save()
                    leg = stack.mirror.attach_nbd(entry, export, opts.nbd_timeout, save)
            era_dev = block_device(f"/dev/mapper/{era}").devno
            leg_dev = block_device(leg).devno
            # no discard while mirroring: dm-raid1's do_writes sends a discard to both legs without
            # waiting for a region under recovery, so kcopyd could copy old data over it on the
            # NBD leg. A mirror whose leg takes no discard takes none (dm_table_supports_discards),
            # nor does the top over it: a guest's discard fails with EOPNOTSUPP (blkfront then
            # stops sending them until it reconnects, on the destination)
            no_discards(stack, leg_dev)
            with sw("swap"):
                # one resume: the kernel suspends (drains: every write so far is done on leg 0),
                # swaps and resumes in that ioctl, and reads the logs at the resume
                # (udev's handling of the change event is not waited for: the set-up's critical path)
                pause = stack.dm.swap(top, mirror_table(layout, [block_device(d).devno for d in logs], era_dev,
                                                        leg_dev), udev_sync=False)
            os.close(gate)  # the mirror is in: the watcher looks from now on
            gate = None
            # read after the swap drained the top: it counts every discard era took. Era marked
            # each block of them while its limit held (Stack.confine_discards): the queries below
            # have them. Else (the limit was lost) a discard since the last round makes the
            # kernel resync the whole disk
            mark = stack.discards(name, era_dev)
            full = writefence.discard_fallback(stack.discards_exact(name, era_dev),
                                              writefence.discards_since(entry.copy.discards, mark))
            t1 = time.monotonic()  # the kernel resyncs from here on, while the steps below run
            dropping.wait()  # long done: the next query takes a snapshot of its own
            # 2. the mirror is live: every write from the swap on lands on both legs, or, in a
            # region out of sync, on leg 0 and is resynced. Left: what was written between the
            # query and the swap; era has it in eras >= first, done (the swap drained it). A
            # region the first swap's logs already had out of sync needs nothing more: the
            # kernel recovers it after that swap, so its copy reads those writes too
            with sw("era query (resyncing)"):
                # niced: the kernel resyncs and the guest writes meanwhile, both ahead of it
                # its snapshot is dropped once in sync: a dmsetup process off the resync's tail
                second_ranges, now = stack.era.dirty_ranges(era, entry.metadata, first,
                                                            Files(stack.journal.dir, name).dirty, background=True,
                                                            hold=True)
                held = True
            pauses = [round(pause, 4)]
            try:
                if second_ranges.blocks:
                    if not layout.marked(marked, ((r.begin, r.end) for r in second_ranges), bs):
                        with sw("second swap (resyncing)"):
                            pauses.append(round(_add_regions(stack, entry, layout, logs, second_ranges, era_dev,
                                                             leg_dev, save), 4))
                    layout.mark(marked, ((r.begin, r.end) for r in second_ranges), bs)
                    shown = merge(shown + list(itertools.islice(second_ranges, SHOWN_RANGES + 1)))
            finally:
                second_ranges.close()
            if full:
                log.warning("%s: the kernel resyncs the whole disk: %s", name, full)
                everything = [BlockRange(0, -(-length // bs))]
                if not layout.marked(marked, ((r.begin, r.end) for r in everything), bs):
                    with sw("second swap (resyncing)"):
                        pauses.append(round(_add_regions(stack, entry, layout, logs, everything, era_dev, leg_dev,
                                                         save), 4))
                layout.mark(marked, ((r.begin, r.end) for r in everything), bs)
        except BaseException:
            if gate is not None:
                os.close(gate)  # a watcher that finds no mirror exits (the teardown stops it too)
            if dropping is not None:
                dropping.wait()
            if held:
                stack.drop_era_snapshot(name)
            if exporting is not None:
                exporting.wait()  # nothing of theirs may come up after the teardown
            if on_copied is not None:
                on_copied.wait()
            drop_mirror(stack, entry)
            stack.journal.save(entry, journal.COPIED)
            raise
        resync_regions = sum(i.out_of_sync() for i in marked)
        m = entry.mirror
        m.era, m.pause_seconds, m.pauses, m.resync_regions = now, max(pauses), pauses, resync_regions
        m.resync_bytes = min(resync_regions * layout.region, length) * 512
        m.regions, m.region_bytes, m.parts = layout.regions, layout.region * 512, layout.parts
        m.resync_ranges = [[r.begin, r.end] for r in shown[:SHOWN_RANGES]]
        m.resync_ranges_cut = len(shown) > SHOWN_RANGES
        save()
        try:
            with sw("resync"):
                events, kernel_out = _wait_sync(stack, top, layout.regions, opts.sync_timeout, progress, name)
            # from the first swap: the kernel's resync of the first delta began there
            stack.check_lv(entry)  # in sync means nothing for an adopted LV that LVM reloaded meanwhile
            # should not happen: the mirror takes no discard (no_discards). If one reached era all
            # the same, dm-raid1 may have let kcopyd copy old data over it on the NBD leg: fail, and
            # the journal keeps the last round's mark (the next copy's first round counts it)
            check_no_discard_while_mirroring(name, leg, mark, stack.discards(name, era_dev))
            m.synced = Synced(at=time.time(), events=events, seconds=round(time.monotonic() - t1, 3),
                              kernel_out_of_sync_first_seen=kernel_out)
        finally:
            stack.drop_era_snapshot(name)  # the second query's, held through the resync
        # in sync: every write tagged below `now` is on both legs (see 2. above), and a
        # catch-up resends what era recorded from here. Not before the sync: a resync cut short
        # (dmmig killed, the leg failed) leaves regions of the last delta behind, so a rerun or
        # a catch-up must query from where this one did.
        entry.copy.next_since, entry.copy.discards = now, mark
        stack.journal.save(entry, journal.MIRRORING)
    return {"name": name, "suspended_seconds": m.pause_seconds, "pauses": m.pauses,
            "resync_regions": resync_regions, "regions": layout.regions, "seconds": sw.rounded(),
            "full_resync": full,
            "overlapped": par.rounded(),
            "region_bytes": layout.region * 512, "parts": layout.parts,
            # the part with the most: it recovers them one at a time, so the resync lasts as long
            "resync_regions_most_in_a_part": max(i.out_of_sync() for i in marked),
            "resync_bytes": m.resync_bytes, "resync_seconds": m.synced.seconds,
            "nbd": leg, "events_at_sync": events, "kernel_out_of_sync_first_seen": kernel_out}


SHOWN_RANGES = 256  # of the resync's block ranges, kept in the journal for status


def _connect_export(stack: Stack, name: str, dest: Destination, par: Stopwatch, fresh: bool) -> nbd.Export:
    """The cutover's calls to the destination (in a thread): connect, start its agent, plan the
    transport into DEST (a copy: the caller journals it), start or find the export (FRESH: a
    new one, see session.start_export)."""
    # imported here: session imports paramiko (0.8 s of a rig kernel's start), which a
    # cutover over the copy's export (--transport ssh) never uses
    from dmmig.flows.session import Remote, plan_transport, start_export
    with par("connect"):
        remote = Remote(dest)
    try:
        with par("export"):
            plan_transport(stack, name, dest, remote)  # decided by copy; probed again only for a
            return start_export(remote, dest, name, fresh=fresh)  # destination journaled by an older dmmig
    finally:
        remote.close()


def _tunnel_and_leg(stack: Stack, entry: journal.Entry, target: Destination, tun: Tunnel, copied: nbd.Export | None,
                    timeout: int, save: Callable[[], None], par: Stopwatch) -> tuple[int, str | None]:
    """--transport ssh (in a thread): the tunnel TUN up, its pid journaled; then, with the copy's
    export COPIED, the kernel's NBD client on it through the tunnel. Returns the tunnel's pid and
    the device, None without COPIED or when it did not answer (the caller asks the agent)."""
    with par("tunnel"):
        pid = stack.mirror.start_tunnel(entry.name, target, tun, copied.socket if copied else None)
    tun.pid = pid
    save()
    if copied is None:
        return pid, None
    return pid, _leg_on_copied(stack, entry, copied, timeout, save, par)


def _leg_on_copied(stack: Stack, entry: journal.Entry, export: nbd.Export, timeout: int, save: Callable[[], None],
                   par: Stopwatch) -> str | None:
    """The kernel's NBD client on EXPORT, the one the copy left running (through the tunnel the
    caller started, or over TCP). Returns the device, None when it did not answer (the caller
    asks the agent); nothing of it stays attached then (NbdKernel.attach_free). Over TCP a
    connect with the NBD timeout as its deadline goes first: nbd-client's own has none, and a
    host that black-holes would hold it for minutes."""
    with par("nbd leg"):
        if export.socket is None and export.addr and export.port \
                and not nbd.answers(export.addr, export.port, timeout):
            log.info("the copy's export of %s (%s) does not answer: asking the destination", entry.name, export.where)
            return None
        try:
            return stack.mirror.attach_nbd(entry, export, timeout, save)
        except (RemoteError, CommandError) as e:
            log.info("the copy's export of %s did not answer (%s): asking the destination", entry.name, e.message)
            return None


def mirror_table(layout: mirrorlog.Layout, logs: list[str], era_dev: str, leg_dev: str) -> Table:
    """LOGS, ERA_DEV, LEG_DEV: what the kernel accepts (major:minor, or a path)."""
    """The top while mirroring: one dm-mirror per part of LAYOUT, leg 0 the era device (the
    source of every resync), leg 1 the destination over NBD. handle_errors + keep_log: a
    failed leg raises a dm event but holds no write; the guest keeps writing to leg 0 and era
    keeps recording (README: "Leg failures")."""
    parts = []
    for i, log in enumerate(logs):
        start, length, _ = layout.part(i)
        parts.append(Mirror(length, DiskLog(log, layout.region), (era_dev, leg_dev),
                            handle_errors=True, keep_log=True, offset=start))
    return Table(parts[0] if len(parts) == 1 else MirrorSet(tuple(parts)))


def _add_regions(stack: Stack, entry: journal.Entry, layout: mirrorlog.Layout, logs: list[str],
                 ranges: Iterable[BlockRange], era_dev: str, leg_dev: str, save: Callable[[], None]) -> float:
    """Mark RANGES out of sync in the running mirror: a swap to the same mirror over fresh log
    devices holding what the running one's logs say plus RANGES. Its logs are read while it
    runs: a region the kernel has marked in sync on disk stays in sync (a write to it goes to
    both legs; only a failed leg, which the health checks see, undoes that), and one it
    recovers after the read is only recovered twice. Not the same devices: a mirror's log can
    still be flushed by its worker after a suspend returned (a write completing late wakes
    it), over what dmmig wrote. Returns the pause."""
    fresh = stack.mirror.make_logs(entry, layout, layout.parts, save)
    images = [mirrorlog.LogImage(layout.part(i)[2], mirrorlog.read(dev, layout.slot)) for i, dev in enumerate(logs)]
    assert entry.block_sectors
    layout.mark(images, ((r.begin, r.end) for r in ranges), entry.block_sectors)
    for dev, img in zip(fresh, images):
        mirrorlog.write(dev, img.bytes())
    pause = stack.dm.swap(top_name(entry.name), mirror_table(layout, [block_device(d).devno for d in fresh],
                                                             era_dev, leg_dev), udev_sync=False)
    return pause  # the old log devices go at teardown with the rest: no losetup here


SYNC_POLL = 2.0  # seconds between two looks at the resync's progress without an event (a dmsetup
                 # process takes up to ~0.6 s to start in a loaded rig: a wait needs time to wait)


def _wait_sync(stack: Stack, top: str, nr: int, timeout: float, progress: Progress, name: str) -> tuple[int, int]:
    """Until every region is in sync and every leg is alive; the sync ratio alone is not
    enough (a failed recovery can still count). Returns the dm event counter then, and how
    many regions the kernel itself first reported out of sync (its view of our log)."""
    deadline = time.monotonic() + timeout
    seen = stack.dm.info(top)  # read before the status: an event raised after it ends the wait at once
    assert seen is not None
    events = seen.events
    first = st = stack.dm.mirror_status(top)
    progress.start("resync", first.regions - first.in_sync, unit="regions")
    done = 0
    while True:
        progress.advance(max(0, st.in_sync - first.in_sync - done))
        done = max(done, st.in_sync - first.in_sync)
        if not st.healthy:
            raise RemoteError(f"the NBD leg of {name} failed during the resync (health {st.health}, "
                              f"log {st.log_health}); the guest keeps writing to the source"
                              + (f". The SSH tunnel's log: {stack.mirror.tunnel_log(name)}"
                                 if stack.mirror.has_tunnel_log(name) else ""),
                              hint=f"`dmmig copy {name}` then `dmmig cutover {name}` to catch up, "
                                   f"or `dmmig abort {name}`")
        if st.synced:
            break
        if time.monotonic() > deadline:
            raise StateError(f"{name}: resync not done after {timeout:.0f}s ({st.in_sync}/{st.regions})",
                             hint="it goes on in the kernel; `dmmig status` shows it; rerun cutover to wait")
        # until the kernel raises an event (a part in sync, a leg failed) or SYNC_POLL passes: a
        # status every 0.1 s was a dmsetup process each, taken from the rig kernel's one CPU
        # beside the resync and the guest's writes
        # each wake is a dmsetup process taken from the rig kernel's one CPU, which the resync
        # needs: the counter comes with the wake
        try:
            got = stack.dm.wait_event(top, events, timeout=SYNC_POLL)
            events = events if got is None else got  # gone: the status below says so
        except CommandError as e:
            if not e.timed_out:
                time.sleep(0.1)  # e.g. the device busy: look again
        st = stack.dm.mirror_status(top)
    # the kernel raises one event when the last region is in sync: let it land first. EVENTS
    # was read before the status that said in sync: no change from it over 0.2 s after that
    while True:
        time.sleep(0.2)
        info = stack.dm.info(top)
        assert info is not None
        if info.events == events:
            break
        events = info.events
    progress.end(in_sync=st.in_sync, regions=st.regions)
    return events, first.regions - first.in_sync


def drop_mirror(stack: Stack, entry: journal.Entry) -> int | None:
    """Back to linear over era (which holds every write), then tear down the leg, log,
    tunnel and watcher. A no-op when there is no mirror. Returns the top's length (sectors),
    None without a top."""
    top = top_name(entry.name)
    if entry.phase == journal.COPIED and entry.mirror.empty() and not stack.mirror.leftovers(entry.name):
        # the copy ended on linear over era and no cutover has begun since (it journals
        # CUTTING_OVER before its first swap, and a failed one COPIED only once it dropped its
        # mirror): the live table alone confirms it, one dmsetup process where info + table
        # are two on the cutover's critical path
        cur = stack.dm.table(top)
        if not isinstance(cur.target, MIRRORS):
            return cur.length
    info = stack.dm.info(top)
    steps = Steps()
    live = stack.dm.table(top) if info is not None else None  # read once: a dmsetup process each
    if info is not None and live is not None and (info.has_inactive or info.suspended
                                                  or isinstance(live.target, MIRRORS)):
        era_dev = block_device(f"/dev/mapper/{era_name(entry.name)}").devno
        back = Table(Linear(live.length, era_dev))
        if isinstance(live.target, MIRRORS) or info.has_inactive:
            steps(f"swap {top} back to linear over the era device", lambda: stack.dm.swap(top, back, noflush=True))
        else:
            steps(f"resume {top}", lambda: stack.dm.resume(top))
    steps.check(f"leaving the mirror of {entry.name}")  # never tear down a leg still in use
    if not entry.mirror.empty() or stack.mirror.leftovers(entry.name):
        stack.mirror.teardown(entry.name, entry, steps)
        entry.mirror = MirrorState()
        stack.journal.save(entry)
    steps.check(f"leaving the mirror of {entry.name}")
    return live.length if live is not None else None
