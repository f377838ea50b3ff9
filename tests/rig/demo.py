"""The README's demo: a whole migration between two simulated hosts (two user-mode-linux
kernels on a veth pair, a real sshd on the destination) while a guest-like O_DIRECT writer
writes the disk: wrap, prepare, copy, cutover to the mirror, writes in mirror mode, verify,
the handover gate, finish. The result is checked against the writer's own record, read back on the destination.

    ./install.sh demo
"""
from __future__ import annotations

import json
import tempfile
import time

from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT

PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")


def step(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def main() -> int:
    t0 = time.monotonic()
    p = Pair(tempfile.mkdtemp(prefix="dmmig-demo-"))
    try:
        a, b = p.start()
        step(f"two rig hosts up (a {a.boot_seconds:.1f}s, b {b.boot_seconds:.1f}s); sshd on b", t0)
        a.sh("truncate -s 128M /dev/shm/vm1.img && losetup /dev/loop0 /dev/shm/vm1.img")
        a.run([PY, ORACLE, "fill", "/dev/loop0", "--seed", "42"])
        b.sh("truncate -s 128M /dev/shm/vm1.img && losetup /dev/loop0 /dev/shm/vm1.img")
        step("source disk a:/dev/loop0 (128 MiB, filled); destination b:/dev/loop0", t0)
        top = a.dmmig("wrap", "vm1", "/dev/loop0").out.strip()
        step(f"dmmig wrap vm1 -> {top}", t0)
        rec = f"{a.shared}/rec"  # on hostfs, so the checker on b can read it
        w = a.spawn([PY, ORACLE, "write", top, "--seed", "42", "--record", rec, "--rate", "500", "--blocks", "0:4096"])
        time.sleep(1)
        step("a writer is writing 4 KiB blocks to the top device with O_DIRECT (500/s, in its first 16 MiB)", t0)
        a.dmmig("prepare", "vm1")
        step("dmmig prepare vm1: dm-era inserted live", t0)
        t1 = time.monotonic()
        out = a.dmmig("copy", "vm1", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG,
                      *SSH_OPTS, "--converge", "1M", "--max-rounds", "3").out
        step(f"dmmig copy vm1 over SSH in {time.monotonic() - t1:.1f}s, the writer still writing:\n"
             + out.rstrip(), t0)
        t1 = time.monotonic()
        out = a.dmmig("cutover", "vm1").out
        step(f"dmmig cutover vm1 in {time.monotonic() - t1:.1f}s, the writer still writing:\n" + out.rstrip(), t0)
        time.sleep(3)
        w.signal(15)
        res = json.loads(w.wait().out)
        step(f"3 s of writes in mirror mode, then the writer stopped: {res['writes']} writes, "
             f"{len(res['errors'])} errors, slowest {res['max_latency_ms']:.0f} ms", t0)
        t1 = time.monotonic()
        job = a.spawn([DMMIG, "handover", "vm1", "--timeout", "60"])
        ask = b.py("import json\nfrom dmmig.core import gate\nprint(json.dumps(gate.ask('/run/dmmig', 'vm1', 35)))",
                   check=False)
        ho = job.wait(120)
        step(f"handover gate in {time.monotonic() - t1:.1f}s (what the destination's block script asks while "
             f"xl migrate has the guest suspended): destination got {ask.out.strip() or ask.err.strip()}; "
             f"source: {ho.out.strip() or ho.err.strip()}", t0)
        t1 = time.monotonic()
        v = a.dmmig("verify", "vm1", check=False)
        step(f"dmmig verify vm1 (digests on each side) in {time.monotonic() - t1:.1f}s:\n" + v.out.rstrip(), t0)
        chk = json.loads(b.run([PY, ORACLE, "check", "/dev/loop0", "--seed", "42", "--record", rec],
                               check=False).out)
        da = a.run([PY, ORACLE, "digest", "/dev/loop0"]).out.strip()
        db = b.run([PY, ORACLE, "digest", "/dev/loop0"]).out.strip()
        ok = chk["mismatches"] == 0 and da == db and v.rc == 0 and not res["errors"] and ho.rc == 0
        step(f"checked independently: the destination holds every acknowledged write "
             f"({chk['written_blocks']} blocks written, {chk['mismatches']} mismatches); sha256 source {da[:16]} "
             f"destination {db[:16]} -> {'EQUAL' if da == db else 'DIFFERENT'}", t0)
        out = a.dmmig("finish", "vm1", "--remove").out
        step("dmmig finish vm1 --remove (the new owner has the disk):\n" + out.rstrip(), t0)
        left = a.run(["dmsetup", "ls"]).out.strip()
        step(f"left on the source: dm devices: {left or 'none'}", t0)
        print("DEMO " + ("PASSED" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
