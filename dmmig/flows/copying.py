"""`dmmig copy`: the base copy, then rounds of what era recorded since, until the delta
converges; resumable after a kill from the journal's offsets and eras.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from dmmig import sizing
from dmmig.adapters import nbd, sparse, writefence
from dmmig.adapters.agentclient import WARM_PROTOCOL
from dmmig.adapters.blockdev import logical_block_size
from dmmig.adapters.ssh import SshOptions
from dmmig.core import journal
from dmmig.core.copier import Copier, Counters
from dmmig.core.records import BasePass, CopyState, Destination, Round, to_json
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, Busy
from dmmig.flows import warm
from dmmig.flows.cutover import drop_mirror
from dmmig.flows.handover import copy_rate
from dmmig.flows.session import (
    CopyOptions,
    Remote,
    check_destination,
    check_source,
    check_transport,
    destination_of,
    plan_transport,
    probe_tunnel,
    start_export,
)
from dmmig.flows.started import Started
from dmmig.names import top_name
from dmmig.progress import Progress, Stopwatch, since_exec
from dmmig.validate import block_fits

log = logging.getLogger("dmmig.copy")


def copy(stack: Stack, name: str, host: str | None, ssh_opts: SshOptions, opts: CopyOptions,
         progress: Progress) -> dict[str, Any]:
    # TIMING: where the wall time goes, for the summary. The main thread's phases add up to
    # the whole; "overlapped" ones ran in a thread meanwhile (the main thread's wait for them
    # is its own phase)
    t, par = Stopwatch(), Stopwatch()
    t.add("start", since_exec() or 0.0)  # Python's start, the imports, the arguments
    t0 = time.monotonic()
    entry = stack.prepared(name)  # refuses an unknown or unprepared NAME before anything else
    check_transport(opts)
    with stack.journal.lock(name):
        dest = destination_of(entry, host, ssh_opts, opts)
        # the connection and the agent's start there take a second or so that this host only
        # waits for: the local checks and the suspend guard's start run meanwhile
        connecting = Started(lambda: Remote(dest, par))
        try:
            # what the cutover will need, here and there, before the copy: not after it
            check_source(stack, dest.transport, [name])
            assert entry.block_sectors
            length = stack.dm.table(top_name(name)).length  # read once: a dmsetup process each
            block_fits(entry.block_sectors, length, name)
            stack.dm.arm_guard()
        except BaseException:
            connecting.abandon(lambda r: r.close())
            raise
        t.add("local_checks", time.monotonic() - t0)
        with t("remote_wait"):
            nbd.load_client()  # this host only waits here (for the agent's start there)
            remote = connecting.result()  # unknown host key, bad credentials, unreachable: refused here
        probing = probe_tunnel(stack, dest, remote, par)
        try:
            with t("agent_probe"):
                hello = remote.agent.hello  # an agent of this version says what it lacks in its hello
                check_destination(hello if "tools" in hello else remote.agent.call("probe", paths=[]), dest.host)
            # catching up after a failed leg (or a cutover that did not finish): back to linear
            # over era first; era holds every write since the cutover, and the rounds resend them
            with t("drop_mirror"):
                drop_mirror(stack, entry)
        except BaseException:
            if probing is not None:
                probing.wait()  # it stops its ssh
            remote.close()
            raise
        handles: list[Any] = []
        path = ""
        try:
            with t("plan_transport"):
                if probing is not None:
                    dest.tunnel, why = probing.result()
                    dest.tunnel_probe = why or "streamlocal forwarding works"
                plan_transport(stack, name, dest, remote)
            size = length * 512  # dropping a mirror keeps the top's length
            # the top's logical block size is what blkfront got (blkback passes it on)
            block_size = logical_block_size(stack.runner, f"/dev/mapper/{top_name(name)}")
            if entry.copy.migration is None:  # prepared by an earlier version: one id from now on
                entry.copy.migration = uuid.uuid4().hex
            # warm (dmmig/flows/warm.py): decided once per migration, before its first write there
            asking = entry.copy.base_era is None and not entry.copy.base_started and not entry.copy.base_done
            track, cold_why = (None, "")
            if asking and not (entry.copy.warm and entry.copy.warm.decision):
                with t("warm_check"):
                    track, cold_why = warm.local_verdict(stack, entry)
                if track is not None and remote.agent.hello.get("warm") != WARM_PROTOCOL:
                    track, cold_why = None, "the destination's dmmig checks no generations (an older version)"
            asked: dict[str, Any] = {"warm": track.generation} if track else {}
            decided_warm = entry.copy.warm is not None and entry.copy.warm.warm
            # while the destination prepares; none for a warm copy (it has no base pass)
            base_era = None if track or decided_warm else _base_era(stack, name, entry, par)
            # journaled before anything changes there: a dmmig killed after prepare_disk or the
            # export leaves a destination that abort knows to clean up
            before = entry.dest
            entry.dest = dest.copy()
            stack.journal.save(entry)
            try:
                try:
                    with t("prepare_disk"):
                        disk = remote.agent.call("prepare_disk", name=name, path=dest.disk, size=size,
                                                 create=opts.create, migration=entry.copy.migration,
                                                 block_size=block_size, **asked)
                except (BadInput, Busy):  # refused there, nothing changed: another destination may be tried
                    entry.dest = before
                    stack.journal.save(entry)
                    raise
                with t("export"):
                    # fresh: an earlier copy's or mirror leg's connection may still hold writes
                    # on their way there, which must not land over this copy's
                    export = start_export(remote, dest, name, fresh=True)
                dest.export = export
                dest.remote_state = remote.agent.hello.get("state_dir")
                if entry.copy.zeroed is None:
                    entry.copy.zeroed = bool(disk["zeroed"])
                if asking:
                    warm.decide(stack, entry, track, cold_why, disk, size)
                entry.dest = dest
                stack.journal.save(entry, journal.COPYING)
                with t("nbd_connect"):
                    handles, path = _connect(name, dest, export, remote, opts)
            except BaseException:
                if base_era is not None:
                    base_era.wait()  # the top is resumed whatever happens; never left behind us
                raise
            summary = _copy_rounds(stack, name, entry, handles, size, opts, progress, t, base_era)
            with t("teardown"):
                for h in handles:
                    h.shutdown()
                stack.journal.save(entry, journal.COPIED)
        finally:
            with t("teardown"):
                remote.close()
    t.add("total", since_exec() or 0.0)
    summary["nbd"] = {"path": path, "connections": len(handles)}
    w = entry.copy.warm
    summary["warm"] = (w.decision if w and w.decision else
                       warm.COLD + (cold_why or "this migration's first copy was a full one"))
    summary["timing"] = {**t.rounded(), "overlapped": par.rounded()}
    return summary


# The copier's NBD connections by transport. bench/copy_wall.py (one run, 2026-12-05): four TLS
# connections cost the destination's one CPU 1.8 s more than one and finished later; the SSH
# relay is one channel through the agent's session.
COPY_CONNECTIONS = {"ssh": 1, "nbd": 1}


def _connect(name: str, dest: Destination, export: nbd.Export, remote: Remote,
             opts: CopyOptions) -> tuple[list[Any], str]:
    """The copier's NBD connections to NAME's export, and which way they go (the summary says
    it): OPTS.connections over TCP (with this migration's TLS), or (--transport ssh) one,
    through the agent's own session, which becomes the relay (op_relay)."""
    n = max(1, opts.connections or COPY_CONNECTIONS[dest.transport])
    if dest.transport != "ssh":
        return [remote.nbd(export, name) for _ in range(n)], "tcp+tls" if dest.tls else "tcp"
    return [remote.agent_nbd(name)], "ssh agent relay"


def estimate(stack: Stack, name: str, *, block_bytes: int | None = None, rate: float | None = None) -> dict[str, Any]:
    """What copying NAME would cost, for `--dry-run`; changes nothing, contacts nobody: the era
    block (NAME's own once prepared, else what prepare would choose, or BLOCK_BYTES) and its
    metadata, the bytes the base copy still sends, and the time at RATE bytes/s (default: the
    best rate this migration's copy reached, else sizing.DEFAULT_RATE, an assumption)."""
    entry = stack.entry_of(name)
    size = stack.dm.table(top_name(name)).length * 512
    prepared = entry.block_sectors is not None and entry.phase not in (journal.WRAPPED, journal.PREPARING)
    choice = sizing.choose_block(size, entry.block_sectors * 512 if prepared and entry.block_sectors else block_bytes,
                                 stack.discard_unit(name))
    st = entry.copy if prepared else CopyState()
    start = size if st.base_done else st.base_offset
    layout = sparse.layout_of(stack.loop, entry.origin)
    if st.base_done:
        send, basis = 0, "the base copy is done; the rounds send what era records (`dmmig dirty` shows it)"
    elif layout is not None:
        try:
            send = layout.data_bytes(start, size)
        finally:
            layout.close()
        basis = (f"the data of {entry.origin}'s backing file {layout.path} (its holes are known zeros, not read); "
                 "zero blocks within the data are found while copying and not sent")
    else:
        send = size - start
        basis = (f"the whole disk: where {entry.origin} holds zeros cannot be told without reading it (not a loop "
                 "device over a file); zero blocks are found while copying and not sent")
    warm_note = None
    if not st.base_started and st.base_era is None:
        track, why = warm.local_verdict(stack, entry, drained=False)
        if track is not None and not prepared:  # no era under the top: nothing tracks its writes
            track, why = None, f"{name} is not prepared here: no era device tracks its writes"
        if track is not None:
            ranges, bsz, _ = stack.dirty(name, track.era)
            send = min(sum(r.count for r in ranges) * bsz, size)
            warm_note = (f"warm: {send / (1 << 20):.1f} MiB to send (the blocks written here since generation "
                         f"{track.generation[:12]}), if the destination's disk still carries it untouched: the copy "
                         "checks it there first, and copies all of it if not")
            basis = "era's record of the writes here since the generation (warm)"
        else:
            warm_note = warm.COLD + why
    measured = copy_rate(entry) if prepared else None
    if rate is not None:
        how = "--rate"
    elif measured:
        rate, how = measured, "the best rate this migration's copy reached"
    else:
        rate, how = float(sizing.DEFAULT_RATE), (f"assumed {sizing.human(sizing.DEFAULT_RATE)}/s (about a 1 Gbit/s "
                                                 "link); give --rate for yours")
    return {"name": name, "disk_bytes": size, "block_bytes": choice.block_bytes,
            "block": "prepared" if prepared else ("chosen from the disk size" if choice.chosen else "--block-size"),
            "era_blocks": choice.nr_blocks, "metadata_bytes": choice.metadata_bytes,
            "metadata_file_bytes": choice.metadata_file, "warning": choice.warning,
            "send_bytes": send, "send_basis": basis, "warm": warm_note, "rate_bytes_per_s": int(rate),
            "rate_basis": how,
            "seconds": round(send / rate, 1)}


def render_estimate(e: dict[str, Any], indent: str = "") -> list[str]:
    h = sizing.human
    lines = [f"{indent}era block {h(e['block_bytes'])} ({e['block']}): {e['era_blocks']} blocks; era metadata "
             f"{h(e['metadata_bytes'])} at prepare on a {h(e['metadata_file_bytes'])} sparse device",
             f"{indent}base copy sends {h(e['send_bytes'])} of {h(e['disk_bytes'])}: {e['send_basis']}",
             f"{indent}time at {h(e['rate_bytes_per_s'])}/s ({e['rate_basis']}): {sizing.duration(e['seconds'])}, "
             "plus the rounds"]
    if e.get("warm"):
        lines.append(f"{indent}{e['warm']}")
    if e.get("warning"):
        lines.append(f"{indent}warning: {e['warning']}")
    return lines


def _base_era(stack: Stack, name: str, entry: journal.Entry, par: Stopwatch) -> Started[tuple[int, str | None]] | None:
    """The base pass's era (see _copy_rounds), taken in a thread when it is still to take: a
    suspend and resume of the top here, while the destination prepares its disk and export."""
    if entry.copy.base_done or entry.copy.base_era is not None:
        return None

    def take() -> tuple[int, str | None]:
        with par("era_base_checkpoint"):
            return stack.drained_checkpoint(name)
    return Started(take)


def _copy_rounds(stack: Stack, name: str, entry: journal.Entry, h: list[Any], size: int, opts: CopyOptions,
                 progress: Progress, t: Stopwatch, base_era: Started[tuple[int, str | None]] | None = None
                 ) -> dict[str, Any]:
    assert entry.metadata
    # a loop device over a sparse file: its holes are not read (dmmig/adapters/sparse.py)
    layout = sparse.layout_of(stack.loop, entry.origin)
    try:
        return _copy_passes(stack, name, entry, h, size, opts, progress, layout, t, base_era)
    finally:
        if layout is not None:
            layout.close()


def _copy_passes(stack: Stack, name: str, entry: journal.Entry, h: list[Any], size: int, opts: CopyOptions,
                 progress: Progress, layout: sparse.FileLayout | None, t: Stopwatch,
                 base_era: Started[tuple[int, str | None]] | None) -> dict[str, Any]:
    st = entry.copy
    assert entry.block_sectors
    bs = entry.block_sectors * 512
    total = Counters()

    def copier(dest_zero: bool) -> Copier:
        return Copier(entry.origin, h, dest_zero=dest_zero, bwlimit=opts.bwlimit, on_progress=progress.advance,
                      layout=layout.pieces if layout else None)

    rounds_only = st.base_done  # the base pass was done before this run (or skipped: warm)
    if not st.base_done:
        if st.base_era is None:
            # every write tagged below base_era has completed (drained): the base pass reads it;
            # every later one carries base_era or more, and the rounds query from there
            with t("era_base_checkpoint"):
                st.base_era, st.discards = base_era.result() if base_era is not None else stack.drained_checkpoint(name)
            st.base_offset = 0
            stack.journal.save(entry)
        start = st.base_offset
        # "known to be zero" holds only for offsets never written on the destination: the first
        # base pass over a disk dmmig created. A resumed pass may meet writes of ours past the
        # journaled offset (in flight when we were killed); the rounds meet the base's data.
        dest_zero = bool(st.zeroed) and start == 0 and not st.base_started
        st.base_started = True
        stack.journal.save(entry)
        progress.start("base", size - start)

        def ck(pos: int) -> None:
            st.base_offset = pos
            stack.journal.save(entry)

        c = copier(dest_zero).copy([(start, size - start)], checkpoint=ck)
        stack.check_lv(entry)  # an adopted LV that LVM reloaded meanwhile: era missed writes
        t.add("base_copy", c.seconds)
        total.add(c)
        st.base_done, st.base_offset, st.next_since = True, size, st.base_era
        st.base = BasePass(start=start, **c.as_dict())
        stack.journal.save(entry)
        progress.end(**c.as_dict())

    rounds = copier(False)  # zeros the guest wrote are written as zeros
    prev: int | None = None
    rounds_now = 0
    while True:
        t_era = time.monotonic()
        ranges, now, mark = stack.drained_dirty_ranges(name, int(st.next_since or 0))  # streamed from a file
        era_secs = time.monotonic() - t_era
        t.add("rounds_era_snapshot", era_secs)
        # era marks every block a discard touches while its limit holds (Stack.confine_discards);
        # lost (raised by hand, a device an older dmmig prepared) a discard since counts whole
        full = writefence.discard_fallback(stack.discards_exact(name), writefence.discards_since(st.discards, mark))
        try:
            dirty = size if full else ranges.blocks * bs
            progress.start(f"round {len(st.rounds) + 1}", dirty)
            c = rounds.copy([(0, size)] if full else
                            ((r.begin * bs, min(r.end * bs, size) - r.begin * bs) for r in ranges))
        finally:
            ranges.close()
        stack.check_lv(entry)  # each round: an adopted LV that LVM reloaded is no longer tracked
        total.add(c)
        t.add("rounds_copy", c.seconds)
        rounds_now += 1
        rnd = Round(since=int(st.next_since or 0), dirty_bytes=dirty, **c.as_dict(), era_seconds=round(era_secs, 3),
                    full=full)
        st.rounds.append(rnd)
        st.next_since = now  # every write tagged below now had landed before this round read
        st.discards = mark   # and every discard counted in mark (a full round read after them all)
        stack.journal.save(entry)
        progress.end(**to_json(rnd))
        if full:
            log.warning("%s: round %d sent the whole disk: %s", name, len(st.rounds), full)
        if dirty <= opts.converge:
            why = f"delta {dirty} bytes is below --converge {opts.converge}"
            break
        if prev is not None and dirty >= prev:
            why = "the delta stopped shrinking"
            break
        if rounds_now >= opts.max_rounds:
            why = f"--max-rounds {opts.max_rounds} reached"
            break
        prev = dirty
    secs = max(total.seconds, 1e-9)
    full_rounds = sum(1 for r in st.rounds[-rounds_now:] if r.full)
    summary = {"name": name, "stopped_because": why, **total.as_dict(), "full_rounds": full_rounds,
               "base": None if rounds_only or st.base is None else to_json(st.base),
               "throughput_bytes_per_s": int(total.read / secs),
               "rounds": [to_json(r) for r in st.rounds[-rounds_now:]],
               "dirty_rate_bytes_per_s": int(st.rounds[-1].dirty_bytes / max(st.rounds[-2].seconds, 1e-9))
               if len(st.rounds) > 1 else None}
    return summary

