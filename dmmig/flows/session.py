"""The source's session with the destination: its SSH connection and agent, the transport's
checks and choices (ssh tunnel or NBD with TLS), the destination's export, and stopping it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from dmmig import names
from dmmig.adapters import nbd, tlscreds, tunnel
from dmmig.adapters.agentclient import WARM_PROTOCOL, AgentClient
from dmmig.adapters.agentcmd import agent_argv
from dmmig.adapters.runner import Runner
from dmmig.adapters.ssh import (
    TRANSPORT_ERRORS,
    Endpoint,
    SSHClient,
    SshOptions,
    channel_socket,
    channel_stderr,
    close_quietly,
    connect,
    relay_socket,
)
from dmmig.core import journal, records
from dmmig.core.records import Destination
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, Busy, DmmigError, RemoteError, StateError
from dmmig.flows.started import Started
from dmmig.names import Files
from dmmig.progress import Stopwatch
from dmmig.validate import host_name, missing_tools, require_tools

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

    def __init__(self, dest: Destination, phases: Stopwatch | None = None) -> None:
        self.dest = dest
        self.ep = Endpoint(dest.host, dest.user, dest.port, dest.known_hosts, dest.identity)
        t = phases or Stopwatch()
        with t("ssh_connect"):
            self.ssh: SSHClient = connect(self.ep)
        try:
            with t("agent_start"):
                self.agent = AgentClient(self.ssh, dest.remote_dmmig, dest.remote_state_dir)
        except TRANSPORT_ERRORS as e:
            close_quietly(self.ssh)
            raise RemoteError(f"the SSH connection to {self.ep} broke starting the agent: "
                              f"{type(e).__name__} {e}".rstrip()) from e
        except BaseException:
            close_quietly(self.ssh)
            raise

    def nbd(self, export: nbd.Export, name: str) -> Any:
        """A libnbd handle on NAME's export: through the agent's relay (an exec channel: works
        with a key that allows no forwarding), or over TCP with this migration's TLS."""
        if self.dest.transport == "ssh":
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
        return nbd.open_client(None, addr=export.addr, port=export.port, export=name, tls=self.dest.tls)

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


def probe_tunnel(stack: Stack, dest: Destination, remote: Remote,
                  par: Stopwatch) -> Started[tuple[str, str]] | None:
    """The plan's tunnel probe (plan_transport), started in a thread: it waits mostly for the
    destination (OpenSSH's login, an agent's start there), while the checks go on here."""
    if dest.transport != "ssh" or dest.tunnel:
        return None

    def probe() -> tuple[str, str]:
        with par("tunnel_probe"):
            return remote.probe_tunnel(stack.runner, stack.journal.dir)
    return Started(probe)


def check_source(stack: Stack, transport: str, disks: list[str]) -> None:
    """Everything this host needs from prepare to cutover for DISKS (names), checked before
    anything changes, never found missing after the copy: every tool and dm target (the
    tunnel's ssh for --transport ssh), a free /dev/nbdX per disk for its mirror leg, and the
    root-only directories the cutover (the mirror's logs) and, over nbd, the copy (its TLS
    keys) write to, refused now as private_dir would refuse them then."""
    require_tools("dmsetup", "losetup", "era_invalidate", "nbd-client", *(["ssh"] if transport == "ssh" else []))
    stack.dm.require_targets("era", "mirror")
    check_nbd_devices(stack, disks)
    journal.check_private_dir(names.RUN_DIR)
    if transport == "nbd":
        for d in disks:
            journal.check_private_dir(Files(stack.journal.dir, d).mirror("tls"))


def check_nbd_devices(stack: Stack, disks: list[str]) -> None:
    """Every disk's cutover takes a /dev/nbdX here for its mirror leg, all of them at once: with
    fewer free, the last cutover would fail after every disk's copy. A disk's own leg from an
    earlier run counts (its cutover drops it first). Advisory: another migration may take
    devices meanwhile; the cutover's choice under the host-wide lock still refuses then."""
    nbd = stack.mirror.nbd
    free = nbd.free_count([stack.mirror.nbd_owner(d) for d in disks])
    if free < len(disks):
        n = len(disks)
        raise Busy(f"{n} disk{'s' if n > 1 else ''} need{'' if n > 1 else 's'} {n} free nbd device"
                   f"{'s' if n > 1 else ''} here for {'their' if n > 1 else 'its'} mirror leg, {free} "
                   f"{'is' if free == 1 else 'are'} free",
                   hint="wait for other migrations to finish, or load the nbd module with more devices "
                        "(nbds_max=N) while none is in use")


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


def destination(host: str, ssh_opts: SshOptions, opts: CopyOptions, disk: str) -> Destination:
    """The destination record Remote connects with (journaled as entry.dest). TUNNEL (ssh):
    the mirror leg's mode, chosen by the plan's probe; TLS (nbd): this migration's credentials
    here; INSECURE: the operator chose an NBD leg without TLS."""
    ep = Endpoint.parse(host, ssh_opts)
    check_transport(opts)
    return Destination(host=ep.host, user=ep.user, port=ep.port, known_hosts=ep.known_hosts,
                       identity=ep.identity, disk=disk, transport=opts.transport, nbd_address=opts.nbd_address,
                       remote_dmmig=opts.remote_dmmig, remote_state_dir=opts.remote_state_dir,
                       insecure=opts.insecure, tunnel=opts.tunnel or None)


def plan_transport(stack: Stack, name: str, dest: Destination, remote: Remote) -> None:
    """Decide, before any change there, how NBD reaches the destination; journaled in DEST.
    ssh: the tunnel's mode, by a real probe with OpenSSH unless already decided (a plan, a
    journaled destination, --tunnel); nbd: this migration's TLS credentials, unless --insecure."""
    if dest.transport == "ssh":
        if not dest.tunnel:
            dest.tunnel, why = remote.probe_tunnel(stack.runner, stack.journal.dir)
            dest.tunnel_probe = why or "streamlocal forwarding works"
    elif not dest.insecure and not dest.tls:
        dest.tls = stack.mirror.credentials(name, str(dest.nbd_address))


def start_export(remote: Remote, dest: Destination, name: str, deadline_s: float | None = None, *,
                 fresh: bool = False) -> nbd.Export:
    """Start (or find) NAME's export there, as DEST's transport wants it. FRESH: a new qemu-nbd
    whatever runs there, once the old one has exited (op_export): asked by whatever writes to
    the destination after a connection this host gave up on (a copy, a cutover after a mirror,
    the gate's catch-up), so that nothing still on its way over that connection lands after it."""
    if fresh and not remote.agent.hello.get("fresh_export"):
        raise BadInput(f"the destination's dmmig {remote.agent.hello.get('version', '?')} cannot restart an export "
                       "before writes that must come after every earlier one",
                       hint="install the same dmmig version on both hosts")
    return _export(name, _start_export(remote, dest, name, deadline_s, {"fresh": True} if fresh else {}))


def _export(name: str, reply: dict[str, Any]) -> nbd.Export:
    exp = records.export_of(reply.get("export"), f"the destination agent's export of {name}")
    if exp is None:
        raise RemoteError(f"the destination's agent started no export of {name}: {reply!r:.200}")
    return exp


def _start_export(remote: Remote, dest: Destination, name: str, deadline_s: float | None,
                  fresh: dict[str, bool]) -> dict[str, Any]:
    if dest.transport == "ssh":
        return dict(remote.agent.call("export", name=name, deadline_s=deadline_s, **fresh))
    if dest.tls:
        try:
            files = tlscreds.server_files(dest.tls)
        except OSError as e:
            raise StateError(f"the TLS credentials of {name} are gone ({e})",
                             hint=f"`dmmig copy {name}` makes new ones") from e
        return dict(remote.agent.call("export", name=name, addr=dest.nbd_address, tls=files,
                                      deadline_s=deadline_s, **fresh))
    if not dest.insecure:
        raise StateError(f"{name}: no TLS credentials for --transport nbd (journaled by an older dmmig?)",
                         hint=f"`dmmig copy {name}` makes them, or `dmmig abort {name}`")
    return dict(remote.agent.call("export", name=name, addr=dest.nbd_address, insecure=True,
                                  deadline_s=deadline_s, **fresh))


def destination_of(entry: journal.Entry, host: str | None, ssh_opts: SshOptions,
                   opts: CopyOptions) -> Destination:
    if host is None:
        if not entry.dest:
            raise BadInput(f"no destination known for {entry.name}: give [USER@]HOST")
        return entry.dest.copy()
    dest = destination(host, ssh_opts, opts, opts.dest_disk or entry.target)
    old = entry.dest
    if old and (old.host, old.disk) != (dest.host, dest.disk):
        raise StateError(f"{entry.name} is already being copied to {old.host}:{old.disk}",
                         hint=f"`dmmig abort {entry.name}` to start over with another destination")
    keep_probe(old, dest)
    return dest


def keep_probe(old: Destination | None, dest: Destination) -> None:
    """DEST (from the command line) takes the tunnel mode the plan's probe found for OLD (the
    journaled destination) if OpenSSH would log in and run the agent there the same way: the
    probe is asked again only when that changed. An earlier --tunnel is no probe result."""
    if (old and not dest.tunnel and old.tunnel and old.tunnel_probe
            and all(getattr(old, k) == getattr(dest, k) for k in PROBED_WITH)):
        dest.tunnel, dest.tunnel_probe = old.tunnel, old.tunnel_probe


# what the tunnel probe's answer depends on (OpenSSH's login there, the agent it runs)
PROBED_WITH = ("transport", "user", "port", "known_hosts", "identity", "remote_dmmig", "remote_state_dir")


def stop_remote(name: str, dest: Destination | None, *, remove_created: bool, done: list[str],
                warm: dict[str, Any] | None = None) -> list[str]:
    """Stop the destination's export; what could not be stopped is returned, exactly. WARM
    (finish): the generation the destination records as it stops (dmmig/flows/warm.py), if
    its agent knows generations."""
    if not dest:
        return []
    try:
        remote = Remote(dest)
        try:
            kw: dict[str, Any] = {}
            if warm is not None:
                if remote.agent.hello.get("warm") == WARM_PROTOCOL:
                    kw = {"warm": warm}
                else:
                    done.append("destination: its dmmig records no generations (an older version): a copy back "
                                "will be a full one")
            reply = remote.agent.call("stop", name=name, remove_created=remove_created, **kw)
            done += [f"destination: {d}" for d in reply["done"]]
        finally:
            remote.close()
    except DmmigError as e:
        exp = dest.export
        there = Files(_remote_state(dest), name)  # the destination's files: same names, its state dir
        where = (exp.socket or f"{exp.addr}:{exp.port}") if exp else "None:None"
        pid = exp.pid if exp else None
        return [f"on {dest.host}: the NBD export of {dest.disk} (qemu-nbd pid {pid}, "
                f"{where}) could not be stopped: {e.message}. There, run: "
                f"kill {pid}; rm -rf {there.incoming} {there.qemu_nbd_pid} "
                f"{there.export_socket} {there.export_tls}"]
    return []


def _remote_state(dest: Destination) -> str:
    return dest.remote_state or dest.remote_state_dir or journal.DEFAULT_STATE_DIR
