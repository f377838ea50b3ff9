"""Issue 13, items 9-12 without a kernel: destination validation, the argv dmmig gives OpenSSH
(read back by OpenSSH itself, `ssh -G`), the forced command's parser, the agent's unix-socket
export and its relay (a real qemu-nbd, spoken to with libnbd), per-migration TLS (a real
qemu-nbd with verify-peer, clients with and without the credentials), root-only directories,
and records written by the previous dmmig."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dmmig.adapters import nbd, tlscreds, tunnel
from dmmig.adapters.agentcmd import agent_argv
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.nbd import Export, free_port, open_client, stop_export
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.ssh import Endpoint
from dmmig.core import journal
from dmmig.core.confine import Policy
from dmmig.core.records import Destination, MirrorState
from dmmig.core.stack import Stack
from dmmig.entry.agent import parse_forced
from dmmig.errors import BadInput, Exit, StateError
from dmmig.flows import finish, session
from dmmig.flows.destination import AgentServer
from dmmig.flows.status import disk_status, render
from dmmig.names import export_dir
from dmmig.validate import destination
from tests.unit.fakes import NOT_THERE, FakeRunner

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
# this interpreter's dmmig: the venv's under ./install.sh test, Debian's python3 in a package build
DMMIG = [sys.executable, "-m", "dmmig"]
needs_qemu_nbd = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd (qemu-utils)")


# ---- item 11: [USER@]HOST ---------------------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    ("b", (None, "b")), ("root@b", ("root", "b")), ("root@192.168.200.2", ("root", "192.168.200.2")),
    ("host-1.example.com.", (None, "host-1.example.com.")), ("first.last@h", ("first.last", "h")),
    ("fe80::1", (None, "fe80::1")), ("root@[2001:db8::2]", ("root", "2001:db8::2")),
    ("root@fe80::1%eth0", ("root", "fe80::1%eth0")), ("_svc@h", ("_svc", "h")),
])
def test_destinations_dmmig_accepts(spec: str, want: tuple[str | None, str]) -> None:
    assert destination(spec) == want


@pytest.mark.parametrize("spec", [
    "-oProxyCommand=touch /tmp/pwned", "-oProxyCommand=touch /tmp/pwned@b", "-oProxyCommand=reboot",
    "-oProxyCommand=reboot@b", "root@-oProxyCommand=reboot", "-b", "root@-b", "h;id", "h$(id)", "h`id`",
    "user$@h", "a b", "a\tb", "h\n", "@h", "root@", "", "999.1.1.1", "1.2.3", "h_x", "[::1", "[h]",
    "fe80::1%eth0;id", "r'oot@h", "x" * 64 + ".example", "root@h@h", "root@[::1]@x",
])
def test_destinations_dmmig_refuses(spec: str) -> None:
    with pytest.raises(BadInput, match="invalid destination") as e:
        Endpoint.parse(spec)
    assert e.value.exit_code == Exit.BAD_INPUT


def test_a_journaled_destination_is_checked_again() -> None:
    """The journal is root's, but nothing reaches a command line unchecked."""
    with pytest.raises(BadInput):
        Endpoint("-oProxyCommand=reboot", "root")
    with pytest.raises(BadInput):
        Endpoint("b", "-oProxyCommand=reboot")
    with pytest.raises(BadInput, match="whitespace"):
        Endpoint("b", "root", known_hosts="/x y")


DEST = Destination(host="b", user="root", port=22, known_hosts="/run/ssh/known_hosts", identity="/run/ssh/id",
                   remote_dmmig="/usr/local/bin/dmmig", remote_state_dir=None, disk="/dev/vg/d1")


def every_ssh_argv(dest: Destination, tmp: str) -> list[list[str]]:
    return [tunnel.forward_argv(dest, f"{tmp}/log", f"{tmp}/l.sock", "/run/dmmig/adapters/nbd/d1.sock", "hold", "d1"),
            tunnel.relay_argv(dest, f"{tmp}/log", "d1")]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's client")
def test_openssh_reads_a_hostile_destination_as_a_destination_never_as_an_option(tmp_path: Path) -> None:
    """Even a destination that slipped past validation (built here by hand) reaches OpenSSH after
    `--`: `ssh -G` (OpenSSH's own parser, no connection) shows no ProxyCommand."""
    hostile = replace(DEST, user="-oProxyCommand=touch /tmp/pwned")
    for argv in every_ssh_argv(hostile, str(tmp_path)):
        assert argv[0] == "ssh" and "--" in argv and argv[argv.index("--") + 1] == "-oProxyCommand=touch /tmp/pwned@b"
        r = subprocess.run(["ssh", "-G", *argv[1:]], capture_output=True, text=True)
        assert "proxycommand touch" not in r.stdout.lower(), r.stdout


def test_no_pty_and_no_bare_forward_in_any_ssh_argv(tmp_path: Path) -> None:
    """Item 12: never -t/-tt (a destination may refuse a pty), never -N (Nagle: 46 ms per
    write), escape character off (binary data), the strict options kept."""
    for argv in every_ssh_argv(DEST, str(tmp_path)):
        opts = argv[:argv.index("--")]
        assert "-T" in opts and not {"-t", "-tt", "-N"} & set(opts), argv
        assert opts[opts.index("-e") + 1] == "none"
        for o in ("BatchMode=yes", "StrictHostKeyChecking=yes", "ServerAliveInterval=5",
                  "UserKnownHostsFile=/run/ssh/known_hosts", "IdentitiesOnly=yes"):
            assert o in opts, (o, argv)
        assert opts[1:3] == ["-F", "none"]
        # the remote command is one quoted string: exactly what a forced command gets to parse
        assert parse_forced(argv[-1], "/run/dmmig")[0] in ("hold", "relay")
    fwd = every_ssh_argv(DEST, str(tmp_path))[0]
    for o in ("ExitOnForwardFailure=yes", "StreamLocalBindMask=0177", "StreamLocalBindUnlink=yes"):
        assert o in fwd
    assert fwd[fwd.index("-L") + 1] == f"{tmp_path}/l.sock:/run/dmmig/adapters/nbd/d1.sock"


# ---- item 10: the forced command ---------------------------------------------------------------
@pytest.mark.parametrize("original,want", [
    ("dmmig agent", (None, None)),
    ("/usr/local/bin/dmmig agent", (None, None)),
    ("'/opt/dm mig/dmmig' --state-dir /var/lib/dmmig agent relay vm1-disk", ("relay", "vm1-disk")),
    ("dmmig agent hold d1", ("hold", "d1")),
    ("dmmig agent probe 0123456789abcdef", ("probe", "0123456789abcdef")),
])
def test_a_forced_agent_runs_what_dmmig_itself_asks_for(original: str, want: tuple) -> None:
    assert parse_forced(original, "/var/lib/dmmig") == want
    # and exactly what the source sends
    argv = agent_argv(replace(DEST, remote_state_dir="/var/lib/dmmig"), *[w for w in want if w])
    from dmmig.adapters.agentcmd import remote_command
    assert parse_forced(remote_command(argv), "/var/lib/dmmig") == want


@pytest.mark.parametrize("original", [
    "id", "sh -c 'touch /tmp/x'", "", "dmmig", "dmmig hotplug add", "dmmig agent relay ../../etc/shadow",
    "dmmig agent relay", "dmmig agent relay d1 extra", "dmmig agent ; id", "dmmig agent $(id)",
    "dmmig --state-dir /tmp agent", "dmmig --debug agent", "dmmig agent probe nothex", "dmmig agent 'unclosed",
    "notdmmig agent", "dmmig agent exec id", "dmmig --state-dir", "dmmig agent relay -x",
])
def test_a_forced_agent_refuses_anything_else(original: str) -> None:
    with pytest.raises(BadInput, match="refused"):
        parse_forced(original, "/var/lib/dmmig")


def run_agent(env: dict[str, str], *args: str, inp: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DMMIG, *args], input=inp, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_the_forced_command_end_to_end(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    for original in ("id", "sh -c 'touch /tmp/x'", "dmmig --state-dir /tmp agent"):
        r = run_agent({"SSH_ORIGINAL_COMMAND": original}, "--state-dir", state, "agent", "--forced-command")
        assert r.returncode == 3 and "refused" in r.stderr and r.stdout == "", r
    env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
    r = subprocess.run([*DMMIG, "--state-dir", state, "agent", "--forced-command"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 3 and "interactive login" in r.stderr, r  # no command: a shell request
    r = run_agent({"SSH_ORIGINAL_COMMAND": f"dmmig --state-dir {state} agent"}, "--state-dir", state, "agent",
                  "--forced-command", inp=json.dumps({"op": "hello"}) + "\n")
    hello, reply = (json.loads(x) for x in r.stdout.splitlines())
    assert hello["agent"] == "dmmig" and hello["state_dir"] == state and reply["ok"], r


# ---- item 9: the export on a root-only unix socket, and the relay ---------------------------------
def agent_with_disk(tmp_path: Path, size: int = 4 * MIB) -> tuple[AgentServer, str, str]:
    state = str(tmp_path / "state")
    agent = AgentServer(SubprocessRunner(), state, policy=Policy(file_roots=(str(tmp_path),)),   # qemu-nbd for real
                        xenstore=lambda: contextlib.nullcontext(None))
    path = str(tmp_path / "disk.img")
    agent.op_prepare_disk("d1", path, size, create=True)
    return agent, state, path


@needs_qemu_nbd
def test_the_ssh_export_is_a_unix_socket_only_root_reaches_and_the_relay_carries_nbd(tmp_path: Path) -> None:
    import nbd
    agent, state, path = agent_with_disk(tmp_path)
    os.chmod(state, 0o755)
    os.makedirs(export_dir(state), mode=0o755)   # made too open by someone: repaired
    exp = Export(**agent.op_export("d1")["export"])
    try:
        assert exp.socket == os.path.join(export_dir(state), "d1.sock") and exp.addr is None and exp.port is None
        assert stat.S_IMODE(os.stat(export_dir(state)).st_mode) == 0o700
        assert not [c for c in psutil_tcp_listeners() if c == exp.pid], "qemu-nbd listens on TCP"
        with open(path, "r+b") as f:
            f.write(b"hello through the relay".ljust(4096, b"\0"))
        h = nbd.NBD()
        h.set_export_name("d1")
        h.connect_command([*DMMIG, "--state-dir", state, "agent", "relay", "d1"])  # its stdin/stdout
        assert h.pread(23, 0) == b"hello through the relay"
        h.pwrite(b"x" * 4096, 4096)
        h.flush()
        h.shutdown()
        with open(path, "rb") as f:
            assert f.read(8192)[4096:] == b"x" * 4096
        # a relay for a disk without an export says why, and exits non-zero
        r = subprocess.run([*DMMIG, "--state-dir", state, "agent", "relay", "d2"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 3 and "no NBD export of d2" in r.stderr, r
    finally:
        stop_export(exp)
    assert not os.path.exists(exp.socket)


class ProcChannel:
    """What AgentClient and the copier's pumps use of a paramiko channel, over a local process's
    stdin and stdout (the agent, as sshd would run it)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.timeout: float | None = None
        self.p: subprocess.Popen[bytes] | None = None

    def exec_command(self, cmd: str) -> None:
        self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def settimeout(self, t: float | None) -> None:
        self.timeout = t

    def recv(self, n: int) -> bytes:
        assert self.p and self.p.stdout
        import select
        if not select.select([self.p.stdout], [], [], self.timeout)[0]:
            raise TimeoutError()
        return os.read(self.p.stdout.fileno(), n)

    def sendall(self, data: bytes) -> None:
        assert self.p and self.p.stdin
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def send(self, data: bytes | memoryview) -> int:
        """As paramiko's: one packet's worth (32 KiB) at most."""
        n = min(len(data), 32 << 10)
        self.sendall(bytes(data[:n]))
        return n

    def close(self) -> None:
        if self.p and self.p.stdin and not self.p.stdin.closed:
            self.p.stdin.close()


class ProcClient:
    def __init__(self, argv: list[str]) -> None:
        self.chan = ProcChannel(argv)

    def get_transport(self) -> ProcClient:
        return self

    def open_session(self) -> ProcChannel:
        return self.chan


@needs_qemu_nbd
def test_the_agents_own_session_becomes_the_copiers_relay(tmp_path: Path) -> None:
    """The copy's NBD goes through the agent session that prepared the export (op relay): no
    second agent starts there. What the agent's reply and the export's first bytes (NBD's
    greeting) share of one read must reach libnbd; a refused relay leaves the session an agent."""
    from dmmig.adapters.agentclient import AgentClient
    from dmmig.adapters.ssh import channel_socket
    agent, state, path = agent_with_disk(tmp_path)
    exp = Export(**agent.op_export("d1")["export"])
    try:
        with open(path, "r+b") as f:
            f.write(b"hello through the agent".ljust(4096, b"\0"))
        client = ProcClient([*DMMIG, "--state-dir", state, "agent"])
        c = AgentClient(client, "dmmig")
        with pytest.raises(BadInput, match="no NBD export of d2"):
            c.call("relay", name="d2")
        assert c.call("export", name="d1")["export"]["pid"] == exp.pid   # still an agent, the same export
        c.call("relay", name="d1")
        chan, rest = c.detach()
        h = open_client(channel_socket(chan, rest), export="d1")
        assert h.pread(23, 0) == b"hello through the agent"
        h.pwrite(b"y" * 4096, 8192)
        h.flush()
        h.shutdown()
        with open(path, "rb") as f:
            assert f.read(3 * 4096)[8192:] == b"y" * 4096
        with pytest.raises(Exception, match="unusable"):
            c.call("export", name="d1")
        assert client.chan.p is not None and client.chan.p.wait(timeout=30) == 0   # the relay ended with NBD
    finally:
        stop_export(exp)


def test_the_agents_line_reader_gives_back_what_it_read_past_a_request() -> None:
    from dmmig.flows.destination import Lines
    r, w = os.pipe()
    os.write(w, b'{"op": "relay", "name": "d1"}\nNBD bytes')
    os.close(w)
    lines = Lines(r)
    assert next(lines) == '{"op": "relay", "name": "d1"}' and lines.rest() == b"NBD bytes"
    assert list(lines) == []
    os.close(r)


def psutil_tcp_listeners() -> list[int]:
    """Pids owning a listening TCP socket (from /proc, as the kernel tests do)."""
    inodes = set()
    for fam in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{fam}").readlines()[1:]
        except OSError:
            continue
        inodes |= {ln.split()[9] for ln in lines if ln.split()[3] == "0A"}
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_private_dir_repairs_its_mode_and_refuses_what_others_control(tmp_path: Path) -> None:
    d = tmp_path / "state" / "nbd"
    journal.private_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o777)
    journal.private_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.rmdir()
    d.symlink_to(tmp_path)   # someone's symlink in its place
    with pytest.raises(StateError, match="not a directory"):
        journal.private_dir(str(d))
    d.unlink()
    (tmp_path / "state").chmod(0o777)   # a parent others may write: our dir could be swapped
    with pytest.raises(StateError, match="writable by others"):
        journal.private_dir(str(d))
    (tmp_path / "state").chmod(0o1777)  # sticky (/run, /tmp): nobody else may rename ours
    assert journal.private_dir(str(d)) == str(d)


def test_the_relay_listener_hands_its_one_connection_to_the_command(tmp_path: Path) -> None:
    """Item 12's relay on the source: the accepted connection becomes stdin+stdout of the
    exec'd command (here `cat`, in place of ssh): no Python left between them."""
    sock = str(tmp_path / "r.sock")
    p = subprocess.Popen([sys.executable, "-m", "dmmig.adapters.tunnel", "accept", sock, "--", "cat"])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            # exec'd, not relayed: within 5 s (a fixed 0.2 s failed on a loaded machine, and in a package build)
            deadline = time.monotonic() + 5
            while open(f"/proc/{p.pid}/cmdline").read().split("\0")[0] != "cat" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert open(f"/proc/{p.pid}/cmdline").read().split("\0")[0] == "cat"
            s.sendall(b"nbd request")
            assert s.recv(100) == b"nbd request"
            assert not os.path.exists(sock), "a second client could connect"
    finally:
        p.kill()
        p.wait()


# ---- item 9, --transport nbd: TLS ------------------------------------------------------------------
def test_per_migration_certificates(tmp_path: Path) -> None:
    from cryptography import x509
    d = str(tmp_path / "tls")
    os.makedirs(d, mode=0o700)
    tlscreds.make(d, "192.0.2.7")
    assert tlscreds.exists(d)
    assert all(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600 for f in os.listdir(d))
    ca = x509.load_pem_x509_certificate(open(os.path.join(d, "ca-cert.pem"), "rb").read())
    srv = x509.load_pem_x509_certificate(open(os.path.join(d, "server-cert.pem"), "rb").read())
    cli = x509.load_pem_x509_certificate(open(os.path.join(d, "client-cert.pem"), "rb").read())
    from cryptography.hazmat.primitives.asymmetric import ec
    for c in (srv, cli):   # signed by the CA (cryptography 38 has no verify_directly_issued_by)
        ca.public_key().verify(c.signature, c.tbs_certificate_bytes, ec.ECDSA(c.signature_hash_algorithm))
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    files = tlscreds.server_files(d)
    assert set(files) == {"ca-cert.pem", "server-cert.pem", "server-key.pem"}  # never the client's key
    with pytest.raises(BadInput):
        tlscreds.write_server(str(tmp_path / "x"), {**files, "../evil": "-----BEGIN x"})


@needs_qemu_nbd
def test_a_client_without_this_migrations_credentials_neither_connects_nor_reads(tmp_path: Path) -> None:
    import nbd
    agent, state, path = agent_with_disk(tmp_path)
    src = str(tmp_path / "src.tls")
    os.makedirs(src, mode=0o700)
    tlscreds.make(src, "127.0.0.1")
    other = str(tmp_path / "other.tls")   # another migration's: another CA
    os.makedirs(other, mode=0o700)
    tlscreds.make(other, "127.0.0.1")
    with pytest.raises(BadInput, match="needs TLS"):
        agent.op_export("d1", addr="127.0.0.1")
    exp = Export(**agent.op_export("d1", addr="127.0.0.1", tls=tlscreds.server_files(src))["export"])
    try:
        assert exp.tls and os.listdir(exp.tls) and stat.S_IMODE(os.stat(exp.tls).st_mode) == 0o700
        only_ca = str(tmp_path / "only_ca")
        os.makedirs(only_ca)
        shutil.copy(os.path.join(src, "ca-cert.pem"), only_ca)
        mixed = str(tmp_path / "mixed")   # the right CA, another CA's client certificate
        os.makedirs(mixed)
        shutil.copy(os.path.join(src, "ca-cert.pem"), mixed)
        for f in ("client-cert.pem", "client-key.pem"):
            shutil.copy(os.path.join(other, f), mixed)
        for what, tls in (("plain", None), ("CA only", only_ca), ("another CA's client", mixed)):
            h = nbd.NBD()
            h.set_export_name("d1")
            if tls:
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_certificates(tls)
            with pytest.raises(nbd.Error):
                h.connect_tcp("127.0.0.1", str(exp.port))
                h.pread(4096, 0)
                pytest.fail(f"{what}: read the disk")
        h = open_client(None, addr="127.0.0.1", port=exp.port, export="d1", tls=src)
        assert h.pread(4096, 0) == b"\0" * 4096
        h.shutdown()
        # the client also checks the server: another migration's client refuses this server
        with pytest.raises(Exception, match="cannot connect"):
            open_client(None, addr="127.0.0.1", port=exp.port, export="d1", tls=other)
    finally:
        done = agent.op_stop("d1", remove_created=True)["done"]
    assert "removed the TLS credentials of d1" not in done   # stop_export already removed them with qemu-nbd
    assert not os.path.exists(exp.tls) and os.listdir(export_dir(state)) == []


# ---- records of the previous dmmig ------------------------------------------------------------------
@needs_qemu_nbd
def test_an_export_journaled_by_the_previous_dmmig_as_addr_and_port_is_shown_and_aborted(tmp_path: Path) -> None:
    """An in-flight migration whose destination record is {"addr", "port"} (a TCP export on
    127.0.0.1, as the old dmmig made): `status` shows it, `abort` there stops it."""
    agent, state, path = agent_with_disk(tmp_path)
    pidf = os.path.join(state, "d1.qemu-nbd.pid")
    port = free_port("127.0.0.1")
    subprocess.run(["qemu-nbd", "--fork", f"--pid-file={pidf}", "--persistent", "--format=raw",
                    "--bind=127.0.0.1", f"--port={port}", "--export-name=d1", path], check=True)
    pid = int(open(pidf).read())
    rec_path = os.path.join(state, "d1.dest.json")
    rec = json.load(open(rec_path))
    rec["export"] = {"name": "d1", "path": path, "addr": "127.0.0.1", "port": port, "pid": pid, "cache": "none"}
    json.dump(rec, open(rec_path, "w"))
    runner = FakeRunner([(["dmsetup", "info"], NOT_THERE)])
    stack = Stack(runner, DmSetup(runner), journal.Journal(state))
    try:
        text = render(disk_status(stack, "d1"))
        assert f"NBD export on 127.0.0.1:{port} (no TLS), qemu-nbd pid {pid} (running)" in text, text
        done, left = finish.abort(stack, "d1")
        assert left == [] and f"stopped qemu-nbd {pid} exporting {path}" in done, done
        assert not Export(**rec["export"]).alive()
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)


def test_the_source_explains_what_is_left_of_an_old_or_a_new_export_there() -> None:
    exp = Export(name="d1", path="/dev/vg/d1", pid=42, cache="none")
    old = replace(DEST, disk="/dev/vg/d1", export=replace(exp, addr="127.0.0.1", port=10809))
    new = replace(DEST, disk="/dev/vg/d1", export=replace(exp, socket="/run/dmmig/adapters/nbd/d1.sock"))
    for dest, where in ((old, "127.0.0.1:10809"), (new, "/run/dmmig/adapters/nbd/d1.sock")):
        left = session.stop_remote("d1", replace(dest, host="192.0.2.99", known_hosts="/nonexistent"),
                                   remove_created=True, done=[])
        assert len(left) == 1 and where in left[0] and "kill 42" in left[0] and "nbd/d1.tls" in left[0], left


def test_abort_finds_the_tunnel_an_older_dmmig_journaled_and_a_killed_probes_files(tmp_path: Path) -> None:
    """The source's side: a mirror journaled by the previous dmmig has tunnel {sock, pid} (an
    `ssh -tt -L SOCK:127.0.0.1:PORT` daemon, found by its socket); teardown stops it. A probe
    whose dmmig was killed left files; they go too."""
    from dmmig.core.mirror import MirrorSide
    from dmmig.errors import Steps
    state = str(tmp_path)
    sock = os.path.join(state, "d1.nbd.sock")
    # a stand-in with the old tunnel's command line (no network): what teardown looks for
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-L", f"{sock}:127.0.0.1:10809"])
    deadline = time.monotonic() + 10  # until it has exec'd: before, its command line is pytest's
    while sock not in Path(f"/proc/{old.pid}/cmdline").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    stale = [os.path.join(state, f"probe-{'0' * 16}.{x}") for x in ("log", "sock")]
    for f in stale:
        open(f, "w").close()
        os.utime(f, (time.time() - 60, time.time() - 60))
    entry = journal.Entry("d1", "/dev/loop1", "7:1", phase=journal.MIRRORING,
                          mirror=MirrorState.from_json({"tunnel": {"sock": sock, "pid": old.pid}}, "test"))
    steps = Steps()
    try:
        side = MirrorSide(FakeRunner([]), state)
        assert side.leftovers("d1")
        side.teardown("d1", entry, steps)
        assert old.wait(10) is not None
    finally:
        old.kill()
    assert steps.errors == [] and any(f"stop the SSH tunnel (pid {old.pid})" in d for d in steps.done), steps.done
    assert not any(os.path.exists(f) for f in stale)


def test_the_relay_listener_path_appears_only_once_it_listens(tmp_path: Path) -> None:
    """tunnel.start returns when the socket's path exists and nbd-client connects next: a
    listener that is bound but not yet listening refuses it (seen as ECONNREFUSED in this suite
    and in a package build under load). Here listen() is slowed down to make that window wide."""
    sock = str(tmp_path / "r.sock")
    code = ("import socket, sys, time\n"
            "class Slow(socket.socket):\n"
            "    def listen(self, *a):\n"
            "        time.sleep(1)\n"
            "        super().listen(*a)\n"
            "socket.socket = Slow\n"
            "from dmmig.adapters import tunnel\n"
            "sys.exit(tunnel.accept_exec(sys.argv[1], ['cat'], timeout=30))\n")
    p = subprocess.Popen([sys.executable, "-c", code, sock])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.005)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)  # the moment the path exists
            s.sendall(b"nbd request")
            assert s.recv(100) == b"nbd request"
        assert os.listdir(tmp_path) == [], "the listener left a file behind"
    finally:
        p.kill()
        p.wait()


def test_answers_tells_a_listener_from_a_closed_port_within_its_deadline() -> None:
    # asked before nbd-client connects to the copy's export: nbd-client's own connect has no deadline
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert nbd.answers("127.0.0.1", port, 5)
    t = time.monotonic()
    assert not nbd.answers("127.0.0.1", port, 5)  # closed now: refused at once
    assert time.monotonic() - t < 5
