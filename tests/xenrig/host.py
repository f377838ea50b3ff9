"""One Xen host: Xen 4.17 + Debian's 6.1 dom0 under qemu-system-x86_64 (TCG), with the
project's runtime in dom0 (this machine's root over 9p), udev, xenstored, xenconsoled and the
rig's command agent.

    with XenHost("a") as h:
        h.run(["xl", "list"]).out
        h.milestones          # seconds since QEMU started: xen-banner, dom0-init, xl-info, ...

Files: `h.shared` on this machine is /xchg in dom0 (read-write, uncached); dom0 sees this
machine's whole root read-only (e.g. the repo at the same path) and writes only to tmpfs.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.rig.uml import ROOT, Result, RigError
from tests.xenrig.build import Artifacts, build
from tests.xenrig.channel import Channel, Job

HERE = Path(__file__).resolve().parent
XCHG = "/xchg"  # where dom0 mounts `shared`
# Serial lines that mark a boot milestone (first match wins, first time only)
_MARKS = [
    (re.compile(rb"\(XEN\) .*Xen version \d"), "xen-banner"),
    (re.compile(rb"\(XEN\) .*\*\*\* Building a PV Dom0"), "xen-dom0-build"),
    (re.compile(rb"Linux version \d"), "dom0-kernel"),
    (re.compile(rb"XENRIG-MILESTONE (\S+)"), ""),
]


# -smap: dom0 (PV) dies with #PF under TCG + SMAP. -rdtscp: a PVH guest hangs on RDTSCP under
# emulated SVM. -xsave (which also drops AVX, AVX2, PKU): with XSAVE, while an HVM/PVH guest
# runs, dom0's processes lose register state across Xen's context switches (QEMU 7.2 TCG):
# threaded Python in dom0 died of SIGSEGV or "malloc(): corrupted top size" or computed wrong
# SHA-256 sums within seconds, the rig's agent died ("free(): corrupted unsorted chunks": dom0
# powered off) or stopped answering, xl crashed after fork, and the guest itself panicked (its
# GS base lost: "stack guard page was hit"). Without XSAVE (Xen and both kernels use FXSAVE)
# none of it was seen. -pku alone does not help. -fsgsbase: a guest writing to its disk panicked
# with its GS base lost ("stack guard page was hit") and failed to acknowledge xl's suspend;
# without FSGSBASE the panic was not seen again, the suspend failure was (tests/xen/
# test_dmmig_migrate.py, XL_SUSPEND_UNDER_TCG).
CPU_MODEL = "max,-smap,-rdtscp,-xsave,-fsgsbase"


@dataclass
class NetSpec:
    """dom0's NIC: a QEMU socket network on loopback (one side listens, the other connects)."""
    ip: str           # with prefix, e.g. 192.168.201.1/24
    mac: str
    listen: int | None = None
    connect: int | None = None


class XenHost:
    _ids = itertools.count(1)

    def __init__(self, name: str, *, net: NetSpec | None = None, mem_mib: int = 2048, dom0_mem_mib: int = 1024,
                 log_dir: str | None = None, artifacts: Artifacts | None = None, tcg_thread: str = "single",
                 cpus: int = 1,
                 cpu_model: str = CPU_MODEL, serial_shell: bool = False) -> None:
        """tcg_thread: "single" by default. With QEMU 7.2's multi-threaded TCG, dom0's processes
        saw memory corruption here (xl crashing after fork, ssh streams arriving altered, a
        migration stream rejected); one TCG thread runs the vCPUs in turn and showed none.
        (Those runs still had XSAVE, which corrupts dom0 even with one thread: see CPU_MODEL;
        "multi" has not been tried again without it.)
        cpus: one by default. With two (Xen's two pCPUs, dom0's two vCPUs), the PVH guest died at
        random times, booting or running, idle or under live migration's log-dirty mode: an
        interrupt arrived on the first instruction of the interrupt handler (IF=0, its GS still
        the user's: "Fatal exception in interrupt"), or it stopped without a word and so never
        acknowledged xl's suspend ("guest didn't acknowledge suspend"). Cross-host xl migrate
        passed 3 of 5 (2 CPUs) against 8 of 8 (1 CPU) here, same rig otherwise. One TCG thread
        runs the vCPUs in turn anyway, so the second CPU bought no speed.
        serial_shell: a root shell on dom0's console, fed by serial_input() (for debugging a
        dom0 whose agent stopped answering; its output lands in the serial log)."""
        self.name = name
        self.tcg_thread = tcg_thread
        self.cpu_model = cpu_model
        self.serial_shell = serial_shell
        self.cpus = cpus
        self.net = net
        self.mem_mib, self.dom0_mem_mib = mem_mib, dom0_mem_mib
        self.tag = f"dmmig-xen-{name}-{os.getpid()}-{next(self._ids)}"
        self.run_dir = Path(f"/var/tmp/{self.tag}")
        self.shared = self.run_dir / "xchg"
        self.log_path = Path(log_dir or "/var/tmp") / f"{self.tag}.serial"
        self.art = artifacts
        self.milestones: dict[str, float] = {}  # name -> seconds since QEMU started
        self.boot_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._t0 = 0.0
        self._fatal: list[str] = []
        self._chan: Channel | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 300) -> XenHost:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start QEMU and connect the agent channel; wait_ready() waits for dom0."""
        if not shutil.which("qemu-system-x86_64"):
            raise RigError("qemu-system-x86_64 not found: run the README's install command (qemu-system-x86)")
        py = ROOT / ".venv" / "bin" / "python"
        if not py.exists():
            raise RigError(f"{py} missing: run the README's install command")
        if self.art is None:
            self.art = build()
        self.shared.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # nice: the machine's two cores are shared with other test runs; TCG would take them all
        argv = ["nice", "-n", "10", *self.qemu_argv()]
        self._t0 = time.monotonic()
        # QEMU's stdout is Xen's com1 (Xen, dom0 kernel and dom0 init messages)
        stdin = subprocess.PIPE if self.serial_shell else subprocess.DEVNULL
        self._proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._serial_reader, daemon=True).start()
        self._chan = Channel(self.run_dir / "agent.sock", alive=self.alive, describe=self._describe)
        try:
            self._chan.connect()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 300) -> None:
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.boot_seconds = self.milestones["agent-ready"]

    def qemu_argv(self) -> list[str]:
        art = self.art
        assert art is not None
        env = {"XENRIG_NAME": self.name, "XENRIG_RC": str(HERE / "dom0-rc.sh"),
               "XENRIG_PY": str(ROOT / ".venv" / "bin" / "python"), "XENRIG_ROOT": str(ROOT)}
        if self.net:
            env["XENRIG_IP"] = self.net.ip
        if self.serial_shell:
            env["XENRIG_SHELL"] = "1"
        for k, v in env.items():
            # QEMU splits -initrd at commas; the kernel command line splits at spaces
            if "," in v or " " in v:
                raise RigError(f"{k}={v!r}: the Xen rig cannot pass paths with commas or spaces")
        dom0_cmdline = " ".join(["console=hvc0", "earlyprintk=xen", "net.ifnames=0", "loglevel=4",
                                 *(f"{k}={v}" for k, v in env.items())])
        xen_cmdline = " ".join([
            "console=com1", "com1=115200,8n1", f"dom0_mem={self.dom0_mem_mib}M,max:{self.dom0_mem_mib}M",
            f"dom0_max_vcpus={self.cpus}", "loglvl=all", "guest_loglvl=all", "console_timestamps=boot",
            # scrubbing all RAM at boot makes QEMU touch (and keep) every page: ~3.3 GB RSS
            "bootscrub=0",
        ])
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", f"tcg,thread={self.tcg_thread}",
            # /dev/kvm here is PVM-only: TCG. CPU_MODEL: why each flag is off
            "-cpu", self.cpu_model, "-smp", str(self.cpus), "-m", str(self.mem_mib),
            "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
            "-chardev", "stdio,id=com1,signal=off", "-serial", "chardev:com1",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=agent,path={self.run_dir / 'agent.sock'},server=on,wait=off",
            "-device", "virtserialport,bus=vser.0,chardev=agent,name=xenrig.agent",
            # dom0's root: this machine's root, read-only (multidevs=remap: / spans file systems)
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            # Debian's Xen tree: its own share, since overlayfs refuses a lower layer inside another
            "-fsdev", f"local,id=xentree,path={art.tree},security_model=none,readonly=on",
            "-device", "virtio-9p-pci,fsdev=xentree,mount_tag=xentree",
            "-fsdev", f"local,id=xchg,path={self.shared},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=xchg,mount_tag=xchg",
            "-kernel", str(art.xen), "-append", xen_cmdline,
            "-initrd", f"{art.dom0_kernel} {dom0_cmdline},{art.dom0_initrd}",
        ]
        if self.net:
            where = (f"listen=127.0.0.1:{self.net.listen}" if self.net.listen
                     else f"connect=127.0.0.1:{self.net.connect}")
            argv += ["-netdev", f"socket,id=n0,{where}", "-device", f"virtio-net-pci,netdev=n0,mac={self.net.mac}"]
        return argv

    def _wait_ready(self, timeout: float) -> None:
        assert self._chan is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._fatal:
                raise RigError(f"dom0 of {self.name} failed to come up: {self._fatal}\n{self._describe()}")
            try:
                self._chan.wait_ready(min(2.0, max(0.1, deadline - time.monotonic())))
                self.milestones["agent-ready"] = time.monotonic() - self._t0
                return
            except RigError as e:
                if not self.alive() or time.monotonic() > deadline:
                    raise RigError(f"Xen host {self.name} did not come up in {timeout}s"
                                   f" (milestones {self.milestones})\n{self._describe()}") from e

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """dom0 keeps nothing worth saving (tmpfs only): stopping is ending QEMU."""
        if self._chan is not None:
            self._chan.close()
        self.kill()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> XenHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observation ----------------------------------------------------------------------
    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def serial_input(self, text: str) -> None:
        """Type into the serial line: dom0's console (the serial_shell) or, after three
        Ctrl-A, Xen's debug keys ('h' lists them; 'q', 'r', 'e', '0' dump domains, run queues,
        event channels, dom0's registers)."""
        if self._proc is None or self._proc.stdin is None:
            raise RigError("serial input needs XenHost(serial_shell=True)")
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def rss_mib(self) -> tuple[float, float]:
        """(current, peak) resident memory of the QEMU process, MiB."""
        if self._proc is None:
            return 0.0, 0.0
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return 0.0, 0.0
        kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return int(kb.get("VmRSS", 0)) / 1024, int(kb.get("VmHWM", 0)) / 1024

    def _describe(self) -> str:
        return f"--- {self.name} serial tail ({self.log_path}) ---\n{self.console()[-4000:]}"

    def _serial_reader(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None and self._log is not None
        for line in self._proc.stdout:
            t = time.monotonic() - self._t0
            self._log.write(line)
            self._log.flush()
            for rx, name in _MARKS:
                m = rx.search(line)
                if m:
                    key = name or m.group(1).decode(errors="replace")
                    self.milestones.setdefault(key, round(t, 2))
            if b"XENRIG-FATAL" in line or b"Kernel panic" in line or b"Failed to execute /init" in line:
                self._fatal.append(line.decode(errors="replace").strip())
        self._log.close()

    # ---- commands -------------------------------------------------------------------------
    def spawn(self, argv: list[str], *, env: dict[str, str] | None = None, input: bytes | None = None,
              cwd: str | None = None, timeout: float | None = None) -> Job:
        if self._chan is None:
            raise RigError(f"Xen host {self.name} not started")
        msg = {"op": "run", "argv": argv, "env": env or {}, "cwd": cwd, "timeout": timeout}
        if input is not None:
            # stdin goes through the shared directory (the agent opens the file and removes it)
            name = f"stdin-{time.monotonic_ns()}-{threading.get_ident()}"
            (self.shared / name).write_bytes(input)
            msg["stdin_file"] = f"{XCHG}/{name}"
        return self._chan.spawn(msg, argv)

    def install_block_script(self) -> None:
        """block-dmmig into dom0's /etc/xen/scripts (a tmpfs overlay), running THIS checkout's
        dmmig: the script execs /usr/local/bin/dmmig, which install.sh links to the checkout it
        ran from (another worktree's, maybe); dom0's /usr is an overlay too, so relink it here."""
        self.run(["install", "-D", "-m", "0755", str(ROOT / "hotplug" / "block-dmmig"),
                  "/etc/xen/scripts/block-dmmig"])
        self.run(["ln", "-sfn", str(ROOT / ".venv" / "bin" / "dmmig"), "/usr/local/bin/dmmig"])
        self.run(["mkdir", "-p", "/var/log/xen"])

    def run(self, argv: list[str], *, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None,
            input: bytes | None = None, cwd: str | None = None) -> Result:
        res = self.spawn(argv, env=env, input=input, cwd=cwd, timeout=timeout).wait(timeout + 30)
        return res.check() if check else res

    def sh(self, script: str, *, timeout: float = 300, check: bool = True, input: bytes | None = None) -> Result:
        """Test scaffolding only (never for dmmig's own commands)."""
        return self.run(["sh", "-c", script], timeout=timeout, check=check, input=input)

    def py(self, code: str, *args: str, timeout: float = 300, check: bool = True) -> Result:
        return self.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code, *args], timeout=timeout, check=check)

    def write_file(self, path: str, data: bytes | str) -> None:
        self.run(["sh", "-c", 'cat > "$0"', path], input=data.encode() if isinstance(data, str) else data)
