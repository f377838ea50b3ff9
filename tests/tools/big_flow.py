"""The whole flow on a disk of any size in the two-host rig, with every dmmig process's peak
memory: tests/kernel/test_big_disk.py runs it at 2 TiB, bench/big_disk.py at 128 MiB and 2 TiB
side by side.

The origin is a sparse file on host a's tmpfs behind a loop device; only the blocks the
oracle writes exist. The destination is created by `dmmig copy --create` on a tmpfs of its
own on host b, sized past the disk (tmpfs takes memory only for what is written). The oracle
(tests/tools/oracle.py) writes three 8 MiB areas (the start, the middle, the end) before
prepare and again during the copy rounds and across the cutover, and checks both disks there.
Every dmmig command on a, and every agent dmmig runs on b (--remote-dmmig is a wrapper), runs
under tests/tools/rss.py, which records its peak RSS (and its waited children's).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tests.rig.pair import B_IP, SSH_OPTS
from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
RSS = str(ROOT / "tests" / "tools" / "rss.py")
AREA = 2048   # 4 KiB blocks: 8 MiB per written area
MiB = 1 << 20


@dataclass
class Flow:
    a: UmlHost
    b: UmlHost
    name: str
    size: int                                  # bytes
    copy_timeout: float = 600
    block_size: str | None = None              # prepare --block-size (None: dmmig chooses)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)   # bounds broken, in order

    def __post_init__(self) -> None:
        a = self.a
        self.src_file = f"/dev/shm/{self.name}.img"
        self.mnt = f"/dev/shm/{self.name}-dst"
        self.dest = f"{self.mnt}/disk.img"
        self.log_a = f"/run/{self.name}-rss.log"
        self.log_b = f"/run/{self.name}-rss-b.log"
        self.remote = f"{a.shared}/{self.name}-bin/dmmig"   # hostfs: b runs it too
        blocks = self.size // 4096
        self.areas = [(0, AREA), (blocks // 2, blocks // 2 + AREA), (blocks - AREA, blocks)]
        self.recs = [f"{a.shared}/{self.name}-rec{i}" for i in range(len(self.areas))]

    # ---- set-up and tear-down -------------------------------------------------------------
    def setup(self) -> None:
        a, b = self.a, self.b
        a.run(["truncate", "-s", str(self.size), self.src_file])
        self.loop = a.run(["losetup", "--find", "--show", self.src_file]).out.strip()
        b.run(["mkdir", "-p", self.mnt])
        b.run(["mount", "-t", "tmpfs", "-o", f"size={2 * self.size + (1 << 30)}", "dmmig-big", self.mnt])
        a.run(["mkdir", "-p", f"{a.shared}/{self.name}-bin"])
        a.run(["sh", "-c", f"cat > {self.remote} && chmod 755 {self.remote}"],
              input=f"#!/bin/sh\nexec {PY} {RSS} {self.log_b} -- {DMMIG} \"$@\"\n".encode())

    def teardown(self) -> None:
        a, b = self.a, self.b
        a.run([DMMIG, "abort", self.name], check=False)  # only if something failed half-way
        a.run([DMMIG, "unwrap", self.name, "--force"], check=False)
        a.run(["losetup", "-d", getattr(self, "loop", "/dev/null")], check=False)
        a.run(["rm", "-rf", self.src_file, self.log_a, f"{a.shared}/{self.name}-bin", *self.recs,
               *[r + ".started" for r in self.recs]], check=False)
        b.run(["rm", "-f", self.dest, self.log_b], check=False)
        b.run(["umount", self.mnt], check=False)
        b.run(["rmdir", self.mnt], check=False)

    # ---- measured commands ----------------------------------------------------------------
    def dmmig(self, step: str, *args: str, timeout: float = 300, check: bool = True) -> str:
        """dmmig ARGS on a under rss.py; the peaks of that command and of every agent on b it ran
        are added to STEP."""
        t0 = time.monotonic()
        r = self.a.run([PY, RSS, self.log_a, "--", DMMIG, *args], timeout=timeout, check=False)
        secs = time.monotonic() - t0
        s = self.steps.setdefault(step, {"seconds": 0.0, "rss_mib_a": 0.0, "rss_mib_b": 0.0, "commands": 0})
        s["seconds"] = round(s["seconds"] + secs, 2)
        s["commands"] += 1
        for host, log, key in ((self.a, self.log_a, "rss_mib_a"), (self.b, self.log_b, "rss_mib_b")):
            out = host.run(["sh", "-c", f"cat {log} 2>/dev/null; rm -f {log}"]).out
            for ln in out.splitlines():
                s[key] = max(s[key], round(json.loads(ln)["maxrss_kib"] / 1024, 1))
        if check and r.rc != 0:
            raise AssertionError(f"dmmig {' '.join(args)} exited {r.rc}\n{r.out[-2000:]}\n{r.err[-3000:]}")
        return r.out

    def write(self, count: int | None = None, rate: str | None = None, sequential: bool = False) -> list[Any]:
        """One oracle writer per area on the top device (or the loop device before wrap)."""
        dev = f"/dev/mapper/dmmig-{self.name}" if hasattr(self, "wrapped") else self.loop
        jobs = []
        for (lo, hi), rec in zip(self.areas, self.recs):
            argv = [PY, ORACLE, "write", dev, "--seed", "14", "--record", rec, "--blocks", f"{lo}:{hi}", "--resume"]
            argv += (["--count", str(count)] if count else []) + (["--rate", rate] if rate else [])
            argv += ["--zeros", "0.1"] + (["--sequential"] if sequential else [])
            jobs.append(self.a.spawn(argv))
        return jobs

    def stop(self, jobs: list[Any], signal_them: bool = True) -> None:
        for j in jobs:
            if signal_them:
                j.signal(15)
        for j in jobs:
            r = j.wait(300)
            assert r.rc == 0, f"the writer saw an error: {r.out} {r.err}"

    def check(self, host: UmlHost, dev: str) -> None:
        for (lo, hi), rec in zip(self.areas, self.recs):
            r = host.run([PY, ORACLE, "check", dev, "--seed", "14", "--record", rec, "--blocks", f"{lo}:{hi}"],
                         check=False)
            assert r.rc == 0, f"{host.name}:{dev} blocks {lo}:{hi}: {r.out}"

    def bound(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    # ---- the flow -------------------------------------------------------------------------
    def run(self) -> None:
        a, b, name = self.a, self.b, self.name
        self.stop(self.write(count=AREA, sequential=True), signal_them=False)  # every block of each area
        self.dmmig("wrap", "wrap", name, self.loop)
        self.wrapped = True
        out = self.dmmig("prepare", "prepare", name, *(["--block-size", self.block_size] if self.block_size else []))
        self.facts["prepare_says"] = out.strip().splitlines()[-1].strip()
        st = a.run(["dmsetup", "status", f"dmmig-{name}-era"]).out.split()
        used, total = (int(x) for x in st[4].split("/"))
        table = a.run(["dmsetup", "table", f"dmmig-{name}-era"]).out.split()
        block = int(table[-1]) * 512
        model = int(a.py(f"from dmmig import sizing\nprint(sizing.era_metadata_blocks(-(-{self.size} // {block})))",
                         check=False).out.strip() or 0)
        self.facts.update(era_block=block, era_blocks=-(-self.size // block), metadata_used_blocks=used,
                          metadata_total_blocks=total, metadata_model_blocks=model)
        self.bound(used * 4096 <= 64 * MiB, f"era metadata in use after prepare: {used * 4096 / MiB:.0f} MiB "
                                            "(bound 64 MiB)")
        r = a.run([DMMIG, "copy", name, f"root@{B_IP}", "--dest-disk", self.dest, "--create", "--dry-run",
                   "--rate", "100M", *SSH_OPTS], check=False)
        self.facts["copy_dry_run"] = (r.out or r.err).strip()
        self.bound(r.rc == 0 and "era metadata" in r.out and "sends" in r.out,
                   f"copy --dry-run: exit {r.rc}: {(r.err or r.out).strip()[-300:]}")
        jobs = self.write(rate="100")
        try:
            out = self.dmmig("copy", "copy", name, f"root@{B_IP}", "--dest-disk", self.dest, "--create",
                             "--remote-dmmig", self.remote, *SSH_OPTS, "--json", "--converge", "1M",
                             "--max-rounds", "3", timeout=self.copy_timeout)
            s = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")][-1]
            self.facts["copy"] = {k: s[k] for k in ("read", "sent", "zeroed", "skipped", "seconds")}
            self.facts["copy"]["rounds"] = [{k: r[k] for k in ("dirty_bytes", "seconds")} for r in s["rounds"]]
            out = self.dmmig("copy", "copy", name, "--json", "--converge", "1M", "--max-rounds", "2",
                             timeout=self.copy_timeout)
            s = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")][-1]
            self.facts["copy"]["rounds"] += [{k: r[k] for k in ("dirty_bytes", "seconds")} for r in s["rounds"]]
            out = self.dmmig("cutover", "cutover", name, "--json")
            s = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")][-1]
            self.facts["cutover"] = {k: s[k] for k in ("suspended_seconds", "resync_regions", "regions",
                                                       "resync_seconds")}
            time.sleep(2)  # writes through the mirror
        finally:
            self.stop(jobs)
        for lo, hi in self.areas:
            out = self.dmmig("verify", "verify", name, "--json", "--offset", str(lo * 4096),
                             "--length", str((hi - lo) * 4096))
            s = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")][-1]
            assert not s["mismatches"] and s["bytes"] == (hi - lo) * 4096, s
        self.check(a, self.loop)
        self.dmmig("finish", "finish", name)
        self.dmmig("unwrap", "unwrap", name)
        dloop = b.run(["losetup", "--find", "--show", "--read-only", self.dest]).out.strip()
        try:
            self.check(b, dloop)  # the oracle reads the destination on its own
            self.facts["dest_allocated_mib"] = int(b.run(["du", "-k", self.dest]).out.split()[0]) // 1024
        finally:
            b.run(["losetup", "-d", dloop])
        for step, s in self.steps.items():
            for key in ("rss_mib_a", "rss_mib_b"):
                self.bound(s[key] <= 200, f"{step}: max RSS {s[key]} MiB on {key[-1]} (bound 200 MiB)")
