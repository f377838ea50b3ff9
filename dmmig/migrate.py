"""The migration flow, top to bottom: copy (base + era rounds), abort of both sides.

Each phase journals its intent and progress, so a killed dmmig resumes (`copy` again) or
cleans up (`abort`) from what the journal and the kernel say.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import paramiko

from dmmig import journal as J
from dmmig import nbd as N
from dmmig.agent import AgentClient
from dmmig.copy import Copier, Counters
from dmmig.errors import BadInput, DmmigError, RemoteError, StateError
from dmmig.progress import Progress
from dmmig.ssh import Endpoint, connect, forward_socket
from dmmig.stack import Stack, era_name

log = logging.getLogger("dmmig.migrate")


@dataclass
class CopyOptions:
    dest_disk: str | None = None
    create: bool = False
    transport: str = "ssh"            # or "nbd"
    nbd_address: str | None = None
    remote_dmmig: str = "dmmig"
    remote_state_dir: str | None = None
    converge: int = 64 << 20          # stop when a round's delta is below this
    max_rounds: int = 10
    bwlimit: float | None = None


class Remote:
    """One SSH connection to the destination: the agent, and NBD through it or direct."""

    def __init__(self, dest: dict[str, Any]) -> None:
        self.dest = dest
        self.ep = Endpoint(dest["host"], dest["user"], dest["port"], dest["known_hosts"], dest.get("identity"))
        self.ssh: paramiko.SSHClient = connect(self.ep)
        self.agent = AgentClient(self.ssh, dest["remote_dmmig"], dest.get("remote_state_dir"))

    def nbd(self, export: dict[str, Any], name: str) -> Any:
        if self.dest["transport"] == "ssh":
            return N.open_client(forward_socket(self.ssh, export["addr"], export["port"]), export=name)
        return N.open_client(None, addr=export["addr"], port=export["port"], export=name)

    def close(self) -> None:
        try:
            self.agent.close()
        finally:
            self.ssh.close()


def copy(stack: Stack, name: str, host: str | None, ep_opts: dict[str, Any], opts: CopyOptions,
         progress: Progress) -> dict[str, Any]:
    entry = stack._prepared(name)  # refuses an unknown or unprepared NAME before anything else
    if opts.transport not in ("ssh", "nbd"):
        raise BadInput(f"unknown transport {opts.transport!r}: use ssh or nbd")
    if opts.transport == "nbd" and not opts.nbd_address:
        raise BadInput("--transport nbd needs --nbd-address ADDR (the destination's address on the "
                       "migration network)")
    with stack.journal.lock(name):
        dest = _destination(entry, host, ep_opts, opts)
        remote = Remote(dest)  # unknown host key, bad credentials, unreachable: refused here
        try:
            size = stack.dm.table(f"dmmig-{name}").length * 512
            disk = remote.agent.call("prepare_disk", name=name, path=dest["disk"], size=size,
                                     create=opts.create)
            addr = "127.0.0.1" if opts.transport == "ssh" else str(opts.nbd_address)
            export = remote.agent.call("export", name=name, addr=addr)["export"]
            dest["export"] = export
            if "zeroed" not in entry.copy:
                entry.copy["zeroed"] = bool(disk["zeroed"])
            entry.dest = dest
            stack.journal.save(entry, J.COPYING)
            h = remote.nbd(export, name)
            summary = _copy_rounds(stack, name, entry, h, size, opts, progress)
            h.shutdown()
            stack.journal.save(entry, J.COPIED)
            return summary
        finally:
            remote.close()


def _destination(entry: J.Entry, host: str | None, ep_opts: dict[str, Any], opts: CopyOptions) -> dict[str, Any]:
    if host is None:
        if not entry.dest:
            raise BadInput(f"no destination known for {entry.name}: give [USER@]HOST")
        return dict(entry.dest)
    ep = Endpoint.parse(host, **ep_opts)
    dest = {"host": ep.host, "user": ep.user, "port": ep.port, "known_hosts": ep.known_hosts,
            "identity": ep.identity, "disk": opts.dest_disk or entry.origin, "transport": opts.transport,
            "nbd_address": opts.nbd_address, "remote_dmmig": opts.remote_dmmig,
            "remote_state_dir": opts.remote_state_dir}
    old = entry.dest
    if old and (old["host"], old["disk"]) != (dest["host"], dest["disk"]):
        raise StateError(f"{entry.name} is already being copied to {old['host']}:{old['disk']}",
                         hint=f"`dmmig abort {entry.name}` to start over with another destination")
    return dest


def _copy_rounds(stack: Stack, name: str, entry: J.Entry, h: Any, size: int, opts: CopyOptions,
                 progress: Progress) -> dict[str, Any]:
    st = entry.copy
    era = era_name(name)
    assert entry.metadata and entry.block_sectors
    bs = entry.block_sectors * 512
    total = Counters()
    st.setdefault("rounds", [])
    copier = Copier(entry.origin, h, dest_zero=bool(st["zeroed"]), bwlimit=opts.bwlimit,
                    on_progress=progress.advance)

    if not st.get("base_done"):
        if "base_era" not in st:
            # writes from here on carry era >= base_era; one era back covers those in flight
            st["base_era"] = stack.era.checkpoint(era)
            st["base_offset"] = 0
            stack.journal.save(entry)
        start = int(st["base_offset"])
        progress.start("base", size - start)

        def ck(pos: int) -> None:
            st["base_offset"] = pos
            stack.journal.save(entry)

        c = copier.copy([(start, size - start)], checkpoint=ck)
        total.add(c)
        st.update(base_done=True, base_offset=size, next_since=st["base_era"] - 1,
                  base={"from": start, **c.as_dict()})
        stack.journal.save(entry)
        progress.end(**c.as_dict())

    prev: int | None = None
    rounds_now = 0
    while True:
        ranges, now = stack.era.dirty(era, entry.metadata, int(st["next_since"]))
        dirty = sum(r.count for r in ranges) * bs
        progress.start(f"round {len(st['rounds']) + 1}", dirty)
        c = copier.copy([(r.begin * bs, min(r.end * bs, size) - r.begin * bs) for r in ranges])
        total.add(c)
        rounds_now += 1
        rnd = {"since": st["next_since"], "dirty_bytes": dirty, **c.as_dict()}
        st["rounds"].append(rnd)
        st["next_since"] = now - 1   # the snapshot held eras < now; one back for writes in flight
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


def abort(stack: Stack, name: str) -> tuple[list[str], list[str]]:
    """Abort locally (always possible), then stop the destination's export. Returns (done,
    left behind on the destination)."""
    entry = stack.journal.load(name)
    dest = dict(entry.dest) if entry and entry.dest else None
    done = stack.abort(name)
    left: list[str] = []
    if dest:
        try:
            remote = Remote(dest)
            try:
                done += [f"destination: {d}" for d in remote.agent.call("stop", name=name, remove_created=True)["done"]]
            finally:
                remote.close()
        except DmmigError as e:
            exp = dest.get("export") or {}
            left.append(f"on {dest['host']}: the NBD export of {dest['disk']} (qemu-nbd pid {exp.get('pid')}, "
                        f"{exp.get('addr')}:{exp.get('port')}) could not be stopped: {e.message}. There, run: "
                        f"kill {exp.get('pid')}; rm {dest.get('remote_state_dir') or J.DEFAULT_STATE_DIR}/{name}.dest.json")
        e2 = stack.journal.load(name)
        if e2 is not None:
            e2.dest = {}
            e2.copy = {}
            stack.journal.save(e2)
    return done, left
