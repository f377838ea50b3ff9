"""Two rig kernels joined by a veth pair inside a network namespace of our own: host "a"
(source) and host "b" (destination, running a real sshd). Each has its own dm devices,
nbd, udev and state directory; the same dm names exist on both, as in a real migration."""
from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack

from tests.rig.uml import UmlHost

A_IP, B_IP = "192.168.200.1", "192.168.200.2"
# the agent's confinement (dmmig/core/confine.py): the rigs' disk images live in /dev/shm. The rig's
# /etc is this machine's, so the file is in /run and sshd points the agent at it
AGENT_CONF = "/run/dmmig-agent.conf"
AGENT_CONF_TEXT = "# dmmig's test rigs: disk image files live in the guest's /dev/shm\nfile_roots = /dev/shm\n"


def sshd_config(ip: str) -> str:
    """A root-only, key-only sshd whose state lives in /run (the rig's root is this machine's)."""
    return f"""\
ListenAddress {ip}
HostKey /run/ssh/host_ed25519
AuthorizedKeysFile /run/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile /run/sshd.pid
SetEnv DMMIG_STATE_DIR=/run/dmmig DMMIG_AGENT_CONF={AGENT_CONF}
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Pair:
    def __init__(self, log_dir: str, *, mem: str = "1G") -> None:
        """MEM: each kernel's memory; its /dev/shm (scratch disks) holds up to half of it."""
        self.mem = mem
        tag = f"{os.getpid() % 100000}"
        self.ns = f"dmmig-rig-{tag}"
        self.va, self.vb = f"dmA{tag}", f"dmB{tag}"
        self.log_dir = log_dir
        self._stack = ExitStack()

    def start(self) -> tuple[UmlHost, UmlHost]:
        sh("ip", "netns", "add", self.ns)
        self._stack.callback(sh, "ip", "netns", "delete", self.ns)
        sh("ip", "-n", self.ns, "link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        for v in (self.va, self.vb):
            sh("ip", "-n", self.ns, "link", "set", v, "up")
            # with offloads on, bulk TCP between two UML kernels stalls (GSO frames)
            sh("ip", "netns", "exec", self.ns, "ethtool", "-K", v, "tso", "off", "gso", "off", "gro", "off",
               "tx", "off", "rx", "off")
        self.a = UmlHost("a", ifname=self.va, ip=f"{A_IP}/24", netns=self.ns, log_dir=self.log_dir,
                         mem=self.mem)
        self.b = UmlHost("b", ifname=self.vb, ip=f"{B_IP}/24", netns=self.ns, log_dir=self.log_dir,
                         mem=self.mem)
        self._stack.callback(self.a.stop)
        self._stack.callback(self.b.stop)
        self.a.start()
        self.b.start()
        self._ssh()
        return self.a, self.b

    def _ssh(self) -> None:
        a, b = self.a, self.b
        b.sh("mkdir -p -m 700 /run/ssh /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /run/ssh/host_ed25519")
        b.run(["sh", "-c", "cat > /run/ssh/sshd_config"], input=sshd_config(B_IP).encode())
        b.run(["sh", "-c", f"cat > {AGENT_CONF}"], input=AGENT_CONF_TEXT.encode())
        a.sh("mkdir -p -m 700 /run/ssh && ssh-keygen -q -t ed25519 -N '' -f /run/ssh/id_ed25519")
        pub = a.run(["cat", "/run/ssh/id_ed25519.pub"]).out
        b.run(["sh", "-c", "cat > /run/ssh/authorized_keys"], input=pub.encode())
        hostkey = b.run(["cat", "/run/ssh/host_ed25519.pub"]).out.split()
        a.run(["sh", "-c", "cat > /run/ssh/known_hosts"], input=f"{B_IP} {hostkey[0]} {hostkey[1]}\n".encode())
        b.run(["/usr/sbin/sshd", "-f", "/run/ssh/sshd_config"])
        a.run(["ping", "-c", "1", "-W", "5", B_IP], check=False)

    def stop(self) -> None:
        self._stack.close()


SSH_OPTS = ["--known-hosts", "/run/ssh/known_hosts", "--identity", "/run/ssh/id_ed25519"]
