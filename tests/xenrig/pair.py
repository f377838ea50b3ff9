"""Two Xen hosts, "a" (192.168.201.1) and "b" (192.168.201.2), joined by a QEMU socket network on
loopback. Each dom0 runs sshd with keys made for this run in its own tmpfs and trusts the other
(strict host key checking), so `xl migrate DOMU 192.168.201.2` (ssh) works from a, and back
from b; the host machine's own ssh files are never touched."""
from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack

from tests.rig.pair import AGENT_CONF, AGENT_CONF_TEXT, sshd_config
from tests.rig.uml import ROOT, RigError
from tests.xenrig.build import build
from tests.xenrig.host import NetSpec, XenHost

A_IP, B_IP = "192.168.201.1", "192.168.201.2"
# for dmmig's own SSH transport (paramiko): the same files ssh uses through ssh_config.d
SSH_OPTS = ["--known-hosts", "/run/ssh/known_hosts", "--identity", "/run/ssh/id_ed25519"]
CLOCK_PORT = 47123


def _ssh_client_config(peer: str) -> str:
    # in dom0's /etc (a tmpfs overlay): plain `ssh PEER`, as xl migrate runs it, uses these
    return f"""\
Host {peer}
    IdentityFile /run/ssh/id_ed25519
    UserKnownHostsFile /run/ssh/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    want = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(ln.split()[1].endswith(want) and ln.split()[3] == "0A" for ln in f.readlines()[1:])


def single_host(log_dir: str | None = None) -> XenHost:
    """Host "a" alone, with its NIC listening: XenPair(a=...) can add "b" to it later, so a
    session that needs one host and then two boots two machines, not three."""
    return XenHost("a", net=NetSpec(f"{A_IP}/24", "52:54:00:c8:00:01", listen=_free_port()), log_dir=log_dir,
                   artifacts=build())


class XenPair:
    def __init__(self, log_dir: str | None = None, *, a: XenHost | None = None) -> None:
        """a: an already started host from single_host(); it stays the caller's to stop."""
        self.log_dir = log_dir
        self._stack = ExitStack()
        self.a: XenHost | None = a
        self.b: XenHost | None = None

    def start(self, timeout: float = 400) -> tuple[XenHost, XenHost]:
        a = self.a
        if a is None:
            a = single_host(self.log_dir)
            self._stack.callback(a.stop)
            a.launch()
        assert a.net is not None and a.net.listen is not None and a.art is not None
        port = a.net.listen
        b = XenHost("b", net=NetSpec(f"{B_IP}/24", "52:54:00:c8:00:02", connect=port), log_dir=self.log_dir,
                    artifacts=a.art)
        self._stack.callback(b.stop)
        self.a, self.b = a, b
        # a's QEMU must listen before b's connects; probing the port would take a's one peer slot
        deadline = time.monotonic() + 30
        while not _listening(port):
            if time.monotonic() > deadline or not a.alive():
                raise RigError(f"host a's QEMU is not listening on 127.0.0.1:{port}")
            time.sleep(0.1)
        b.launch()
        if not a.milestones.get("agent-ready"):
            a.wait_ready(timeout)
        b.wait_ready(timeout)
        self._ssh()
        return a, b

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> tuple[XenHost, XenHost]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ssh(self) -> None:
        assert self.a is not None and self.b is not None
        hosts = [(self.a, A_IP, self.b, B_IP), (self.b, B_IP, self.a, A_IP)]
        for h, ip, _, _ in hosts:
            h.sh("mkdir -p -m 700 /run/ssh /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /run/ssh/host_ed25519"
                 " && ssh-keygen -q -t ed25519 -N '' -f /run/ssh/id_ed25519")
            h.write_file("/run/ssh/sshd_config", sshd_config(ip))
            h.write_file(AGENT_CONF, AGENT_CONF_TEXT)
        for h, _ip, peer, peer_ip in hosts:
            peer.write_file("/run/ssh/authorized_keys", h.run(["cat", "/run/ssh/id_ed25519.pub"]).out)
            key = peer.run(["cat", "/run/ssh/host_ed25519.pub"]).out.split()
            h.write_file("/run/ssh/known_hosts", f"{peer_ip} {key[0]} {key[1]}\n")
            h.write_file("/etc/ssh/ssh_config.d/xenrig.conf", _ssh_client_config(peer_ip))
        for h, _, _, _ in hosts:
            h.run(["/usr/sbin/sshd", "-f", "/run/ssh/sshd_config"])
        for h, _, _, peer_ip in hosts:
            out = h.run(["ssh", peer_ip, "hostname"], timeout=120).out.strip()
            if out not in ("a", "b") or out == h.name:
                raise RigError(f"ssh from {h.name} to {peer_ip} answered {out!r}")

    def clock_offset(self) -> dict[str, int]:
        """b's clock minus a's, measured over the network from a."""
        assert self.a is not None and self.b is not None
        n = 20
        srv = self.b.spawn([str(ROOT / ".venv" / "bin" / "python"), "-m", "tests.xenrig.clock", "serve",
                            str(CLOCK_PORT), "3"], cwd=str(ROOT), timeout=120)
        r = self.a.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tests.xenrig.clock", "measure", B_IP,
                        str(CLOCK_PORT), str(n)], cwd=str(ROOT), timeout=120)
        srv.wait(120).check()
        return dict(json.loads(r.out))

    def sync_clocks(self) -> dict[str, int]:
        """Set b's clock (and so its Xen wall clock) to a's; returns the residual offset."""
        assert self.b is not None
        off = self.clock_offset()["offset_ns"]
        self.b.py("import sys, time; t = time.CLOCK_REALTIME; "
                  "time.clock_settime_ns(t, time.clock_gettime_ns(t) - int(sys.argv[1]))", str(off))
        return self.clock_offset()
