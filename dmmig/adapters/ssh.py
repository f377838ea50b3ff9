"""SSH adapter (paramiko): strict host-key checking, the agent channel, the copier's NBD channel.

Never auto-adds a host key: an unknown or changed key is refused with the fingerprint. Every
channel is an exec of `dmmig agent` on the destination (the agent protocol, or its raw relay to
the export's unix socket), never a port forward: an authorized_keys entry with `restrict` and
`command="dmmig agent ..."` allows exactly that.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

# paramiko's ssh_config parser imports invoke, only to run the commands of a `Match exec`: dmmig
# never has paramiko read an ssh_config. Marked missing, the import fails at once and paramiko
# goes on without it (it raises only if a config asks for `Match exec`): 0.25 s of every
# dmmig start in the rig, 75 ms here.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
import paramiko  # noqa: E402
import paramiko.packet  # noqa: E402

from dmmig.adapters.agentcmd import remote_command  # noqa: E402 - after paramiko, as the comment says
from dmmig.errors import BadInput, RemoteError  # noqa: E402
from dmmig.validate import destination, host_name, ssh_path, user_name  # noqa: E402

SSHClient = paramiko.SSHClient  # for type hints elsewhere: only this module imports paramiko


def _send_messages_as_bytes() -> None:
    """paramiko before 3.0 (Debian 12 has 2.12) turns every packet it sends into bytes with
    common.asbytes, which first tries py3compat.b: for a Message, b raises a TypeError whose text
    formats repr(message), the whole packet escaped, and asbytes catches it and asks the Message.
    That repr was 60% of the CPU of a bulk send: the --transport ssh copy's data ran at 71 MiB/s
    on a real kernel, 258 MiB/s without it (paramiko 5.1: 235). A Message now goes straight to
    its bytes, as asbytes' fallback does; anything else goes through paramiko's own asbytes."""
    if tuple(paramiko.__version_info__[:2]) >= (3, 0):  # py3compat is gone: asbytes is cheap
        return
    stock = paramiko.packet.asbytes

    def asbytes(s: object) -> bytes:
        if isinstance(s, paramiko.Message):
            return bytes(s.asbytes())
        return bytes(stock(s))
    paramiko.packet.asbytes = asbytes


_send_messages_as_bytes()

CONNECT_TIMEOUT = 15.0
# what paramiko raises when the connection died under a call: EOFError from its packetizer's
# write, OSError from the socket, SSHException from a transport that closed mid-request
TRANSPORT_ERRORS = (OSError, EOFError, paramiko.SSHException)


@dataclass(frozen=True)
class SshOptions:
    """How to reach the destination's sshd, from the command line (--port, --known-hosts,
    --identity); the user and host come from USER@HOST."""
    port: int = 22
    known_hosts: str | None = None
    identity: str | None = None


@dataclass(frozen=True)
class Endpoint:
    host: str
    user: str = "root"
    port: int = 22
    known_hosts: str = "~/.ssh/known_hosts"
    identity: str | None = None

    def __post_init__(self) -> None:
        # also for a destination read back from the journal: nothing reaches a command line
        # (OpenSSH's, xl's) unchecked
        host_name(self.host)
        user_name(self.user)
        if not 1 <= self.port <= 65535:
            raise BadInput(f"invalid SSH port {self.port}")
        ssh_path("--known-hosts", self.known_hosts)
        if self.identity is not None:
            ssh_path("--identity", self.identity)

    @classmethod
    def parse(cls, spec: str, opts: SshOptions = SshOptions()) -> Endpoint:
        user, host = destination(spec)
        return cls(host, user or "root", opts.port, opts.known_hosts or "~/.ssh/known_hosts", opts.identity)

    @property
    def spec(self) -> str:
        """USER@HOST as OpenSSH and `xl migrate` take it (an IPv6 address without brackets)."""
        return f"{self.user}@{self.host}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def connect(ep: Endpoint) -> paramiko.SSHClient:
    kh = os.path.expanduser(ep.known_hosts)
    c = paramiko.SSHClient()
    try:
        c.load_host_keys(kh)
    except FileNotFoundError:
        raise BadInput(f"known_hosts file {kh} does not exist",
                       hint=f"add the destination's host key: ssh-keyscan -p {ep.port} {ep.host} (and check "
                            "its fingerprint out of band), or pass --known-hosts FILE") from None
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        c.connect(ep.host, port=ep.port, username=ep.user,
                  key_filename=os.path.expanduser(ep.identity) if ep.identity else None,
                  timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                  allow_agent=ep.identity is None, look_for_keys=ep.identity is None)
    except paramiko.BadHostKeyException as e:
        raise RemoteError(f"host key of {ep.host} has CHANGED (got {e.key.get_name()} "
                          f"{e.key.fingerprint}); refusing to connect",
                          hint=f"if the change is legitimate, fix {kh}; otherwise this may be an attack") from e
    except paramiko.SSHException as e:
        if "not found in known_hosts" in str(e):
            raise RemoteError(f"host key of {ep.host} is unknown (not in {kh}); refusing to connect",
                              hint=f"verify and add it: ssh-keyscan -p {ep.port} {ep.host} >> {kh}") from e
        if isinstance(e, paramiko.AuthenticationException):
            raise RemoteError(f"authentication as {ep.user} on {ep.host} failed: {e}",
                              hint="check --identity and the destination's authorized_keys") from e
        raise RemoteError(f"SSH to {ep} failed: {e}") from e
    except TimeoutError:
        raise RemoteError(f"{ep.host}:{ep.port} did not answer within {CONNECT_TIMEOUT:.0f}s",
                          hint="is the host up and reachable? is sshd running?") from None
    except OSError as e:
        raise RemoteError(f"cannot reach {ep.host}:{ep.port}: {e.strerror or e}",
                          hint="check the host name, the network and that sshd runs") from e
    t = c.get_transport()
    assert t is not None
    t.set_keepalive(5)
    return c


def relay_socket(client: paramiko.SSHClient, argv: list[str]) -> tuple[socket.socket, paramiko.Channel]:
    """A local socket connected, through an exec channel running ARGV (the agent's relay mode),
    to the export's unix socket on the destination. Gives libnbd a real file descriptor
    (connect_socket). Returns the channel too: its stderr says why a relay refused."""
    t = client.get_transport()
    assert t is not None
    try:
        chan = t.open_session(timeout=CONNECT_TIMEOUT)
        chan.exec_command(remote_command(argv))
    except paramiko.ChannelException as e:
        raise RemoteError(f"the destination refused a channel for the NBD relay: {e}") from e
    except TRANSPORT_ERRORS as e:
        raise RemoteError(f"the SSH connection to the destination broke starting the NBD relay: "
                          f"{type(e).__name__} {e}".rstrip()) from e
    return channel_socket(chan), chan


def channel_socket(chan: paramiko.Channel, first: bytes = b"") -> socket.socket:
    """A local socket whose peer is CHAN (both ways, until either closes); FIRST: bytes already
    received from CHAN, which the socket gives first."""
    ours, theirs = socket.socketpair()
    if first:
        theirs.sendall(first)  # a few bytes (NBD's greeting): the socket buffer holds them
    threading.Thread(target=pump_to_channel, args=(theirs, chan), daemon=True).start()
    threading.Thread(target=_pump_back, args=(chan, theirs), daemon=True).start()
    return ours


def channel_stderr(chan: paramiko.Channel, limit: int = 2000) -> str:
    """What the remote command wrote to stderr so far (without waiting)."""
    out = b""
    try:
        while chan.recv_stderr_ready() and len(out) < limit:
            out += chan.recv_stderr(limit)
    except TRANSPORT_ERRORS:
        pass
    return out.decode(errors="replace").strip()


class _Closable(Protocol):
    def close(self) -> None: ...


def close_quietly(c: _Closable) -> None:
    """Close, ignoring a connection that already died: closing a channel sends a message, and
    paramiko raises EOFError writing to a dead transport. Whatever failed first is the error
    that matters; this must not replace it."""
    try:
        c.close()
    except TRANSPORT_ERRORS:
        pass


def pump_to_channel(sock: socket.socket, chan: paramiko.Channel) -> None:
    """SOCK to CHAN until either closes, through one reused buffer, a packet's worth at a time.
    Not chan.sendall: it re-slices its bytes after each packet (32 KiB), copying the rest every
    time, quadratic in what one recv returns. That is ~200 KiB with the default socket buffer
    (net.core.wmem_default), but 1 MiB on a host tuned for fast links: 16 MiB copied per MiB
    sent, 20% slower (bench/copy_relay.py)."""
    buf = bytearray(1 << 20)
    try:
        with memoryview(buf) as whole:
            while n := sock.recv_into(buf):
                view = whole[:n]
                while view:
                    sent = chan.send(view)
                    if not sent:
                        return  # the channel is closing: finally closes it
                    view = view[sent:]
    except TRANSPORT_ERRORS:  # the transport died: the NBD client sees the close
        pass
    finally:
        close_quietly(chan)


def _pump_back(chan: paramiko.Channel, sock: socket.socket) -> None:
    try:
        while data := chan.recv(1 << 20):
            sock.sendall(data)
    except TRANSPORT_ERRORS:
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
