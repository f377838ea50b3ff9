"""Issue 13, items 9-12 on two kernels: who can reach the disk in flight, what reaches OpenSSH's
command line, and hardened destinations (no pty, no forwarding, a forced command).

The oracle is the writer's record read back on the destination and digests of whole devices;
"who can connect" is asked of the kernel (/proc/net/tcp*, the sockets' owners) and tried for
real as an unprivileged user with libnbd, never taken from dmmig's own view."""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import pytest

from tests.kernel.steps import (
    DMMIG,
    ask,
    check,
    copy_args,
    digest,
    migrate_to_mirror,
    start_writer,
    status,
    stop_writer,
    wait_leg_failed,
)
from tests.rig.output import summary
from tests.rig.pair import B_IP, SSH_OPTS, sshd_config
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
MiB = 1 << 20

# Every TCP listener of the host, with the command lines of the processes holding its socket
LISTENERS = r"""
import json, os
socks = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                socks.setdefault(link[8:-1], set()).add(cmd.strip())
    except OSError:
        pass
out = []
for fam in ("tcp", "tcp6"):
    if not os.path.exists(f"/proc/net/{fam}"):   # a kernel without IPv6
        continue
    for line in open(f"/proc/net/{fam}").readlines()[1:]:
        f = line.split()
        if f[3] != "0A":   # LISTEN
            continue
        port = int(f[1].rsplit(":", 1)[1], 16)
        out.append({"family": fam, "port": port, "inode": f[9], "procs": sorted(socks.get(f[9], []))})
print(json.dumps(out))
"""

# Run as uid 65534 with Debian's python3 (python3-libnbd): try to read the disk through every
# TCP port given and every unix socket path given. Prints what worked.
NOBODY_READS = r"""
import json, sys
import nbd
name, ports, paths = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
got = []
def attempt(what, connect):
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        connect(h)
        h.pread(4096, 0)
        got.append(what)
    except nbd.Error as e:
        pass
    del h
for fam, port in ports:
    host = "::1" if fam == "tcp6" else "127.0.0.1"
    attempt(f"tcp {host}:{port}", lambda h: h.connect_tcp(host, str(port)))
    attempt(f"tcp {sys.argv[4]}:{port}", lambda h: h.connect_tcp(sys.argv[4], str(port)))
for p in paths:
    attempt(f"unix {p}", lambda h: h.connect_unix(p))
print(json.dumps(got))
"""


def exposure(b: UmlHost, name: str) -> list[str]:
    """How the disk being migrated into B can be reached by anyone but root: qemu-nbd's TCP
    listeners, and what an unprivileged local user (uid 65534) managed to read."""
    listeners = json.loads(b.py(LISTENERS).out)
    found = [f"qemu-nbd listens on {x['family']} port {x['port']}" for x in listeners
             if any("qemu-nbd" in p for p in x["procs"])]
    # every unix socket under the state dir, and every socket any qemu-nbd holds open
    paths = b.sh("find /run/dmmig -type s 2>/dev/null; true").out.split()
    ports = [[x["family"], x["port"]] for x in listeners]
    r = b.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
               NOBODY_READS, name, json.dumps(ports), json.dumps(paths), B_IP], check=False)
    assert r.rc == 0, r.err
    found += [f"uid 65534 read the disk through {w}" for w in json.loads(r.out)]
    return found


def test_the_export_is_never_on_tcp_and_no_local_user_reaches_it(pair, pdisks, name: str) -> None:
    """Item 9: while copying and while mirroring, only root reaches the disk on the destination."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(48, fill_seed=31), db(48)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    job = a.spawn([DMMIG, *copy_args(name, dest, "--bwlimit", "2M")])   # ~24 s of base copy
    try:
        for _ in range(200):
            st = status(a, name)["journal"]
            if st["phase"] == "copying" and st["copy"].get("base_offset", 0) > 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the copy never started: {job.wait(60)}")
        during_copy = exposure(b, name)
        assert not status(a, name)["journal"]["copy"].get("base_done"), "the copy ended before the check"
    finally:
        r = job.wait(300)
    assert r.rc == 0, r.err
    assert during_copy == [], f"during the copy: {during_copy}"
    a.dmmig("cutover", name)
    assert status(a, name)["journal"]["phase"] == "mirroring"
    during_mirror = exposure(b, name)
    assert during_mirror == [], f"while mirroring: {during_mirror}"
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("finish", name)
    a.dmmig("unwrap", name)


@pytest.mark.parametrize("spec", [
    "-oProxyCommand=touch /tmp/pwned-{name}",
    "-oProxyCommand=touch /tmp/pwned-{name}@" + B_IP,
    "-oProxyCommand=reboot",
    "-oProxyCommand=reboot@" + B_IP,
])
def test_a_destination_that_is_an_option_is_refused_before_anything_runs(pair, pdisks, name: str,
                                                                          spec: str) -> None:
    """Item 11: [USER@]HOST never reaches paramiko, OpenSSH or xl as anything but a plain
    destination: refused (exit 3) before any connection, and no ProxyCommand ever runs."""
    a, b = pair
    da, _ = pdisks
    a.dmmig("wrap", name, da(8))
    a.dmmig("prepare", name)
    spec = spec.format(name=name)
    try:
        # argparse takes a word with a space as a positional, one without as an (unknown) option:
        # `--` makes it the destination of `copy`; for `migrate`, `--` starts xl's options
        runs = [(["copy", "--remote-dmmig", DMMIG, *SSH_OPTS, name, "--", spec], 3)]
        runs.append((["migrate", "vm1", spec, "--remote-dmmig", DMMIG, *SSH_OPTS], 3 if " " in spec else 2))
        for argv, code in runs:
            t = time.monotonic()
            r = a.dmmig(*argv, check=False, timeout=120)
            assert r.rc == code and ("invalid destination" in r.err or code == 2), (argv, r.rc, r.err)
            assert time.monotonic() - t < 30, "refused only after trying to connect"
            for h in (a, b):
                assert h.sh("ls /tmp/pwned-* 2>/dev/null; true").out == "", "the ProxyCommand ran"
        assert status(a, name)["journal"]["dest"] == {}, "a refused destination was journaled"
    finally:
        a.dmmig("abort", name)
        a.dmmig("unwrap", name)


# ---- hardened destinations -------------------------------------------------------------------
@contextlib.contextmanager
def extra_key(a: UmlHost, b: UmlHost, options: str, tag: str) -> Iterator[str]:
    """A key of a's own that b accepts with authorized_keys OPTIONS; yields its path."""
    key = f"/run/ssh/id_{tag}"
    a.sh(f"rm -f {key} {key}.pub && ssh-keygen -q -t ed25519 -N '' -f {key}")
    pub = a.run(["cat", f"{key}.pub"]).out.strip()
    saved = b.run(["cat", "/run/ssh/authorized_keys"]).out
    b.run(["sh", "-c", "cat >> /run/ssh/authorized_keys"], input=f"{options} {pub}\n".encode())
    try:
        yield key
    finally:
        b.run(["sh", "-c", "cat > /run/ssh/authorized_keys"], input=saved.encode())
        a.run(["rm", "-f", key, f"{key}.pub"])


@contextlib.contextmanager
def second_sshd(a: UmlHost, b: UmlHost, port: int, extra: str) -> Iterator[str]:
    """Another sshd on b (port PORT) with EXTRA config lines; yields a known_hosts file on a."""
    conf = sshd_config(B_IP).replace(f"ListenAddress {B_IP}", f"ListenAddress {B_IP}:{port}")
    conf = conf.replace("PidFile /run/sshd.pid", f"PidFile /run/sshd-{port}.pid") + extra
    b.run(["sh", "-c", f"cat > /run/ssh/sshd_config_{port}"], input=conf.encode())
    b.run(["/usr/sbin/sshd", "-f", f"/run/ssh/sshd_config_{port}"])
    hostkey = b.run(["cat", "/run/ssh/host_ed25519.pub"]).out.split()
    kh = f"/run/ssh/known_hosts_{port}"
    a.run(["sh", "-c", f"cat > {kh}"], input=f"[{B_IP}]:{port} {hostkey[0]} {hostkey[1]}\n".encode())
    try:
        yield kh
    finally:
        b.sh(f"kill $(cat /run/sshd-{port}.pid); rm -f /run/ssh/sshd_config_{port}")
        # its sessions (children of the listener) end with their connections
        for _ in range(50):
            if b.run(["pgrep", "-f", f"sshd_config_{port}"], check=False).rc != 0:
                break
            time.sleep(0.2)
        a.run(["rm", "-f", kh])


def opts_for(args: list[str], *, identity: str | None = None, known_hosts: str | None = None,
             port: int | None = None) -> list[str]:
    args = list(args)
    if identity:
        args[args.index("/run/ssh/id_ed25519")] = identity
    if known_hosts:
        args[args.index("/run/ssh/known_hosts")] = known_hosts
    if port:
        args += ["--port", str(port)]
    return args


def migrate_under_writer(a: UmlHost, b: UmlHost, name: str, origin: str, dest: str, seed: int,
                         ssh: dict, *, handover: bool = False) -> dict:
    """copy -> cutover with a writer running across it -> (handover) -> verify, oracle on b -> finish."""
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w = start_writer(a, top, rec, seed=seed, rate="500", blocks="0:2048")
    try:
        a.dmmig(*opts_for(copy_args(name, dest, "--converge", "1M", "--max-rounds", "4"), **ssh))
        r = a.dmmig("cutover", name, "--json", "--nbd-timeout", "5", check=False)
        assert r.rc == 0, f"cutover failed: {r.err}"
        st = status(a, name)
        assert st["journal"]["phase"] == "mirroring" and st["devices"][f"dmmig-{name}"]["mirror"]["healthy"], st
        time.sleep(2)   # the writer goes on, through the mirror
    finally:
        stop_writer(a, w)
    if handover:   # the destination's block script asks, as its `add` does under xl migrate
        job = a.spawn([DMMIG, "handover", name, "--json", "--timeout", "60"])
        rc, rep = ask(b, name, 35)
        res = job.wait(120)
        assert rc == 0 and rep["ok"] and res.rc == 0, (rep, res.err)
    else:
        v = a.dmmig("verify", name, "--json", check=False)
        assert v.rc == 0 and summary(v.out)["mismatches"] == [], v.out + v.err
    check(b, dest, seed, rec)        # every acknowledged write is on the destination
    assert digest(a, origin) == digest(b, dest)
    st = status(a, name)
    a.dmmig("finish", name)
    a.dmmig("unwrap", name)
    a.run(["rm", "-f", rec, rec + ".started"])
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0, "the destination's export is still running"
    return st


@pytest.mark.parametrize("hardening", ["restrict", "PermitTTY-no"])
def test_a_destination_without_pty_or_forwarding(pair, pdisks, name: str, hardening: str) -> None:
    """Item 12: an automation key with `restrict` (no pty, no forwarding), and an sshd with
    `PermitTTY no`: the whole migration works, the writer's every write reaches b."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=12), db(32)
    if hardening == "restrict":
        with extra_key(a, b, "restrict", f"restrict-{name}") as key:
            st = migrate_under_writer(a, b, name, origin, dest, 12, {"identity": key})
        assert st["journal"]["dest"]["tunnel"] == "relay", st["journal"]["dest"]   # no forwarding there
    else:
        with second_sshd(a, b, 2222, "PermitTTY no\n") as kh:
            st = migrate_under_writer(a, b, name, origin, dest, 12, {"known_hosts": kh, "port": 2222})
        assert st["journal"]["dest"]["tunnel"] == "forward", st["journal"]["dest"]


def ssh_b(a: UmlHost, key: str, *cmd: str) -> object:
    return a.run(["ssh", "-F", "none", "-T", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                  "-o", "UserKnownHostsFile=/run/ssh/known_hosts", "-o", "StrictHostKeyChecking=yes",
                  "--", f"root@{B_IP}", *cmd], check=False, timeout=60)


def test_a_key_restricted_to_the_agent_migrates_and_runs_nothing_else(pair, pdisks, name: str) -> None:
    """Item 10: with `command="dmmig agent --forced-command",restrict` the whole copy -> cutover ->
    handover -> finish works, and the key runs nothing but dmmig's own agent modes."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=10), db(32)
    forced = f'command="{DMMIG} --state-dir /run/dmmig agent --forced-command",restrict'
    with extra_key(a, b, forced, f"forced-{name}") as key:
        st = migrate_under_writer(a, b, name, origin, dest, 10, {"identity": key}, handover=True)
        assert st["journal"]["dest"]["tunnel"] == "relay", st["journal"]["dest"]
        marker = f"/tmp/forced-{name}"
        for cmd in (["id"], ["sh", "-c", f"'touch {marker}'"], [],
                    [DMMIG, "--state-dir", "/tmp", "agent"], [DMMIG, "agent", "relay", "../../etc/shadow"],
                    [DMMIG, "agent", ";", "touch", marker], [DMMIG, "hotplug", "add"]):
            r = ssh_b(a, key, *cmd)
            assert r.rc != 0 and "refused" in r.err, (cmd, r.rc, r.out, r.err)   # type: ignore[attr-defined]
            assert "uid=" not in r.out, (cmd, r.out)   # type: ignore[attr-defined]
        assert b.run(["test", "-e", marker], check=False).rc != 0, "a refused command ran"
        # and the agent itself still answers through the key
        hello = ssh_b(a, key, DMMIG, "agent")
        assert json.loads(hello.out.splitlines()[0])["agent"] == "dmmig", hello  # type: ignore[attr-defined]


# ---- --transport nbd: TLS --------------------------------------------------------------------
# Run on a as root, but without dmmig's credentials: try to read the export at B_IP:PORT plain,
# with TLS and only the (public) CA certificate, and with a client certificate of another CA.
INTRUDER = r"""
import datetime, json, os, sys, tempfile
import nbd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
name, host, port, ca = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
have_ca = os.path.exists(ca)   # the old code made none
only_ca = tempfile.mkdtemp()
if have_ca:
    open(os.path.join(only_ca, "ca-cert.pem"), "w").write(open(ca).read())
other = tempfile.mkdtemp()   # a CA of the intruder's own, and a client cert it signed
k = ec.generate_private_key(ec.SECP256R1())
now = datetime.datetime.now(datetime.timezone.utc)
def cert(subject, key, issuer, issuer_key, ca_):
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca_, path_length=None), critical=True))
    return b.sign(issuer_key, hashes.SHA256())
ck = ec.generate_private_key(ec.SECP256R1())
if have_ca:
    open(os.path.join(other, "ca-cert.pem"), "w").write(open(ca).read())
open(os.path.join(other, "client-cert.pem"), "wb").write(
    cert("intruder", ck, "intruder-ca", k, False).public_bytes(serialization.Encoding.PEM))
open(os.path.join(other, "client-key.pem"), "wb").write(ck.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
got = []
for what, tls, certs in (("plain", nbd.TLS_DISABLE, None), ("TLS with the CA only", nbd.TLS_REQUIRE, only_ca),
                         ("TLS with another CA's client cert", nbd.TLS_REQUIRE, other)):
    if certs and not have_ca:
        continue
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_tls(tls)
    if certs:
        h.set_tls_certificates(certs)
    try:
        h.connect_tcp(host, port)
        h.pread(4096, 0)
        got.append(what)
    except nbd.Error:
        pass
    del h
print(json.dumps(got))
"""


def test_nbd_transport_needs_tls_or_explicit_consent(pair, pdisks, name: str) -> None:
    """Item 9, --transport nbd: TLS with per-migration certificates; a client without them
    neither connects nor reads; --insecure is the operator's explicit choice."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=13), db(32)
    top, rec = f"/dev/mapper/dmmig-{name}", f"{a.shared}/{name}.rec"
    nbd_args = ["--transport", "nbd", "--nbd-address", B_IP]
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w = start_writer(a, top, rec, seed=13, rate="500", blocks="0:2048")
    try:
        a.dmmig(*copy_args(name, dest, "--converge", "1M", *nbd_args))
        port = status(a, name)["journal"]["dest"]["export"]["port"]
        ca = f"{a.shared}/{name}-ca.pem"   # the CA certificate is public; the keys are not
        a.sh(f"cp /run/dmmig/{name}.tls/ca-cert.pem {ca}; true")
        got = json.loads(a.py(INTRUDER, name, B_IP, str(port), ca).out)
        assert got == [], f"a client without dmmig's credentials read the disk: {got}"
        r = a.dmmig("cutover", name, "--json", check=False)
        assert r.rc == 0, r.err
        # the leg on the export the copy left listening: no SSH login, no agent start
        cut = summary(r.out)
        assert "wait for the destination" not in cut["seconds"] and "connect" not in cut["overlapped"], cut
        time.sleep(2)
    finally:
        stop_writer(a, w)
    v = a.dmmig("verify", name, "--json", check=False)
    assert v.rc == 0 and summary(v.out)["mismatches"] == [], v.out + v.err
    check(b, dest, 13, rec)
    a.dmmig("finish", name)
    for h in (a, b):   # the per-migration credentials are gone with the migration
        assert h.sh("find /run/dmmig -name '*.pem'; true").out == "", h.name
    # without TLS only with the operator's explicit consent
    a.dmmig("prepare", name)
    r = a.dmmig(*copy_args(name, dest, *nbd_args, "--insecure"), check=False)
    assert r.rc == 0, r.err
    assert digest(a, origin) == digest(b, dest)
    a.dmmig("abort", name)
    a.dmmig("unwrap", name)
    a.run(["rm", "-f", rec, rec + ".started", f"{a.shared}/{name}-ca.pem"])


# ---- SIGKILL anywhere: status explains, abort cleans every new resource --------------------------
KILL_AFTER = r"""
import signal, subprocess, sys, time
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    p.wait(float(sys.argv[1]))
    print("done before the kill")
except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGKILL)
    p.wait()
    print("killed")
"""


def leftovers(a: UmlHost, b: UmlHost, name: str) -> list[str]:
    """What of NAME's migration is left on either host besides its journal (wrapped) and lock."""
    out = [f"a: {f}" for f in a.sh("ls /run/dmmig; true").out.split()
           if (f.startswith(name) and f not in (f"{name}.json", f"{name}.lock")) or f.startswith("probe-")]
    out += [f"a: process {p}" for p in a.sh(f"pgrep -af '[/]run/dmmig/({name}[.]|probe-)'; true").out.splitlines()]
    out += [f"a: {d} attached" for d in a.sh("ls /sys/block/nbd*/pid 2>/dev/null; true").out.split()]
    out += [f"b: {f}" for f in b.sh("ls /run/dmmig /run/dmmig/nbd; true").out.split() if f.startswith((name, "probe-"))]
    out += [f"b: process {p}" for p in b.sh("pgrep -af '[q]emu-nbd|[d]mmig agent'; true").out.splitlines()]
    return out


@pytest.mark.parametrize("transport", ["relay", "nbd-tls"])
def test_sigkill_anywhere_in_copy_or_cutover_then_abort_leaves_nothing(pair, pdisks, name: str,
                                                                      transport: str) -> None:
    """The relay's listener and ssh, the TLS keys on both hosts, nbd-client's TLS proxy, the
    export's socket, the probe's files: after a SIGKILL at staggered moments, `status` still
    answers and `abort` removes them all (and the leak fixture agrees at the end)."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(16, fill_seed=14), db(16)
    extra = ["--tunnel", "relay"] if transport == "relay" else ["--transport", "nbd", "--nbd-address", B_IP]
    a.dmmig("wrap", name, origin)
    killed = 0
    for verb, delay in (("copy", 0.5), ("copy", 1.5), ("copy", 3.0), ("cutover", 0.5), ("cutover", 1.5),
                        ("cutover", 3.0)):
        a.dmmig("prepare", name)
        if verb == "cutover":
            a.dmmig(*copy_args(name, dest, *extra))
            argv = [DMMIG, "cutover", name]
        else:
            argv = [DMMIG, *copy_args(name, dest, *extra)]
        killed += a.py(KILL_AFTER, str(delay), *argv).out.strip() == "killed"
        assert a.dmmig("status", name, "--json", check=False).rc == 0
        r = a.dmmig("abort", name, check=False)
        assert r.rc == 0, (verb, delay, r.err)
        for _ in range(40):   # b's agent sessions end as their connections close
            left = leftovers(a, b, name)
            if not left:
                break
            time.sleep(0.25)
        assert left == [], (verb, delay, left)
    assert killed >= 4, "the kills came too late to test anything"
    a.dmmig("unwrap", name)


def test_a_copy_that_fails_after_the_destination_changed_is_aborted_there_too(pair, pdisks, name: str) -> None:
    """The destination was journaled only once its export was up: a copy that failed (or was
    killed) between the agent's prepare_disk and that point left b's record and TLS keys, and
    abort on a, not knowing the destination, left them too. Here the export cannot bind (an
    --nbd-address that is not b's), right after prepare_disk."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(8, fill_seed=15), db(8)
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    r = a.dmmig(*copy_args(name, dest, "--transport", "nbd", "--nbd-address", "192.0.2.1"), check=False)
    assert r.rc == 3 and "cannot listen on 192.0.2.1" in r.err, (r.rc, r.err)
    assert b.run(["test", "-e", f"/run/dmmig/{name}.dest.json"], check=False).rc == 0, "prepare_disk never ran"
    assert a.dmmig("abort", name, check=False).rc == 0
    assert leftovers(a, b, name) == []
    a.dmmig("unwrap", name)


# One 4 KiB O_DIRECT write of the byte CH at OFF; prints how long it took
WRITE_ONE = r"""
import mmap, os, sys, time
dev, off, ch = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
buf = mmap.mmap(-1, 4096)
buf[:] = ch * 4096
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
t0 = time.monotonic()
os.pwrite(fd, buf, off)
os.close(fd)
print(round(time.monotonic() - t0, 2))
"""

READ_ONE = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
os.preadv(fd, [buf], int(sys.argv[2]))
print(bytes(buf[:4096]).decode("latin-1")[:1] if len(set(buf[:4096])) == 1 else "mixed")
"""


def data_flow(a: UmlHost) -> tuple[int, int]:
    """(local port, bytes acked) of a's TCP connection to b's export that carried the leg's
    writes, found by its byte count (ss -ti); not the SSH session (port 22)."""
    lines = a.run(["ss", "-tinH", "dst", B_IP]).out.splitlines()
    flows = []
    for head, info in zip(lines, lines[1:]):
        f = head.split()
        if f and f[0] == "ESTAB" and not f[4].endswith(":22"):
            acked = next((int(x.split(":")[1]) for x in info.split() if x.startswith("bytes_acked:")), 0)
            flows.append((acked, int(f[3].rsplit(":", 1)[1])))
    assert flows, lines
    acked, port = max(flows)
    return port, acked


@pytest.mark.parametrize("catch_up", [False, True])
def test_a_leg_write_held_past_the_nbd_timeout_never_lands_stale_under_an_in_sync_mirror(
        pair, pdisks, name: str, catch_up: bool) -> None:
    """--transport nbd: the leg's TCP flow black-holes (every segment dropped, no RST: one
    ECMP path, a middlebox) longer than --nbd-timeout, then comes back. The guest writes A to a
    block, then B. With several NBD connections (nbd-client -C 4, as before), the kernel sent A
    again on another connection when it timed out, and B after it; the mirror stayed in sync;
    then the first A, held in the dead flow, reached b's export and overwrote B there. Either
    outcome is safe: the leg reported failed (a catch-up or abort follows, never a handover),
    or b holds what a holds.

    CATCH_UP: the operator (or the gate) catches up while that flow is still dead, then cuts
    over again. The catch-up copied B, and before the fix the held A then landed over it
    through the export the catch-up had reused: the new cutover's delta does not hold that
    block, and the mirror reported in sync over a stale block. A fresh export (the old qemu-nbd
    gone) leaves the held write nobody to land on: b answers its segments with a reset."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=17), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    migrate_to_mirror(a, name, origin, dest, "--transport", "nbd", "--nbd-address", B_IP)  # --nbd-timeout 3
    for m in ("sch_prio", "sch_netem", "cls_u32"):
        a.run(["modprobe", "--dirname=/run/mods", m])
    try:
        a.run(["dd", "if=/dev/urandom", f"of={top}", "bs=1M", "count=4", "seek=8", "oflag=direct", "status=none"])
        port, acked = data_flow(a)
        assert acked > 4 * MiB, acked
        # drop every segment of that flow only: the other connections (if any) still pass
        a.sh("tc qdisc add dev vec0 root handle 1: prio && "
             "tc qdisc add dev vec0 parent 1:3 handle 30: netem loss 100% && "
             f"tc filter add dev vec0 protocol ip parent 1:0 prio 1 u32 match ip sport {port} 0xffff flowid 1:3")
        x = 1 * MiB
        a.py(WRITE_ONE, top, str(x), "A", timeout=120)  # the guest never sees an error: leg 0 takes it
        a.py(WRITE_ONE, top, str(x), "B", timeout=120)
        time.sleep(1)
        if catch_up:
            wait_leg_failed(a, name)
            a.dmmig("copy", name)  # over a new connection: the dead flow stays dead meanwhile
        a.run(["tc", "qdisc", "del", "dev", "vec0", "root"])
        # the dead flow retransmits at its next RTO once the path is back (the backoff doubles
        # from 0.2 s), and is gone once b took its data or answered with a reset
        deadline = time.monotonic() + 60
        while a.run(["ss", "-tanH", "sport", "=", f":{port}"]).out.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        if catch_up:
            a.dmmig("cutover", name, "--nbd-timeout", "3")
        assert a.py(READ_ONE, origin, str(x)).out.strip() == "B"
        on_b = b.py(READ_ONE, dest, str(x)).out.strip()
        mirror = status(a, name)["devices"][f"dmmig-{name}"]["mirror"]
        assert not mirror["healthy"] or on_b == "B", (
            f"b holds {on_b!r} where a holds 'B', under a mirror that reports {mirror}: a handover now loses a write")
    finally:
        a.run(["tc", "qdisc", "del", "dev", "vec0", "root"], check=False)
    a.dmmig("abort", name)
    a.dmmig("unwrap", name)
