"""Steps the kernel tests share: the oracle writer and checker, dmmig's verbs as a test runs
them on the rig's hosts, the faults they inject. Test modules import these from here, never
from one another."""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from dmmig.core import gate
from tests.conftest import ORACLE, python
from tests.rig.output import summary
from tests.rig.pair import B_IP, SSH_OPTS
from tests.rig.uml import ROOT, Result, UmlHost


def start_writer(rig: UmlHost, dev: str, record: str, seed: int = 7, **kw: str) -> object:
    # KEY="" is a flag without a value (sequential="", resume="")
    extra = [x for k, v in kw.items() for x in ((f"--{k}",) if v == "" else (f"--{k}", v))]
    job = rig.spawn([python(), ORACLE, "write", dev, "--seed", str(seed), "--record", record, *extra])
    for _ in range(100):  # wait until it really writes
        if rig.run(["test", "-e", record + ".started"], check=False).rc == 0:
            break
        time.sleep(0.1)
    return job


def stop_writer(rig: UmlHost, job: object) -> dict:
    job.signal(15)  # type: ignore[attr-defined]
    res = job.wait(120)  # type: ignore[attr-defined]
    assert res.rc == 0, f"the writer saw an error: {res.out} {res.err}"
    return json.loads(res.out)


DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")


def copy_args(name: str, dest_disk: str, *extra: str) -> list[str]:
    return ["copy", name, f"root@{B_IP}", "--dest-disk", dest_disk, "--remote-dmmig", DMMIG,
            *SSH_OPTS, "--json", *extra]


def digest(h: UmlHost, dev: str) -> str:
    return h.run([python(), ORACLE, "digest", dev]).out.strip()


def world(a: UmlHost, b: UmlHost) -> tuple[str, ...]:
    return (a.run(["dmsetup", "table"]).out, a.sh("cat /run/dmmig/*.json 2>/dev/null; true").out,
            b.run(["dmsetup", "table"]).out, b.sh("ls /run/dmmig; pgrep -a qemu-nbd; true").out)


def status(h: UmlHost, name: str) -> dict:
    return json.loads(h.dmmig("status", name, "--json").out)


def statuses(h: UmlHost) -> dict[str, dict]:
    """`dmmig status --json` of every disk on H, by name: one dmmig process for all of them."""
    out = json.loads(h.dmmig("status", "--json").out)
    return {st["name"]: st for st in out}


def check(h: UmlHost, dev: str, seed: int, *records: str) -> None:
    argv = [python(), ORACLE, "check", dev, "--seed", str(seed)]
    for r in records:
        argv += ["--record", r]
    res = h.run(argv, check=False)
    assert res.rc == 0, res.out


def migrate_to_mirror(a: UmlHost, name: str, origin: str, dest: str, *extra: str) -> dict:
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    a.dmmig(*copy_args(name, dest, "--converge", "1M", "--max-rounds", "4", *extra))
    return summary(a.dmmig("cutover", name, "--json", "--nbd-timeout", "3").out)


def cleanup(a: UmlHost, b: UmlHost, name: str, *files: str) -> None:
    a.dmmig("unwrap", name)
    if files:
        a.run(["rm", "-f", *files, *(f + ".started" for f in files)])
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0, "the destination's export is still running"


def retarget(h: UmlHost, name: str, target: str) -> None:
    """Swap, live, the table of a dm device of the test's own for TARGET (the table line after
    its start and length) over the same device underneath, named {under} in TARGET."""
    n = h.run(["blockdev", "--getsz", f"/dev/mapper/{name}"]).out.strip()
    under = h.run(["dmsetup", "table", name]).out.split()[3]
    h.run(["dmsetup", "load", name, "--table", f"0 {n} " + target.format(under=under)])
    h.run(["dmsetup", "resume", name])


def inject(b: UmlHost, how: str, flakey: str | None) -> None:
    if how == "kill-server":
        b.run(["pkill", "-9", "qemu-nbd"])
    elif how == "link-down":
        b.run(["ip", "link", "set", "vec0", "down"])
    else:
        assert flakey
        retarget(b, flakey, "flakey {under} 0 0 5 1 error_writes")


def wait_leg_failed(a: UmlHost, name: str, timeout: float = 40) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(a, name)
        m = st["devices"][f"dmmig-{name}"].get("mirror", {})
        if m and not m["healthy"] and m.get("failed_at"):
            return st
        time.sleep(0.5)
    raise AssertionError(f"no leg failure reported: {st}")


KILL_WHEN_SUSPENDED = r"""
import os, signal, subprocess, sys, time
dm, argv = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while p.poll() is None:
    if open(f"/sys/block/{dm}/dm/suspended").read().strip() == "1":
        p.send_signal(signal.SIGKILL)
        p.wait()
        print("killed while suspended")
        break
print("rc", p.wait())
"""


def wait_resumed(h: UmlHost, dm: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while h.run(["cat", f"/sys/block/{dm}/dm/suspended"]).out.strip() != "0":
        assert time.monotonic() < deadline, f"{dm} still suspended {timeout}s after dmmig died"
        time.sleep(0.2)


ASK = r"""
import json, sys, time
from dmmig.core import gate
t = time.monotonic()
try:
    rep = gate.ask(sys.argv[1], sys.argv[2], float(sys.argv[3]))
except gate.GateRefused as e:
    print(json.dumps({"refused": e.message, "seconds": time.monotonic() - t}))
    sys.exit(3)
print(json.dumps(dict(rep, seconds=time.monotonic() - t)))
"""


def ask(b: UmlHost, name: str, timeout: float) -> tuple[int, dict]:
    r = b.py(ASK, "/run/dmmig", name, str(timeout), check=False)
    return r.rc, json.loads(r.out)


def handover(a: UmlHost, b: UmlHost, name: str, *, timeout: float = 60, ask_s: float = 35,
             before_ask: Callable[[], object] | None = None) -> tuple[int, dict, Result]:
    """The handover step as `dmmig migrate` runs it: a's `dmmig handover NAME` waits for the
    gate, b asks as block-dmmig's `add` does (BEFORE_ASK: called first, once b's gate for NAME
    listens). Returns (the ask's exit code, its reply, the handover's result); the caller
    asserts what it expects."""
    job = a.spawn([DMMIG, "handover", name, "--json", "--timeout", f"{timeout:.0f}"])
    if before_ask is not None:
        sock = gate.socket_path("/run/dmmig", name)
        for _ in range(150):
            if b.run(["test", "-S", sock], check=False).rc == 0:
                break
            assert not job.done(), job.wait(5)  # type: ignore[attr-defined]
            time.sleep(0.2)
        before_ask()
    rc, rep = ask(b, name, ask_s)
    return rc, rep, job.wait(120)


def hand_over(a: UmlHost, b: UmlHost, name: str, before_ask: Callable[[], object] | None = None) -> dict:
    """handover() that must say yes on both sides: the handover's journaled record."""
    rc, rep, res = handover(a, b, name, before_ask=before_ask)
    assert rc == 0 and rep["ok"], rep
    assert res.rc == 0, res.err
    return summary(res.out)
