"""The source's side of mirroring: the NBD leg (tunnel + kernel client), the pre-written
dirty log, the leg watcher; set up by cutover, torn down by finish/abort/catch-up. Also the
migration's TLS credentials (--transport nbd), which outlive a catch-up and go at finish/abort.

Each resource is journaled (entry.mirror) before or right after it exists, and teardown
also finds what a killed dmmig did not get to journal (by file name or command line), so
a crash at any point is cleaned up by `abort`.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from dmmig.adapters import nbd, proc, tlscreds, tunnel
from dmmig.adapters.blockdev import Loop, LoopError
from dmmig.adapters.nbdkernel import NbdKernel, owner_of
from dmmig.adapters.runner import Runner
from dmmig.core import journal, mirrorlog
from dmmig.core.records import Destination, MirrorState, Tunnel
from dmmig.core.watch import health_path
from dmmig.errors import RemoteError, Steps
from dmmig.names import RUN_DIR, Files


class MirrorSide:
    def __init__(self, runner: Runner, state: str) -> None:
        self.r = runner
        self.state = state
        self.nbd = NbdKernel(runner)
        self.loop = Loop(runner)

    def _path(self, name: str, what: str) -> str:
        return Files(self.state, name).mirror(what)

    def watcher_marker(self, name: str) -> str:
        # the trailing space: a command line read from /proc ends each word with one (proc.find),
        # so NAME's marker is not a prefix of NAME10's watcher, another migration's
        return f"--state-dir {self.state} watch {name} "

    def nbd_owner(self, name: str) -> str:
        return owner_of(self.state, name)

    # ---- set up -------------------------------------------------------------------------
    def credentials(self, name: str, server: str) -> str:
        """This migration's TLS credentials (made once, kept until finish/abort): a root-only
        directory; SERVER is the destination's NBD address its certificate names."""
        d = journal.private_dir(self._path(name, "tls"))
        if not tlscreds.exists(d):
            tlscreds.make(d, server)
        return d

    def plan_tunnel(self, entry: journal.Entry) -> Tunnel:
        """--transport ssh: the tunnel's record in ENTRY.mirror (no pid yet), for the caller to
        journal before start_tunnel: a tunnel of a killed dmmig is found by its log's name."""
        t = Tunnel(sock=self._path(entry.name, "nbd.sock"), mode=entry.destination().tunnel,
                   log=self._path(entry.name, "tunnel.log"))
        entry.mirror.tunnel = t
        return t

    def start_tunnel(self, name: str, dest: Destination, t: Tunnel, remote_sock: str | None) -> int:
        """The tunnel T (plan_tunnel) up, listening: its pid. Journals nothing (it may run in a
        thread beside steps that journal); the caller journals the pid. REMOTE_SOCK: the
        export's socket there (forward mode; ssh connects to it only once nbd-client does)."""
        assert t.mode and t.log
        return tunnel.start(self.r, t.mode, dest, name, t.sock, remote_sock, t.log)

    def stop_tunnel(self, name: str, pid: int) -> None:
        tunnel.stop(pid, self._path(name, "tunnel.log"), self._path(name, "nbd.sock"))

    def attach_nbd(self, entry: journal.Entry, export: nbd.Export, timeout: int, save: Callable[[], None]) -> str:
        """The kernel's NBD client on EXPORT: through the tunnel (--transport ssh, started
        first), or over TCP; the device is journaled before it connects."""
        m = entry.mirror
        dest = entry.destination()
        ssh = dest.transport == "ssh"

        def claimed(dev: str) -> None:  # journaled before it connects: abort finds it whatever happens
            m.nbd = dev
            save()
        # One NBD connection, never nbd-client -C N: with several, the kernel (nbd_xmit_timeout)
        # answers a write that outlives --nbd-timeout by sending it again on another connection,
        # not by failing it. dm-mirror then never learns of the failure, while the first copy may
        # still reach the destination later, over a newer write to the same block: a stale block
        # there under a mirror that reports itself in sync (docs/design.md, Leg failures).
        tun = m.tunnel
        assert tun is not None or not ssh, "plan_tunnel first"
        where: dict[str, Any] = ({"unix": tun.sock} if tun is not None and ssh
                                 else {"host": export.addr, "port": int(export.port or 0), "tls": dest.tls})
        try:
            return self.nbd.attach_free(self.nbd_owner(entry.name), export.name, timeout=timeout,
                                        on_claim=claimed, **where)
        except RemoteError as e:
            if not ssh:
                raise
            raise RemoteError(f"{e.message}; the SSH tunnel ({tun.mode if tun else None}) logged: "
                              f"{tunnel.tail(tun.log) if tun and tun.log else ''}", hint=e.hint) from e

    def make_logs(self, entry: journal.Entry, layout: mirrorlog.Layout, first_slot: int,
                  save: Callable[[], None]) -> list[str]:
        """A disk log device per part of LAYOUT: loop devices over slots FIRST_SLOT.. of one
        file in /run (names.RUN_DIR: memory, whatever the state directory is; it lives only as
        long as the source's mirror does). Journaled before they exist: teardown finds every
        loop over the file."""
        journal.private_dir(RUN_DIR)
        path = Files(self.state, entry.name).mirror_log
        entry.mirror.log_file = path
        save()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            end = (first_slot + layout.parts) * layout.slot
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
        finally:
            os.close(fd)
        # through the loop driver's ioctls (blockdev.Loop.attach_slices): a losetup process
        # each was ~0.1 s in the rig, and the swaps wait for all of them
        slots = [((first_slot + i) * layout.slot, layout.slot) for i in range(layout.parts)]
        try:
            devs = self.loop.attach_slices(path, slots)
        except LoopError as e:
            entry.mirror.log_devs.extend(e.made)  # journaled: teardown finds them anyway
            save()
            raise
        entry.mirror.log_devs.extend(devs)
        save()
        return devs

    def start_watcher(self, entry: journal.Entry, save: Callable[[], None]) -> int:
        """Start the leg watcher before the swap that makes the mirror: its Python start then
        falls in the cutover's set-up, not on the resync. It waits for its stdin to end before
        its first look. Returns the pipe's write end: the caller closes it once the mirror is in
        (or this process's exit does, however it exits); a watcher that then finds no mirror
        exits."""
        # its own lean entry, with the words of `dmmig watch`: the marker
        argv = [sys.executable, "-m", "dmmig.entry.watch", "--state-dir", self.state, "watch", entry.name,
                "--after-stdin"]
        pid, gate = self.r.spawn_piped(argv, logfile=self._path(entry.name, "watch.log"))
        try:
            # its start takes only CPU the set-up leaves idle (waiting for the destination):
            # in a rig kernel the era queries and the swap share one CPU with it. It takes the
            # normal priority back at its first look (watch.watch)
            proc.yield_cpu(pid)
            entry.mirror.watcher = pid
            save()
        except BaseException:
            os.close(gate)
            raise
        return gate

    def tunnel_log(self, name: str) -> str:
        return tunnel.tail(self._path(name, "tunnel.log"))

    def has_tunnel_log(self, name: str) -> bool:
        return os.path.exists(self._path(name, "tunnel.log"))

    def _tunnel_markers(self, name: str) -> tuple[str, ...]:
        # the log (-E) names a tunnel of this dmmig in either mode; the socket (-L) one that an
        # older dmmig journaled; the TLS directory nbd-client's proxy daemon
        return self._path(name, "tunnel.log"), self._path(name, "nbd.sock"), self._path(name, "tls") + "/"

    def _log_files(self, name: str) -> tuple[str, ...]:
        # where this dmmig keeps the logs, and where an earlier one did (the state directory)
        return Files(self.state, name).mirror_log, self._path(name, "mirror-log")

    def leftovers(self, name: str) -> bool:
        """Anything of a mirror that a killed dmmig did not journal."""
        return bool(any(os.path.exists(p) for p in self._log_files(name)) or self.nbd.owned(self.nbd_owner(name))
                    or proc.find(self.watcher_marker(name), *self._tunnel_markers(name)))  # one scan of /proc

    # ---- tear down ----------------------------------------------------------------------
    def teardown(self, name: str, entry: journal.Entry | None, step: Steps) -> None:
        """Everything but the top table, which the caller has already moved off the mirror.
        Every step is attempted; STEP collects the errors."""
        m = entry.mirror if entry else MirrorState()
        marker = self.watcher_marker(name)
        for pid in set(proc.find(marker)) | ({m.watcher} if m.watcher else set()):
            if proc.alive(pid, marker):
                step(f"stop the leg watcher (pid {pid})", partial(proc.stop, pid, marker))
        # only a device whose marker still names this disk: one the journal names but that another
        # cutover took since (this one was killed before it attached) is that cutover's leg now
        owner = self.nbd_owner(name)
        for dev in sorted(set(self.nbd.owned(owner)) | ({m.nbd} if m.nbd else set())):
            step(f"detach {dev} if still {name}'s (nbd-client -d)", partial(self.nbd.release, dev, owner))
        sock = self._path(name, "nbd.sock")
        tpid = m.tunnel.pid if m.tunnel else None
        for marker in self._tunnel_markers(name):
            for pid in set(proc.find(marker)) | ({tpid} if tpid else set()):
                if proc.alive(pid, marker):
                    what = "nbd-client's TLS proxy" if marker.endswith("/") else "the SSH tunnel"
                    step(f"stop {what} (pid {pid})", partial(tunnel.stop, pid, marker, sock))
        if os.path.lexists(sock):
            step(f"remove {sock}", partial(os.unlink, sock))
        for log_file in {m.log_file or Files(self.state, name).mirror_log, *self._log_files(name)}:
            if os.path.exists(log_file):
                for ldev in self.loop.find(log_file):
                    step(f"detach {ldev} (mirror log)", partial(self.loop.detach, ldev))
                step(f"remove {log_file}", partial(os.unlink, log_file))
        for what in ("tunnel.log", "watch.log"):
            p = self._path(name, what)
            if os.path.exists(p):
                step(f"remove {p}", partial(os.unlink, p))
        hp = health_path(self.state, name)
        if os.path.exists(hp):
            step(f"remove {hp}", lambda: os.unlink(hp))
        if os.path.isdir(self.state) and any(f.startswith("probe-") for f in os.listdir(self.state)):
            step("remove what a killed dmmig's tunnel probe left", partial(tunnel.sweep_probes, self.state))

    def remove_credentials(self, name: str, step: Steps) -> None:
        """The migration is over (finish, abort): its TLS keys go."""
        d = self._path(name, "tls")
        if os.path.lexists(d):
            step(f"remove the TLS credentials {d}", partial(tlscreds.remove, d))
