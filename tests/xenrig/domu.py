"""The test domU: a PVH guest (Debian's kernel + a busybox initramfs) that runs one guest-tool
job named in its config and reports on its console, which xenconsoled logs in dom0.

    vm = DomU(host, "vm1", disk="phy:/dev/loop0,xvda,w", job=["pattern", "7", "/dev/xvda", "0", "64"])
    vm.create()
    vm.wait_console(r"XENRIG-PATTERN")
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from tests.rig.uml import ROOT, RigError
from tests.xenrig.host import XenHost

CONSOLE_DIR = "/var/log/xen/console"


class DomU:
    def __init__(self, host: XenHost, name: str, *, disk: str | list[str] | None, job: list[str] | None = None,
                 memory_mib: int = 128, vcpus: int = 1) -> None:
        self.host, self.name = host, name
        self.disk, self.job = disk, job or ["idle"]
        self.memory_mib, self.vcpus = memory_mib, vcpus
        self.cfg_path = f"/run/xenrig/{name}.cfg"

    def config(self) -> str:
        art = self.host.art
        assert art is not None
        if any(":" in w or " " in w for w in self.job):
            raise ValueError(f"job words may not contain ':' or spaces: {self.job}")
        lines = [
            f'name = "{self.name}"',
            # PV guests cannot migrate with Debian's Xen (built without shadow paging): PVH
            'type = "pvh"',
            f'kernel = "{art.domu_kernel}"',
            f'ramdisk = "{art.domu_initrd}"',
            # XENRIG_GUEST_LOGLEVEL=7: the guest kernel's suspend/resume messages on its console
            f'cmdline = "console=hvc0 loglevel={os.environ.get("XENRIG_GUEST_LOGLEVEL", "4")} '
            f'XENRIG_JOB={":".join(self.job)}"',
            f"memory = {self.memory_mib}",
            f"vcpus = {self.vcpus}",
            # with -cpu ...,-rdtscp: a PVH guest otherwise hangs on RDTSCP under emulated SVM
            'tsc_mode = "native"',
            'on_crash = "preserve"',
        ]
        if self.disk:
            disks = [self.disk] if isinstance(self.disk, str) else self.disk
            lines.append("disk = [ " + ", ".join(f"'{d}'" for d in disks) + " ]")
        return "\n".join(lines) + "\n"

    def create(self, timeout: float = 180) -> float:
        """xl create; returns the seconds it took."""
        self.host.run(["mkdir", "-p", "/run/xenrig"])
        # xenconsoled appends to a log named after the domain: an earlier guest of this name
        # (an earlier test) must not lend it its lines
        self.host.sh(f"rm -f {CONSOLE_DIR}/guest-{self.name}.log {CONSOLE_DIR}/guest-{self.name}--*.log")
        self.host.write_file(self.cfg_path, self.config())
        t = time.monotonic()
        # -e: no monitoring daemon. Here xl's daemonizing child intermittently dies of heap
        # corruption (SIGSEGV/SIGABRT in libc right after fork) when the domain has a disk,
        # which fails the create; the rig does not need on_crash/on_reboot handling
        self.host.run(["xl", "create", "-e", self.cfg_path], timeout=timeout)
        return time.monotonic() - t

    def domid(self, host: XenHost | None = None) -> int | None:
        r = (host or self.host).run(["xl", "domid", self.name], check=False)
        return int(r.out) if r.rc == 0 and r.out.strip().isdigit() else None

    def destroy(self, host: XenHost | None = None) -> None:
        (host or self.host).run(["xl", "destroy", self.name], timeout=120)

    def console(self, host: XenHost | None = None) -> str:
        """Everything the guest printed on that host (xenconsoled names the log by domain
        name, which is NAME--incoming while a migration arrives)."""
        r = (host or self.host).sh(f"cat {CONSOLE_DIR}/guest-{self.name}.log {CONSOLE_DIR}/guest-{self.name}--*.log"
                                   " 2>/dev/null", check=False)
        return r.out

    def diagnose(self, host: XenHost | None = None) -> str:
        """What to look at when xl fails on this guest: the domains, Xen's own log, the guest's
        control nodes in XenStore (control/shutdown is how libxl asks a PVH guest to suspend)
        and the guest's console."""
        h = host or self.host
        domid = self.domid(h)
        parts = [("xl list", "xl list"), ("xl dmesg (tail)", "xl dmesg | tail -40")]
        if domid is not None:
            parts.append(("guest's control nodes", f"xenstore-ls -f /local/domain/{domid}/control"))
        out = [f"--- {title} ---\n{h.sh(cmd, check=False, timeout=60).out}" for title, cmd in parts]
        out.append(f"--- guest console (tail) ---\n{self.console(h)[-3000:]}")
        return "\n".join(out)

    def wait_console(self, pattern: str, *, host: XenHost | None = None, timeout: float = 120,
                     poll: float = 1.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console(host)
            m = rx.search(text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise RigError(f"domU {self.name}: no {pattern!r} on its console in {timeout}s\n"
                               f"--- console tail ---\n{text[-3000:]}")
            time.sleep(poll)


def backend(host: XenHost, domid: int) -> dict[str, str]:
    """The vbd backend keys libxl and the block script wrote for the guest's xvda."""
    out = host.run(["xenstore-ls", "-f", f"/local/domain/0/backend/vbd/{domid}/51712"]).out
    keys = {}
    for line in out.splitlines():
        k, _, v = line.partition(" = ")
        keys[k.rsplit("/", 1)[-1]] = v.strip().strip('"')
    return keys


def check_disk(host: XenHost, *args: str, stdin: str | None = None) -> dict[str, Any]:
    """Run tests.xenrig.pattern in dom0 against a disk there (`acks` reads a console on STDIN)."""
    r = host.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "tests.xenrig.pattern", *args], cwd=str(ROOT),
                 check=False, timeout=300, input=None if stdin is None else stdin.encode())
    assert r.rc in (0, 1), r
    return dict(json.loads(r.out))
