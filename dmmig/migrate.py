"""The migration flow, top to bottom: copy (base + era rounds), cutover to the mirror,
finish, verify, and abort of both sides.

Each phase journals its intent and progress, so a killed dmmig resumes (`copy` again) or
cleans up (`abort`) from what the journal and the kernel say.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from dmmig import gate, journal, mirrorlog, nbd, sizing, sparse, tlscreds, tunnel
from dmmig.agentclient import AgentClient
from dmmig.agentcmd import agent_argv
from dmmig.blockdev import block_device, logical_block_size
from dmmig.copier import Copier, Counters, digest_ranges
from dmmig.destination import AgentServer, incoming
from dmmig.dm.targets import MIRRORS, DiskLog, Linear, Mirror, MirrorSet, Table
from dmmig.era import BlockRange, merge
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError, StateError, Steps
from dmmig.names import Files, era_name, top_name
from dmmig.progress import Progress, Stopwatch, since_exec
from dmmig.runner import Runner
from dmmig.ssh import (
    TRANSPORT_ERRORS,
    Endpoint,
    SSHClient,
    channel_socket,
    channel_stderr,
    close_quietly,
    connect,
    relay_socket,
)
from dmmig.stack import Stack
from dmmig.validate import block_fits, host_name, missing_tools, nbd_timeout, require_tools
from dmmig.window import Window, WindowClosed

log = logging.getLogger("dmmig.migrate")


@dataclass
class CopyOptions:
    dest_disk: str | None = None
    create: bool = False
    transport: str = "ssh"            # or "nbd"
    nbd_address: str | None = None
    insecure: bool = False            # --transport nbd without TLS: the operator's explicit choice
    tunnel: str | None = None         # --transport ssh: the mirror leg's mode; None: probe
    remote_dmmig: str = "dmmig"
    remote_state_dir: str | None = None
    converge: int = 64 << 20          # stop when a round's delta is below this
    max_rounds: int = 10
    bwlimit: float | None = None
    # NBD connections of the copier; None: by transport (COPY_CONNECTIONS)
    connections: int | None = None


class Remote:
    """One SSH connection to the destination: the agent, and NBD through it or direct."""

    def __init__(self, dest: dict[str, Any], phases: Stopwatch | None = None) -> None:
        self.dest = dest
        self.ep = Endpoint(dest["host"], dest["user"], dest["port"], dest["known_hosts"], dest.get("identity"))
        t = phases or Stopwatch()
        with t("ssh_connect"):
            self.ssh: SSHClient = connect(self.ep)
        try:
            with t("agent_start"):
                self.agent = AgentClient(self.ssh, dest["remote_dmmig"], dest.get("remote_state_dir"))
        except TRANSPORT_ERRORS as e:
            close_quietly(self.ssh)
            raise RemoteError(f"the SSH connection to {self.ep} broke starting the agent: "
                              f"{type(e).__name__} {e}".rstrip()) from e
        except BaseException:
            close_quietly(self.ssh)
            raise

    def nbd(self, export: dict[str, Any], name: str) -> Any:
        """A libnbd handle on NAME's export: through the agent's relay (an exec channel: works
        with a key that allows no forwarding), or over TCP with this migration's TLS."""
        if self.dest["transport"] == "ssh":
            sock, chan = relay_socket(self.ssh, agent_argv(self.dest, "relay", name))
            try:
                return nbd.open_client(sock, export=name)
            except RemoteError as e:
                for _ in range(20):  # its reason arrives with its exit
                    if chan.exit_status_ready():
                        break
                    time.sleep(0.05)
                raise RemoteError(f"{e.message}; the destination's relay said: {channel_stderr(chan) or '(nothing)'}",
                                  hint=e.hint) from e
        return nbd.open_client(None, addr=export["addr"], port=export["port"], export=name, tls=self.dest.get("tls"))

    def agent_nbd(self, name: str) -> Any:
        """A libnbd handle on NAME's export (--transport ssh) through the agent's own session,
        which becomes the relay (op_relay): no second agent starts there. The agent takes no
        call after it."""
        self.agent.call("relay", name=name)
        chan, rest = self.agent.detach()
        return nbd.open_client(channel_socket(chan, rest), export=name)

    def probe_tunnel(self, runner: Runner, local_dir: str) -> tuple[str, str]:
        """Which mode the mirror leg's OpenSSH tunnel can use there (tunnel.probe)."""
        os.makedirs(local_dir, mode=0o700, exist_ok=True)
        return tunnel.probe(runner, self.dest, str(self.agent.hello["state_dir"]), local_dir)

    def close(self) -> None:
        # runs in `finally` after a failure too: a dead connection must not hide that failure
        close_quietly(self.agent)
        close_quietly(self.ssh)


def copy(stack: Stack, name: str, host: str | None, ep_opts: dict[str, Any], opts: CopyOptions,
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
        dest = _destination(entry, host, ep_opts, opts)
        # the connection and the agent's start there take a second or so that this host only
        # waits for: the local checks and the suspend guard's start run meanwhile
        connecting = Started(lambda: Remote(dest, par))
        try:
            # what the cutover will need, here and there, before the copy: not after it
            check_source(stack, str(dest["transport"]))
            assert entry.block_sectors
            block_fits(entry.block_sectors, stack.dm.table(top_name(name)).length, name)
            stack.dm.arm_guard()
        except BaseException:
            connecting.abandon(lambda r: r.close())
            raise
        t.add("local_checks", time.monotonic() - t0)
        with t("remote_wait"):
            remote = connecting.result()  # unknown host key, bad credentials, unreachable: refused here
        probing = _probe_tunnel(stack, dest, remote, par)
        try:
            with t("agent_probe"):
                hello = remote.agent.hello  # an agent of this version says what it lacks in its hello
                check_destination(hello if "tools" in hello else remote.agent.call("probe", paths=[]), dest["host"])
            # catching up after a failed leg (or a cutover that did not finish): back to linear
            # over era first; era holds every write since the cutover, and the rounds resend them
            with t("drop_mirror"):
                _drop_mirror(stack, entry)
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
                    dest["tunnel"], why = probing.result()
                    dest["tunnel_probe"] = why or "streamlocal forwarding works"
                plan_transport(stack, name, dest, remote)
            size = stack.dm.table(f"dmmig-{name}").length * 512
            # the top's logical block size is what blkfront got (blkback passes it on)
            block_size = logical_block_size(stack.runner, f"/dev/mapper/{top_name(name)}")
            if "migration" not in entry.copy:  # prepared by an earlier version: one id from now on
                entry.copy["migration"] = uuid.uuid4().hex
            base_era = _base_era(stack, name, entry, par)  # while the destination prepares
            # journaled before anything changes there: a dmmig killed after prepare_disk or the
            # export leaves a destination that abort knows to clean up
            before = entry.dest
            entry.dest = dict(dest)
            stack.journal.save(entry)
            try:
                try:
                    with t("prepare_disk"):
                        disk = remote.agent.call("prepare_disk", name=name, path=dest["disk"], size=size,
                                                 create=opts.create, migration=entry.copy["migration"],
                                                 block_size=block_size)
                except (BadInput, Busy):  # refused there, nothing changed: another destination may be tried
                    entry.dest = before
                    stack.journal.save(entry)
                    raise
                with t("export"):
                    export = _export(remote, dest, name)
                dest["export"] = export
                dest["remote_state"] = remote.agent.hello.get("state_dir")
                if "zeroed" not in entry.copy:
                    entry.copy["zeroed"] = bool(disk["zeroed"])
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
    summary["timing"] = {**t.rounded(), "overlapped": par.rounded()}
    return summary


# The copier's NBD connections by transport. bench/copy_wall.py (one run, 2026-12-05): four TLS
# connections cost the destination's one CPU 1.8 s more than one and finished later; the SSH
# relay is one channel through the agent's session.
COPY_CONNECTIONS = {"ssh": 1, "nbd": 1}


def _connect(name: str, dest: dict[str, Any], export: dict[str, Any], remote: Remote,
             opts: CopyOptions) -> tuple[list[Any], str]:
    """The copier's NBD connections to NAME's export, and which way they go (the summary says
    it): OPTS.connections over TCP (with this migration's TLS), or (--transport ssh) one,
    through the agent's own session, which becomes the relay (op_relay)."""
    n = max(1, opts.connections or COPY_CONNECTIONS[str(dest["transport"])])
    if dest["transport"] != "ssh":
        return [remote.nbd(export, name) for _ in range(n)], "tcp+tls" if dest.get("tls") else "tcp"
    return [remote.agent_nbd(name)], "ssh agent relay"


def _probe_tunnel(stack: Stack, dest: dict[str, Any], remote: Remote,
                  par: Stopwatch) -> Started[tuple[str, str]] | None:
    """The plan's tunnel probe (plan_transport), started in a thread: it waits mostly for the
    destination (OpenSSH's login, an agent's start there), while the checks go on here."""
    if dest["transport"] != "ssh" or dest.get("tunnel"):
        return None

    def probe() -> tuple[str, str]:
        with par("tunnel_probe"):
            return remote.probe_tunnel(stack.runner, stack.journal.dir)
    return Started(probe)


T = TypeVar("T")


class Started(Generic[T]):
    """FN running in a thread from now on. result() waits for it and returns what it returned
    or raises what it raised; abandon(CLEANUP): nobody will take the result, CLEANUP gets it
    once it comes (exactly once, whichever comes first)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._lock = threading.Lock()
        self._value: list[T] = []  # the result, once there
        self._error: BaseException | None = None
        self._cleanup: Callable[[T], None] | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever takes the result
            self._error = e
            return
        with self._lock:
            self._value.append(value)
            cleanup = self._cleanup
        if cleanup is not None:
            cleanup(value)

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value[0]

    def abandon(self, cleanup: Callable[[T], None]) -> None:
        with self._lock:
            self._cleanup = cleanup
            value = list(self._value)
        for v in value:
            cleanup(v)


def estimate(stack: Stack, name: str, *, block_bytes: int | None = None, rate: float | None = None) -> dict[str, Any]:
    """What copying NAME would cost, for `--dry-run`; changes nothing, contacts nobody: the era
    block (NAME's own once prepared, else what prepare would choose, or BLOCK_BYTES) and its
    metadata, the bytes the base copy still sends, and the time at RATE bytes/s (default: the
    best rate this migration's copy reached, else sizing.DEFAULT_RATE, an assumption)."""
    entry = stack.entry_of(name)
    size = stack.dm.table(top_name(name)).length * 512
    prepared = entry.block_sectors is not None and entry.phase not in (journal.WRAPPED, journal.PREPARING)
    choice = sizing.choose_block(size, entry.block_sectors * 512 if prepared and entry.block_sectors else block_bytes)
    st = entry.copy if prepared else {}
    start = size if st.get("base_done") else int(st.get("base_offset") or 0)
    layout = sparse.layout_of(stack.loop, entry.origin)
    if st.get("base_done"):
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
    measured = _copy_rate(entry) if prepared else None
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
            "send_bytes": send, "send_basis": basis, "rate_bytes_per_s": int(rate), "rate_basis": how,
            "seconds": round(send / rate, 1)}


def render_estimate(e: dict[str, Any], indent: str = "") -> list[str]:
    h = sizing.human
    lines = [f"{indent}era block {h(e['block_bytes'])} ({e['block']}): {e['era_blocks']} blocks; era metadata "
             f"{h(e['metadata_bytes'])} at prepare on a {h(e['metadata_file_bytes'])} sparse device",
             f"{indent}base copy sends {h(e['send_bytes'])} of {h(e['disk_bytes'])}: {e['send_basis']}",
             f"{indent}time at {h(e['rate_bytes_per_s'])}/s ({e['rate_basis']}): {sizing.duration(e['seconds'])}, "
             "plus the rounds"]
    if e.get("warning"):
        lines.append(f"{indent}warning: {e['warning']}")
    return lines


def check_source(stack: Stack, transport: str) -> None:
    """Every tool and dm target this host needs from prepare to cutover (the tunnel's ssh for
    --transport ssh); checked before anything changes, never found missing after the copy."""
    require_tools("dmsetup", "losetup", "era_invalidate", "nbd-client", *(["ssh"] if transport == "ssh" else []))
    stack.dm.require_targets("era", "mirror")


def check_destination(probe: dict[str, Any], host: str) -> None:
    """What the agent's probe says the destination lacks (qemu-nbd, ...)."""
    missing = sorted(t for t, ok in (probe.get("tools") or {}).items() if not ok)
    if missing:
        raise missing_tools(missing, f"on {host}")
def check_transport(opts: CopyOptions) -> None:
    """--transport and its options, refused before anything changes."""
    if opts.transport not in ("ssh", "nbd"):
        raise BadInput(f"unknown transport {opts.transport!r}: use ssh or nbd")
    if opts.transport == "nbd":
        if not opts.nbd_address:
            raise BadInput("--transport nbd needs --nbd-address ADDR (the destination's address on the "
                           "migration network)")
        host_name(opts.nbd_address)
        if opts.tunnel:
            raise BadInput("--tunnel is for --transport ssh")
    elif opts.insecure:
        raise BadInput("--insecure is for --transport nbd (--transport ssh is always encrypted and "
                       "authenticated by SSH)")
    if opts.tunnel not in (None, *tunnel.MODES):
        raise BadInput(f"unknown --tunnel {opts.tunnel!r}: use auto, {' or '.join(tunnel.MODES)}")


def destination(host: str, ep_opts: dict[str, Any], opts: CopyOptions, disk: str) -> dict[str, Any]:
    """The destination record Remote connects with (journaled as entry.dest). TUNNEL (ssh):
    the mirror leg's mode, chosen by the plan's probe; TLS (nbd): this migration's credentials
    here; INSECURE: the operator chose an NBD leg without TLS."""
    ep = Endpoint.parse(host, **ep_opts)
    check_transport(opts)
    d = {"host": ep.host, "user": ep.user, "port": ep.port, "known_hosts": ep.known_hosts,
         "identity": ep.identity, "disk": disk, "transport": opts.transport,
         "nbd_address": opts.nbd_address, "remote_dmmig": opts.remote_dmmig,
         "remote_state_dir": opts.remote_state_dir, "insecure": opts.insecure}
    if opts.tunnel:
        d["tunnel"] = opts.tunnel
    return d


def plan_transport(stack: Stack, name: str, dest: dict[str, Any], remote: Remote) -> None:
    """Decide, before any change there, how NBD reaches the destination; journaled in DEST.
    ssh: the tunnel's mode, by a real probe with OpenSSH unless already decided (a plan, a
    journaled destination, --tunnel); nbd: this migration's TLS credentials, unless --insecure."""
    if dest["transport"] == "ssh":
        if not dest.get("tunnel"):
            dest["tunnel"], why = remote.probe_tunnel(stack.runner, stack.journal.dir)
            dest["tunnel_probe"] = why or "streamlocal forwarding works"
    elif not dest.get("insecure") and not dest.get("tls"):
        dest["tls"] = stack.mirror.credentials(name, str(dest["nbd_address"]))


def _export(remote: Remote, dest: dict[str, Any], name: str, deadline_s: float | None = None) -> dict[str, Any]:
    """Start (or find) NAME's export there, as DEST's transport wants it."""
    if dest["transport"] == "ssh":
        return dict(remote.agent.call("export", name=name, deadline_s=deadline_s)["export"])
    if dest.get("tls"):
        try:
            files = tlscreds.server_files(dest["tls"])
        except OSError as e:
            raise StateError(f"the TLS credentials of {name} are gone ({e})",
                             hint=f"`dmmig copy {name}` makes new ones") from e
        return dict(remote.agent.call("export", name=name, addr=dest["nbd_address"], tls=files,
                                      deadline_s=deadline_s)["export"])
    if not dest.get("insecure"):
        raise StateError(f"{name}: no TLS credentials for --transport nbd (journaled by an older dmmig?)",
                         hint=f"`dmmig copy {name}` makes them, or `dmmig abort {name}`")
    return dict(remote.agent.call("export", name=name, addr=dest["nbd_address"], insecure=True,
                                  deadline_s=deadline_s)["export"])


def _destination(entry: journal.Entry, host: str | None, ep_opts: dict[str, Any], opts: CopyOptions) -> dict[str, Any]:
    if host is None:
        if not entry.dest:
            raise BadInput(f"no destination known for {entry.name}: give [USER@]HOST")
        return dict(entry.dest)
    dest = destination(host, ep_opts, opts, opts.dest_disk or entry.origin)
    old = entry.dest
    if old and (old["host"], old["disk"]) != (dest["host"], dest["disk"]):
        raise StateError(f"{entry.name} is already being copied to {old['host']}:{old['disk']}",
                         hint=f"`dmmig abort {entry.name}` to start over with another destination")
    keep_probe(old, dest)
    return dest


def keep_probe(old: dict[str, Any], dest: dict[str, Any]) -> None:
    """DEST (from the command line) takes the tunnel mode the plan's probe found for OLD (the
    journaled destination) if OpenSSH would log in and run the agent there the same way: the
    probe is asked again only when that changed. An earlier --tunnel is no probe result."""
    if (old and "tunnel" not in dest and old.get("tunnel") and old.get("tunnel_probe")
            and all(old.get(k) == dest.get(k) for k in PROBED_WITH)):
        dest["tunnel"], dest["tunnel_probe"] = old["tunnel"], old["tunnel_probe"]


# what the tunnel probe's answer depends on (OpenSSH's login there, the agent it runs)
PROBED_WITH = ("transport", "user", "port", "known_hosts", "identity", "remote_dmmig", "remote_state_dir")


def _base_era(stack: Stack, name: str, entry: journal.Entry, par: Stopwatch) -> Started[int] | None:
    """The base pass's era (see _copy_rounds), taken in a thread when it is still to take: a
    suspend and resume of the top here, while the destination prepares its disk and export."""
    if entry.copy.get("base_done") or "base_era" in entry.copy:
        return None

    def take() -> int:
        with par("era_base_checkpoint"):
            return stack.drained_checkpoint(name)
    return Started(take)


def _copy_rounds(stack: Stack, name: str, entry: journal.Entry, h: list[Any], size: int, opts: CopyOptions,
                 progress: Progress, t: Stopwatch, base_era: Started[int] | None = None) -> dict[str, Any]:
    entry.copy.setdefault("rounds", [])
    assert entry.metadata
    # a loop device over a sparse file: its holes are not read (dmmig/sparse.py)
    layout = sparse.layout_of(stack.loop, entry.origin)
    try:
        return _copy_passes(stack, name, entry, h, size, opts, progress, layout, t, base_era)
    finally:
        if layout is not None:
            layout.close()


def _copy_passes(stack: Stack, name: str, entry: journal.Entry, h: list[Any], size: int, opts: CopyOptions,
                 progress: Progress, layout: sparse.FileLayout | None, t: Stopwatch,
                 base_era: Started[int] | None) -> dict[str, Any]:
    st = entry.copy
    assert entry.block_sectors
    bs = entry.block_sectors * 512
    total = Counters()

    def copier(dest_zero: bool) -> Copier:
        return Copier(entry.origin, h, dest_zero=dest_zero, bwlimit=opts.bwlimit, on_progress=progress.advance,
                      layout=layout.pieces if layout else None)

    if not st.get("base_done"):
        if "base_era" not in st:
            # every write tagged below base_era has completed (drained): the base pass reads it;
            # every later one carries base_era or more, and the rounds query from there
            with t("era_base_checkpoint"):
                st["base_era"] = base_era.result() if base_era is not None else stack.drained_checkpoint(name)
            st["base_offset"] = 0
            stack.journal.save(entry)
        start = int(st["base_offset"])
        # "known to be zero" holds only for offsets never written on the destination: the first
        # base pass over a disk dmmig created. A resumed pass may meet writes of ours past the
        # journaled offset (in flight when we were killed); the rounds meet the base's data.
        dest_zero = bool(st.get("zeroed")) and start == 0 and not st.get("base_started")
        st["base_started"] = True
        stack.journal.save(entry)
        progress.start("base", size - start)

        def ck(pos: int) -> None:
            st["base_offset"] = pos
            stack.journal.save(entry)

        c = copier(dest_zero).copy([(start, size - start)], checkpoint=ck)
        t.add("base_copy", c.seconds)
        total.add(c)
        st.update(base_done=True, base_offset=size, next_since=st["base_era"],
                  base={"from": start, **c.as_dict()})
        stack.journal.save(entry)
        progress.end(**c.as_dict())

    rounds = copier(False)  # zeros the guest wrote are written as zeros
    prev: int | None = None
    rounds_now = 0
    while True:
        t_era = time.monotonic()
        ranges, now = stack.drained_dirty_ranges(name, int(st["next_since"]))  # streamed from a file
        era_secs = time.monotonic() - t_era
        t.add("rounds_era_snapshot", era_secs)
        try:
            dirty = ranges.blocks * bs
            progress.start(f"round {len(st['rounds']) + 1}", dirty)
            c = rounds.copy((r.begin * bs, min(r.end * bs, size) - r.begin * bs) for r in ranges)
        finally:
            ranges.close()
        total.add(c)
        t.add("rounds_copy", c.seconds)
        rounds_now += 1
        rnd = {"since": st["next_since"], "dirty_bytes": dirty, **c.as_dict(), "era_seconds": round(era_secs, 3)}
        st["rounds"].append(rnd)
        st["next_since"] = now  # every write tagged below now had landed before this round read
        stack.journal.save(entry)
        progress.end(**rnd)
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
    summary = {"name": name, "stopped_because": why, **total.as_dict(),
               "throughput_bytes_per_s": int(total.read / secs),
               "rounds": st["rounds"][-rounds_now:],
               "dirty_rate_bytes_per_s": int(st["rounds"][-1]["dirty_bytes"] / max(st["rounds"][-2]["seconds"], 1e-9))
               if len(st["rounds"]) > 1 else None}
    return summary


# ---- cutover -------------------------------------------------------------------------------
@dataclass
class CutoverOptions:
    nbd_timeout: int = 10       # seconds before a request to a dead peer fails the leg
    sync_timeout: float = 3600
    resync_parts: int | None = None  # mirror targets side by side (regions recovered at once); None: by transport


def cutover(stack: Stack, name: str, opts: CutoverOptions, progress: Progress) -> dict[str, Any]:
    """Swap the top table to mirror(era device, nbd leg) and let the kernel resync exactly
    the regions era recorded since the last copy round. Race-free in three steps:
    1. era is queried (D1: eras >= the last round's) and the logs mark D1 out of sync, outside
       any window; meanwhile the tunnel (--transport ssh) or the agent's export (--transport
       nbd) comes up in threads that journal nothing (this thread journals what they made, and
       on a failure waits for them before it tears down, so nothing of theirs comes up after
       the teardown). --transport ssh attaches the export the copy left running and asks the
       agent only if that one does not answer.
    2. one resume swaps to the mirror: its suspend drains every write so far to leg 0; from
       then on every write lands on both legs or, in a region out of sync, on leg 0 and is
       resynced; a write to a region being recovered waits for that region's copy.
    3. what was written between the query and the swap is in eras >= `first` and done (the
       swap drained it): a second query (D2) and, if D2 has a region that D1 did not (those
       the kernel recovers after the swap, so their copy reads D2's writes), a second swap to
       fresh logs holding the running logs' state plus D2 (_add_regions). 3 runs while the
       kernel already resyncs D1; the mirror counts as in sync only after it."""
    entry = stack.prepared(name)
    if entry.phase not in (journal.COPIED, journal.CUTTING_OVER, journal.MIRRORING) or not entry.copy.get("base_done"):
        raise StateError(f"{name} has not been copied (phase {entry.phase})",
                         hint=f"`dmmig copy {name} HOST` first")
    nbd_timeout(opts.nbd_timeout)
    parts = opts.resync_parts or mirrorlog.default_parts(entry.dest["transport"])
    if not 1 <= parts <= 64:
        raise BadInput(f"--resync-parts {parts}: 1..64")
    require_tools("nbd-client", *(["ssh"] if entry.dest["transport"] == "ssh" else []))
    stack.dm.require_targets("mirror")
    top, era = top_name(name), era_name(name)
    with stack.journal.lock(name):
        def save() -> None:
            stack.journal.save(entry)

        sw, par = Stopwatch(), Stopwatch()
        with sw("drop a previous mirror"):
            _drop_mirror(stack, entry)  # a rerun starts again from linear over era
        stack.journal.save(entry, journal.CUTTING_OVER)
        assert entry.metadata and entry.block_sectors
        length = stack.dm.table(top).length
        bs = entry.block_sectors
        layout = mirrorlog.Layout.choose(length, bs, max_parts=parts)
        since = int(entry.copy["next_since"])
        # SET-UP: what waits on the destination (OpenSSH's tunnel login; the connection, its
        # agent's start, the export) runs in threads while this host makes the logs and queries
        # era. The threads journal nothing: this thread journals what they made once they are
        # done. --transport ssh: the copy left its export running, so the leg first tries that
        # one through the tunnel (which checks the host key and logs in itself); the agent is
        # asked only if it does not answer. --transport nbd: the agent is asked meanwhile
        # (nbd-client's TCP connect to a host that stopped answering would hang a minute).
        dest = dict(entry.dest)
        exporting: Started[dict[str, Any]] | None = None
        copied = dict(entry.dest.get("export") or {})  # the copy's export: the same unless it moved
        tunneling: Started[int] | None = None
        try:
            if entry.dest["transport"] == "ssh" and entry.dest.get("tunnel") in ("relay", "forward" if copied.get(
                    "socket") else None):
                tun = stack.mirror.plan_tunnel(entry)
                save()  # the tunnel's log names it: a killed dmmig's is found by it
                tunneling = Started(partial(_timed, par, "tunnel", stack.mirror.start_tunnel, name,
                                            dict(entry.dest), dict(tun), copied.get("socket")))
            if tunneling is None or not copied.get("name"):
                exporting = Started(partial(_connect_export, stack, name, dest, par))
            # 1. what era recorded since the last round, into the logs. A write in flight now is
            # tagged below `first` and done once the swap's suspend is
            marked = layout.blank()  # for the summary: what both steps mark
            with sw("logs"):
                logs = stack.mirror.make_logs(entry, layout, 0, save)
            with sw("era query"):
                first_ranges, first = stack.era.dirty_ranges(era, entry.metadata, since,
                                                             Files(stack.journal.dir, name).dirty)
            with sw("logs"):
                images = layout.blank()
                try:  # streamed: a scattered delta of millions of blocks is never a list here
                    layout.mark(images, ((r.begin, r.end) for r in first_ranges), bs)
                    layout.mark(marked, ((r.begin, r.end) for r in first_ranges), bs)
                    shown = list(itertools.islice(first_ranges, SHOWN_RANGES + 1))
                finally:
                    first_ranges.close()
                for dev, img in zip(logs, images):
                    mirrorlog.write(dev, img.bytes())
            leg: str | None = None
            tried = False  # the copy's export, through the tunnel: a relay tunnel serves one connection only
            if exporting is None:
                assert tunneling is not None
                with sw("nbd leg"):
                    entry.mirror["tunnel"]["pid"] = tunneling.result()
                    save()
                    try:
                        tried = True
                        leg = stack.mirror.attach_nbd(entry, copied, opts.nbd_timeout, save)
                    except RemoteError as e:
                        log.info("the copy's export of %s did not answer (%s): asking the destination", name, e.message)
                if leg is None:
                    exporting = Started(partial(_connect_export, stack, name, dest, par))
            if leg is None:
                assert exporting is not None
                with sw("wait for the destination"):
                    export = exporting.result()
                    entry.dest.update(dest)  # plan_transport's decisions (a destination an older dmmig journaled)
                    entry.dest["export"] = export
                    save()
                with sw("nbd leg"):
                    if entry.dest["transport"] == "ssh":
                        pid = tunneling.result() if tunneling is not None else None
                        if pid is not None and (tried or export.get("socket") != copied.get("socket")):
                            stack.mirror.stop_tunnel(name, pid)  # used up, or forwards to where the export was
                            pid = None
                        if pid is None:
                            tun = stack.mirror.plan_tunnel(entry)
                            save()
                            pid = stack.mirror.start_tunnel(name, dict(entry.dest), dict(tun), export.get("socket"))
                        entry.mirror["tunnel"]["pid"] = pid
                        save()
                    leg = stack.mirror.attach_nbd(entry, export, opts.nbd_timeout, save)
            era_dev = block_device(f"/dev/mapper/{era}").devno
            leg_dev = block_device(leg).devno
            with sw("swap"):
                # one resume: the kernel suspends (drains: every write so far is done on leg 0),
                # swaps and resumes in that ioctl, and reads the logs at the resume
                pause = stack.dm.swap(top, mirror_table(layout, [block_device(d).devno for d in logs], era_dev,
                                                        leg_dev))
            t1 = time.monotonic()  # the kernel resyncs from here on, while the steps below run
            # 2. the mirror is live: every write from the swap on lands on both legs, or, in a
            # region out of sync, on leg 0 and is resynced. Left: what was written between the
            # query and the swap; era has it in eras >= first, done (the swap drained it). A
            # region the first swap's logs already had out of sync needs nothing more: the
            # kernel recovers it after that swap, so its copy reads those writes too
            with sw("era query (resyncing)"):
                second_ranges, now = stack.era.dirty_ranges(era, entry.metadata, first,
                                                            Files(stack.journal.dir, name).dirty)
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
        except BaseException:
            if exporting is not None:
                exporting.wait()  # nothing of theirs may come up after the teardown
            if tunneling is not None:
                tunneling.wait()
            _drop_mirror(stack, entry)
            stack.journal.save(entry, journal.COPIED)
            raise
        resync_regions = sum(i.out_of_sync() for i in marked)
        entry.mirror.update(era=now, pause_seconds=max(pauses), pauses=pauses, resync_regions=resync_regions,
                            resync_bytes=min(resync_regions * layout.region, length) * 512, regions=layout.regions,
                            region_bytes=layout.region * 512, parts=layout.parts,
                            resync_ranges=[[r.begin, r.end] for r in shown[:SHOWN_RANGES]],
                            resync_ranges_cut=len(shown) > SHOWN_RANGES)
        save()
        with sw("watcher (resyncing)"):
            stack.mirror.start_watcher(entry, save)
        with sw("resync"):
            events, kernel_out = _wait_sync(stack, top, layout.regions, opts.sync_timeout, progress, name)
        # from the first swap: the kernel's resync of the first delta began there
        entry.mirror["synced"] = {"at": time.time(), "events": events, "seconds": round(time.monotonic() - t1, 3),
                                  "kernel_out_of_sync_first_seen": kernel_out}
        # in sync: every write tagged below `now` is on both legs (see 2. above), and a
        # catch-up resends what era recorded from here. Not before the sync: a resync cut short
        # (dmmig killed, the leg failed) leaves regions of the last delta behind, so a rerun or
        # a catch-up must query from where this one did.
        entry.copy["next_since"] = now
        stack.journal.save(entry, journal.MIRRORING)
    return {"name": name, "suspended_seconds": entry.mirror["pause_seconds"], "pauses": entry.mirror["pauses"],
            "resync_regions": resync_regions, "regions": layout.regions, "seconds": sw.rounded(),
            "overlapped": par.rounded(),
            "region_bytes": layout.region * 512, "parts": layout.parts,
            "resync_bytes": entry.mirror["resync_bytes"], "resync_seconds": entry.mirror["synced"]["seconds"],
            "nbd": leg, "events_at_sync": events, "kernel_out_of_sync_first_seen": kernel_out}


SHOWN_RANGES = 256  # of the resync's block ranges, kept in the journal for status


def _connect_export(stack: Stack, name: str, dest: dict[str, Any], par: Stopwatch) -> dict[str, Any]:
    """The cutover's calls to the destination (in a thread): connect, start its agent, plan the
    transport into DEST (a copy: the caller journals it), start or find the export."""
    with par("connect"):
        remote = Remote(dest)
    try:
        with par("export"):
            plan_transport(stack, name, dest, remote)  # decided by copy; probed again only for a
            return _export(remote, dest, name)         # destination journaled by an older dmmig
    finally:
        remote.close()


def _timed(sw: Stopwatch, phase: str, fn: Callable[..., T], *args: Any) -> T:
    with sw(phase):
        return fn(*args)


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
                                                             era_dev, leg_dev))
    return pause  # the old log devices go at teardown with the rest: no losetup here


def _wait_sync(stack: Stack, top: str, nr: int, timeout: float, progress: Progress, name: str) -> tuple[int, int]:
    """Until every region is in sync and every leg is alive; the sync ratio alone is not
    enough (a failed recovery can still count). Returns the dm event counter then, and how
    many regions the kernel itself first reported out of sync (its view of our log)."""
    deadline = time.monotonic() + timeout
    first = stack.dm.mirror_status(top)
    progress.start("resync", first.regions - first.in_sync, unit="regions")
    done = 0
    while True:
        st = stack.dm.mirror_status(top)
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
        time.sleep(0.1)
    # the kernel raises one event when the last region is in sync: let it land first
    ev = stack.dm.info(top)
    assert ev is not None
    while True:
        time.sleep(0.2)
        again = stack.dm.info(top)
        assert again is not None
        if again.events == ev.events:
            break
        ev = again
    progress.end(in_sync=st.in_sync, regions=st.regions)
    return ev.events, first.regions - first.in_sync


def _drop_mirror(stack: Stack, entry: journal.Entry) -> None:
    """Back to linear over era (which holds every write), then tear down the leg, log,
    tunnel and watcher. A no-op when there is no mirror."""
    top = top_name(entry.name)
    info = stack.dm.info(top)
    steps = Steps()
    if info is not None and (info.has_inactive or info.suspended or isinstance(stack.dm.table(top).target, MIRRORS)):
        era_dev = block_device(f"/dev/mapper/{era_name(entry.name)}").devno
        back = Table(Linear(stack.dm.table(top).length, era_dev))
        if isinstance(stack.dm.table(top).target, MIRRORS) or info.has_inactive:
            steps(f"swap {top} back to linear over the era device", lambda: stack.dm.swap(top, back, noflush=True))
        else:
            steps(f"resume {top}", lambda: stack.dm.resume(top))
    steps.check(f"leaving the mirror of {entry.name}")  # never tear down a leg still in use
    if entry.mirror or stack.mirror.leftovers(entry.name):
        stack.mirror.teardown(entry.name, entry, steps)
        entry.mirror = {}
        stack.journal.save(entry)
    steps.check(f"leaving the mirror of {entry.name}")


# ---- handover gate (the source's side; see dmmig/gate.py) --------------------------------
def handover(stack: Stack, name: str, *, timeout: float = 300, cap: float = gate.SUSPEND_CAP_S) -> dict[str, Any]:
    """Wait for the destination's `add` to ask about NAME, then answer it (answer_gate)."""
    entry = mirroring_entry(stack, name)
    with stack.journal.lock(name):
        remote = Remote(entry.dest)
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
    if entry.phase != journal.MIRRORING or not entry.mirror.get("synced"):
        raise StateError(f"{name} is not mirroring (phase {entry.phase}): nothing to hand over",
                         hint=f"`dmmig cutover {name}` first")
    return entry


def answer_gate(stack: Stack, entry: journal.Entry, remote: Remote, *,
                cap: float = gate.SUSPEND_CAP_S) -> dict[str, Any]:
    """The destination asked about ENTRY (its lock is held): vouch for the disk. With the top
    device suspended (every write that was acknowledged is through the mirror), check that
    every region is in sync, every leg alive and no dm event came since the sync; otherwise
    first copy what era recorded since the cutover; a yes is sent while still suspended.
    The window is capped at CAP seconds (dmmig/window.py): past it the top resumes whatever
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
    entry.mirror["handover"] = {"at": time.time(), "ok": ok, "why": why, "caught_up_bytes": sent,
                                "seconds": round(seconds, 3), "cap_seconds": cap, "delivered": delivered}
    stack.journal.save(entry)
    return dict(entry.mirror["handover"])


def _vouch(stack: Stack, entry: journal.Entry, remote: Remote, top: str, era: str,
           win: Window) -> tuple[bool, str, int]:
    st = stack.dm.mirror_status(top)
    info = stack.dm.info(top)
    assert info is not None
    at_sync = entry.mirror["synced"]["events"]
    if st.synced and st.healthy and info.events == at_sync:
        return True, "every region in sync, every leg alive, no dm event since the sync", 0
    # the leg failed (or something happened) since the sync: era knows every block written since
    # the cutover, and with the top suspended that set is final
    broken = f"the mirror was not intact (health {st.health}, dm events {info.events}, {at_sync} at sync)"
    assert entry.metadata and entry.block_sectors
    ranges, _ = stack.era.dirty(era, entry.metadata, int(entry.copy["next_since"]))
    win.check("while era was queried")
    bs = entry.block_sectors * 512
    size = stack.dm.table(top).length * 512
    extents = [(r.begin * bs, min(r.end * bs, size) - r.begin * bs) for r in ranges if r.begin * bs < size]
    delta = sum(n for _, n in extents)
    rate = _copy_rate(entry)
    if rate and delta / rate > win.remaining():
        return False, (f"{broken}, and the {delta} bytes era recorded since the cutover would take ~"
                       f"{delta / rate:.0f}s at the {rate / (1 << 20):.1f} MiB/s the copy reached: more than the "
                       f"{win.remaining():.0f}s left of the {win.cap:.0f}s the guest's disk may stay suspended"), 0
    export = _export(remote, entry.dest, entry.name, deadline_s=max(win.remaining(), 0.1))
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
    return True, f"{broken}: copied the {c.read} bytes era recorded since the cutover first", c.read


def _copy_rate(entry: journal.Entry) -> float | None:
    """The best rate (bytes/s) a pass of the copy reached, from passes large enough to tell."""
    passes = [entry.copy.get("base") or {}] + list(entry.copy.get("rounds") or [])
    rates = [float(p["read"]) / float(p["seconds"]) for p in passes
             if isinstance(p, dict) and p.get("read", 0) >= (4 << 20) and p.get("seconds", 0) > 0]
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
        st = stack.dm.mirror_status(top)
        vouched = (entry.mirror.get("handover") or {}).get("ok")  # the gate already checked or caught up
        if not (st.synced and st.healthy) and not vouched:
            raise StateError(f"the mirror of {name} is not in sync with healthy legs "
                             f"({st.in_sync}/{st.regions}, health {st.health}): the destination misses writes",
                             hint=f"catch up with `dmmig copy {name}` + `dmmig cutover {name}`, or --force")
    if remove:
        info = stack.dm.info(top)
        if info is not None and info.open_count > 0:
            raise StateError(f"{top} is still open ({info.open_count} opener(s)); it cannot be removed",
                             hint="stop the domain on this host first, or finish without --remove")
    dest = dict(entry.dest) if entry.dest else None
    with stack.journal.lock(name):
        done = stack.abort_held(name, phase=journal.FINISHING)
        if remove and stack.dm.info(top) is not None:
            stack.dm.remove(top)
            done.append(f"remove {top}")
        if remove:
            stack.journal.delete(name)
    left = stop_remote(name, dest, remove_created=False, done=done) if remote else []
    return done, left


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
    if name is not None and stack.journal.load(name) is not None:
        top = top_name(name)
        deadline = time.monotonic() + close_wait_s
        while True:
            info = stack.dm.info(top)
            if info is None or info.open_count == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if info is not None and info.open_count > 0:
            raise StateError(f"{name} was handed over, but {top} is still open ({info.open_count} opener(s)) "
                             f"after {close_wait_s:.0f}s", hint=f"`dmmig finish --remove {name}` once it is closed")
        # force: the mirror's leg is gone (the destination stopped its export at the yes), and
        # the yes is the proof that the destination has every write
        done, _ = finish(stack, name, force=True, remove=True, remote=False)
    file = os.path.realpath(params)
    if node and os.path.isfile(file) and node in stack.loop.find(file):
        stack.loop.detach(node)
        done.append(f"detach {node} ({file})")
    elif node:
        done.append(f"left {node} alone: no longer a loop device over {file}")
    return done


# ---- verify -------------------------------------------------------------------------------
def verify(stack: Stack, name: str, *, chunk: int = 1 << 20, batch: int = 256 << 20, rechecks: int = 2,
           progress: Progress | None = None, offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Compare source and destination chunk by chunk by digests computed on each side, over
    [OFFSET, OFFSET+LENGTH) (default: the whole disk; a multi-TiB disk is read whole on both
    hosts, hours, so a range lets the operator check what matters, e.g. what the guest wrote).
    While mirroring, a chunk written during the pass can differ once; it is read again
    (RECHECKS times) before it counts as a mismatch."""
    entry = stack.entry_of(name)
    if not entry.dest:
        raise StateError(f"no destination known for {name}", hint=f"`dmmig copy {name} HOST` first")
    if chunk <= 0 or chunk % 4096:
        raise BadInput(f"--chunk must be a positive multiple of 4096, got {chunk}")
    disk = stack.dm.table(top_name(name)).length * 512
    if offset < 0 or offset % chunk or offset >= disk:
        raise BadInput(f"--offset {offset} must be a multiple of --chunk {chunk} below the disk's {disk} bytes")
    if length is not None and length <= 0:
        raise BadInput(f"--length must be positive, got {length}")
    size = disk if length is None else min(disk, offset + length)  # the end of the range
    src, dst = entry.origin, entry.dest["disk"]
    t0 = time.monotonic()
    remote = Remote(entry.dest)
    bad: list[int] = []
    try:
        if progress:
            progress.start("verify", size - offset)
        for off in range(offset, size, batch):
            n = min(batch, size - off)
            mine: list[str] = []
            # joined below in this iteration (or the loop is left): the loop variables hold
            th = threading.Thread(target=lambda: mine.extend(digest_ranges(src, off, n, chunk)))  # noqa: B023
            th.start()
            theirs = remote.agent.call("digest", name=name, path=dst, offset=off, length=n, chunk=chunk)["digests"]
            th.join()
            bad += [off // chunk + i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
            if progress:
                progress.advance(n)
        for _ in range(rechecks):
            if not bad:
                break
            time.sleep(0.5)
            still = []
            for i in bad:
                n = min(chunk, size - i * chunk)
                a = digest_ranges(src, i * chunk, n, chunk)
                b = remote.agent.call("digest", name=name, path=dst, offset=i * chunk, length=n,
                                      chunk=chunk)["digests"]
                if a != b:
                    still.append(i)
            bad = still
    finally:
        remote.close()
    ranges = merge([BlockRange(i, i + 1) for i in bad])
    res = {"name": name, "source": src, "destination": f"{entry.dest['host']}:{dst}", "bytes": size - offset,
           "offset": offset,
           "chunk": chunk, "seconds": round(time.monotonic() - t0, 3),
           "mismatches": [{"offset": r.begin * chunk, "length": min(r.end * chunk, size) - r.begin * chunk}
                          for r in ranges]}
    if progress:
        progress.end(mismatched_ranges=len(ranges))
    return res


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
    dest = dict(entry.dest) if entry and entry.dest else None
    done = stack.abort(name)
    left = stop_remote(name, dest, remove_created=True, done=done)
    e2 = stack.journal.load(name)
    if e2 is not None and (e2.dest or e2.copy):
        e2.dest = {}
        e2.copy = {}
        stack.journal.save(e2)
    return done, left


def _abort_incoming(stack: Stack, name: str, rec: dict[str, Any]) -> list[str]:
    """On the destination, whose source is gone: what the source's abort would have told this
    host's agent to do. A disk that was handed over is the guest's now: it stays."""
    keep = bool(rec.get("handed_over"))
    with stack.journal.lock(name):
        if "unreadable" in rec:
            os.unlink(Files(stack.journal.dir, name).incoming)
            return [f"removed the unreadable record of incoming {name}"]
        done: list[str] = AgentServer(stack.runner, stack.journal.dir).op_stop(name, remove_created=not keep)["done"]
    return done + [f"forgot incoming {name}" + (f" ({rec.get('path')} was handed over and stays)" if keep else "")]


def stop_remote(name: str, dest: dict[str, Any] | None, *, remove_created: bool, done: list[str]) -> list[str]:
    """Stop the destination's export; what could not be stopped is returned, exactly."""
    if not dest:
        return []
    try:
        remote = Remote(dest)
        try:
            reply = remote.agent.call("stop", name=name, remove_created=remove_created)
            done += [f"destination: {d}" for d in reply["done"]]
        finally:
            remote.close()
    except DmmigError as e:
        exp = dest.get("export") or {}
        there = Files(_remote_state(dest), name)  # the destination's files: same names, its state dir
        where = exp.get("socket") or f"{exp.get('addr')}:{exp.get('port')}"
        return [f"on {dest['host']}: the NBD export of {dest['disk']} (qemu-nbd pid {exp.get('pid')}, "
                f"{where}) could not be stopped: {e.message}. There, run: "
                f"kill {exp.get('pid')}; rm -rf {there.incoming} {there.qemu_nbd_pid} "
                f"{there.export_socket} {there.export_tls}"]
    return []


def _remote_state(dest: dict[str, Any]) -> str:
    return str(dest.get("remote_state") or dest.get("remote_state_dir") or journal.DEFAULT_STATE_DIR)
