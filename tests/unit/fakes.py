"""The unit tests' shared fakes, in one place: the runner, XenStore, and the destination's
agent and SSH connection. Each has the interface of the adapter it stands for (runner.Runner,
xenstore.XenStore, agent.AgentClient, session.Remote) and records what it was asked."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.nbdkernel import NbdKernel
from dmmig.adapters.runner import Result
from dmmig.adapters.ssh import SshOptions
from dmmig.adapters.xenstore import XenStoreError
from dmmig.adapters.xl import Xl
from dmmig.core import journal
from dmmig.core.confine import Policy
from dmmig.core.stack import Stack
from dmmig.errors import CommandError
from dmmig.flows import migrate_domain
from dmmig.flows.destination import AgentServer
from dmmig.names import disk_name_for

NOT_THERE = (1, "", "Device does not exist.\nCommand failed.\n")  # dmsetup info of no device
INFO = ["dmsetup", "info", "-c", "--noheadings", "--separator", ";", "-o",
        "name,major,minor,attr,open,segments,events,uuid"]


class FakeRunner:
    """Records every call. Answers with the first matching rule (an argv prefix -> a reply or a
    list of replies used in turn), else rc 0 and no output. Honours check= like the real one."""

    def __init__(self, rules: list[tuple[list[str], Any]] | None = None) -> None:
        self.rules = rules or []
        self.calls: list[dict[str, Any]] = []

    def run(self, argv: list[str], check: bool = True, timeout: float | None = None,
            input: str | None = None, env: Mapping[str, str] | None = None) -> Result:
        self.calls.append({"argv": list(argv), "check": check, "timeout": timeout, "input": input,
                           **({"env": dict(env)} if env else {})})
        rc, out, err = 0, "", ""
        for prefix, reply in self.rules:
            if argv[:len(prefix)] == prefix:
                if isinstance(reply, list):
                    rc, out, err = reply.pop(0) if len(reply) > 1 else reply[0]
                elif callable(reply):
                    rc, out, err = reply(argv)
                else:
                    rc, out, err = reply
                break
        res = Result(list(argv), rc, out, err)
        if check and rc != 0:
            raise CommandError(list(argv), rc, out, err)
        return res

    @property
    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls]


class MemXenStore:
    """The XenStore adapter's interface over a dict; records writes; can refuse some keys."""

    def __init__(self, data: dict[str, str] | None = None, refuse: tuple[str, ...] = ()) -> None:
        self.data = dict(data or {})
        self.refuse = refuse
        self.writes: list[tuple[str, str]] = []

    def read(self, path: str) -> str | None:
        return self.data.get(path)

    def list(self, path: str) -> list[str]:
        pre = path.rstrip("/") + "/"
        return sorted({k[len(pre):].split("/")[0] for k in self.data if k.startswith(pre)})

    def write(self, path: str, value: str) -> None:
        if path.rsplit("/", 1)[-1] in self.refuse:
            raise XenStoreError(f"xenstore write {path}: (13, 'Permission denied')")
        self.writes.append((path, value))
        self.data[path] = value


class FakeAgent:
    """The destination: the real agent's operations, in this process."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.calls: list[str] = []

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append(op)
        return dict(getattr(self.server, f"op_{op}")(**kw))


class FakeRemote:
    """The SSH connection. Its tunnel probe (OpenSSH against the destination's agent; run for
    real in tests/kernel/test_transport.py) answers TUNNEL."""

    def __init__(self, agent: FakeAgent, tunnel: tuple[str, str] = ("relay", "streamlocal forwarding refused")) -> None:
        self.agent = agent
        self.tunnel = tunnel
        self.closed = False

    def probe_tunnel(self, runner: Any, local_dir: str) -> tuple[str, str]:
        self.agent.calls.append("probe_tunnel")
        return self.tunnel

    def close(self) -> None:
        self.closed = True


DOMID = 7
MIB = 1 << 20


def vbd_keys(devid: int, vdev: str, params: str, *, script: str = "/etc/xen/scripts/block-dmmig",
             mode: str = "w", pdev: str = "fd:4", backend_dom: int = 0, node: str = "",
             sector_size: str = "512") -> dict[str, str]:
    """What libxl and the block script write: libxl's record of the device (dom0-only), the
    backend directory, and the guest's frontend node naming the backend (which dmmig ignores).
    blkback's sector-size: the logical block size blkfront got."""
    be = f"/local/domain/{backend_dom}/backend/vbd/{DOMID}/{devid}"
    keys = {f"/libxl/{DOMID}/device/vbd/{devid}/backend": be,
            f"/local/domain/{DOMID}/device/vbd/{devid}/backend": be, f"{be}/frontend-id": str(DOMID),
            f"{be}/dev": vdev, f"{be}/params": params, f"{be}/mode": mode, f"{be}/physical-device": pdev,
            f"{be}/sector-size": sector_size}
    if script:
        keys[f"{be}/script"] = script
    if node:
        keys[f"{be}/node"] = node
    return keys


def fake_nbd_devices(tmp_path: Path, n: int, attached: dict[int, int] | None = None) -> str:
    """A /sys/block with nbd0..nbd(N-1) as the nbd module shows them: a connected device has
    a pid file and a size; ATTACHED: device number -> its size in sectors."""
    root = tmp_path / "sys" / "block"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        d = root / f"nbd{i}"
        d.mkdir(exist_ok=True)
        size = (attached or {}).get(i)
        (d / "size").write_text(f"{size or 0}\n")
        if size is not None:
            (d / "pid").write_text("4242\n")
        elif (d / "pid").exists():
            (d / "pid").unlink()
    (root / "loop0").mkdir(exist_ok=True)  # not an nbd device
    return str(root)


def fake_queue(tmp_path: Path, devno: str, max_bytes: int, granularity: int = 4096, alignment: int = 0,
               hw_bytes: int = 4294966784) -> str:
    """A /sys/dev/block/DEVNO with the discard limits a block device shows (a root for
    blockdev.QueueLimits). A write to queue/discard_max_bytes lands in the file as is."""
    d = tmp_path / "sys" / "dev" / "block" / devno
    (d / "queue").mkdir(parents=True, exist_ok=True)
    (d / "queue" / "discard_max_bytes").write_text(f"{max_bytes}\n")
    (d / "queue" / "discard_max_hw_bytes").write_text(f"{hw_bytes}\n")
    (d / "queue" / "discard_granularity").write_text(f"{granularity}\n")
    (d / "discard_alignment").write_text(f"{alignment}\n")
    return str(tmp_path / "sys")


class World:
    """A source host with domain vm1 (domid 7) and a destination directory for its disks."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dest_dir = tmp_path / "dest"
        self.dest_dir.mkdir()
        self.script = tmp_path / "block-dmmig"
        self.script.write_text("#!/bin/sh\n")
        self.script.chmod(0o755)
        self.xs = MemXenStore()
        self.runner = FakeRunner([
            (["xl", "domid", "vm1"], (0, f"{DOMID}\n", "")),
            (["xl", "domid"], (1, "", "Can't get domid of domain name 'x', maybe this domain does not exist.\n")),
            (["xl", "domname", str(DOMID)], (0, "vm1\n", "")),
            (["xl", "domname"], (1, "", "")),
            (["dmsetup", "info"], NOT_THERE),
            (["dmsetup", "targets"], (0, TARGETS, "")),
        ])
        self.stack = Stack(self.runner, DmSetup(self.runner), journal.Journal(str(tmp_path / "state")))
        # this host's nbd devices: four, all free
        self.sys_block = fake_nbd_devices(tmp_path, 4)
        self.stack.mirror.nbd = NbdKernel(self.runner, sys_block=self.sys_block)
        # the destination: its agent confined to dest/, and its own XenStore
        self.dest_xs = MemXenStore()
        self.agent = FakeAgent(AgentServer(FakeRunner(), str(tmp_path / "dstate"),
                                           policy=Policy(file_roots=(str(self.dest_dir),)),
                                           xenstore=lambda: contextlib.nullcontext(self.dest_xs)))
        self.opts = migrate_domain.MigrateOptions(block_script=str(self.script))

    def disk(self, size: int = 8 * MIB) -> str:
        """A managed disk d1: params is a file under dest/ (so the destination's path exists
        with SIZE bytes); wrapped here as dmmig-d1 (fd:4) over 7:1."""
        f = self.dest_dir / "d1"
        f.write_bytes(b"")
        os.truncate(f, size)
        params = str(f)
        name = disk_name_for(params)
        self.runner.rules.insert(0, (["dmsetup", "table", f"dmmig-{name}"],
                                     (0, f"0 {8 * MIB // 512} linear 7:1 0\n", "")))
        self.runner.rules.insert(0, (INFO + [f"dmmig-{name}"],
                                     (0, f"dmmig-{name};253;4;L--w;1;1;0;DMMIG-top-{name}\n", "")))
        self.stack.journal.save(journal.Entry(name, "/dev/loop1", "7:1"), journal.WRAPPED)
        self.xs.data.update(vbd_keys(51712, "xvda", params, node="/dev/loop1"))
        return name

    def plan(self, domain: str = "vm1", **opts: Any) -> migrate_domain.Plan:
        for k, v in opts.items():
            setattr(self.opts, k, v)
        return migrate_domain.plan(self.stack, self.xs, Xl(self.runner), domain, "root@b", SshOptions(), self.opts,
                       remote=lambda dest: FakeRemote(self.agent))

    def mutating(self) -> list[list[str]]:
        return [a for a in self.runner.argvs
                if a[:2] not in (["dmsetup", "info"], ["dmsetup", "table"], ["dmsetup", "targets"])
                and a[0] != "xl"]


TARGETS = "era              v1.0.0\nmirror           v1.14.0\nlinear           v1.4.0\n"
TOOLS = ("dmsetup", "losetup", "era_invalidate", "nbd-client", "ssh", "qemu-nbd")


def tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...] = ()) -> None:
    """A PATH with exactly the tools a migration runs on both hosts, but MISSING (the agent's
    probe, in-process, looks at the same PATH)."""
    bin_ = tmp_path / "bin"
    if bin_.exists():
        for f in bin_.iterdir():
            f.unlink()
    bin_.mkdir(exist_ok=True)
    for t in TOOLS:
        if t not in missing:
            (bin_ / t).write_text("#!/bin/sh\nexit 0\n")
            (bin_ / t).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
