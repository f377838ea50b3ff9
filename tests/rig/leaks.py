"""What a kernel test may leave behind: nothing. Snapshot before, compare after."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tests.rig.kernel_log import KMSG
from tests.rig.uml import UmlHost, venv_python

SNAPSHOT = KMSG + r"""
import json, os, subprocess, sys
def sh(*a):
    return subprocess.run(a, capture_output=True, text=True).stdout
dm = [l.split()[0] for l in sh("dmsetup", "ls").splitlines() if l.strip() and "No devices" not in l]
loops = [l.split(":")[0] for l in sh("losetup", "-a").splitlines() if l.strip()]
nbds = sorted(d for d in os.listdir("/sys/block") if d.startswith("nbd") and os.path.exists(f"/sys/block/{d}/pid"))
procs = []
me = os.getpid()
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) in (me, os.getppid()):
        continue
    try:
        st = open(f"/proc/{p}/stat").read()
        cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        continue
    ppid = int(st.rsplit(")", 1)[1].split()[1])
    if int(p) == 2 or ppid == 2 or not cmd:   # kernel threads
        continue
    try:  # udevd's workers come and go on their own
        if "systemd-udevd" in open(f"/proc/{ppid}/cmdline").read():
            continue
    except OSError:
        pass
    procs.append([int(p), cmd])
# every file below the state dir (the exports' sockets and TLS keys are one level down, in
# nbd/, which itself stays: it is the root-only home of all exports), but the disks' locks and
# the generations a finished migration records on both hosts (NAME.warm.json: what a warm copy
# back needs, kept by design until `dmmig forget`; tests/kernel/test_warm.py checks them)
state = []
for d, dirs, files in os.walk("/run/dmmig"):
    rel = os.path.relpath(d, "/run/dmmig")
    for f in files + [x for x in dirs if rel != "." or x != "nbd"]:
        p = os.path.normpath(os.path.join(rel, f))
        if not p.endswith((".lock", ".warm.json")):
            state.append(p)
state.sort()
print(json.dumps({"dm": dm, "loops": loops, "nbd": nbds, "procs": procs, "state": state,
                  "kmsg": kmsg(int(sys.argv[1]) if len(sys.argv) > 1 else None)}))
"""


@dataclass
class Snapshot:
    dm: set[str]
    loops: set[str]
    nbd: set[str]
    procs: dict[int, str]
    state: set[str]
    kmsg_last: int = -1   # the kernel log's last record
    kmsg_lines: list[str] = field(default_factory=list)  # the log's lines after KMSG_SINCE


def snapshot(host: UmlHost, kmsg_since: int | None = None) -> Snapshot:
    return snapshots([host], {host.name: kmsg_since})[host.name]


def snapshots(hosts: list[UmlHost], kmsg_since: dict[str, int | None] | None = None) -> dict[str, Snapshot]:
    """snapshot() of every host in HOSTS at once (each host its own kernel and CPU; every
    kernel test takes two of these rounds), by host name."""
    since = kmsg_since or {}
    jobs = [(h, h.spawn([venv_python(), "-c", SNAPSHOT, *([] if since.get(h.name) is None
                                                           else [str(since[h.name])])], timeout=300))
            for h in hosts]
    out = {}
    for h, job in jobs:
        d = json.loads(job.wait(330).check().out)
        out[h.name] = Snapshot(set(d["dm"]), set(d["loops"]), set(d["nbd"]), {p: c for p, c in d["procs"]},
                               set(d["state"]), d["kmsg"]["last"], d["kmsg"]["lines"])
    return out


def leaks(before: Snapshot, after: Snapshot) -> list[str]:
    out = []
    out += [f"dm device {n}" for n in sorted(after.dm - before.dm)]
    out += [f"loop device {n}" for n in sorted(after.loops - before.loops)]
    out += [f"nbd attachment {n}" for n in sorted(after.nbd - before.nbd)]
    out += [f"process {p} ({c})" for p, c in sorted(after.procs.items()) if p not in before.procs]
    out += [f"state file /run/dmmig/{n}" for n in sorted(after.state - before.state)]
    return out


def clean(host: UmlHost, before: Snapshot, after: Snapshot) -> None:
    """Remove what a failed test leaked so the next test starts clean."""
    for p in after.procs:
        if p not in before.procs:
            host.run(["kill", "-9", str(p)], check=False)
    for n in after.nbd - before.nbd:
        host.run(["nbd-client", "-d", f"/dev/{n}"], check=False)
    for _ in range(3):  # stacked devices: remove top first, retry what was still held
        for n in sorted(after.dm - before.dm):
            host.run(["dmsetup", "resume", n], check=False)
            host.run(["dmsetup", "remove", "--force", n], check=False)
    for n in after.loops - before.loops:
        host.run(["losetup", "-d", n], check=False)
    for n in after.state - before.state:
        host.run(["rm", "-rf", f"/run/dmmig/{n}"], check=False)
