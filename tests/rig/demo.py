"""The README's demo: two simulated hosts (two user-mode-linux kernels on a veth pair, a real
sshd on the destination), a guest-like O_DIRECT writer on the source disk, and dmmig copying
that disk to the destination while it is being written.

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
        step(f"dmmig copy vm1 over SSH in {time.monotonic() - t1:.1f}s:\n" + out.rstrip(), t0)
        w.signal(15)
        step("writer stopped: " + w.wait().out.strip(), t0)
        out = a.dmmig("copy", "vm1").out
        step("final round after the writer stopped:\n" + out.rstrip(), t0)
        chk = json.loads(b.run([PY, ORACLE, "check", "/dev/loop0", "--seed", "42", "--record", rec],
                               check=False).out)
        da = a.run([PY, ORACLE, "digest", "/dev/loop0"]).out.strip()
        db = b.run([PY, ORACLE, "digest", "/dev/loop0"]).out.strip()
        ok = chk["mismatches"] == 0 and da == db
        step(f"verified: destination holds every acknowledged write ({chk['written_blocks']} blocks written, "
             f"{chk['mismatches']} mismatches); sha256 source {da[:16]} destination {db[:16]} -> "
             f"{'EQUAL' if da == db else 'DIFFERENT'}", t0)
        a.dmmig("abort", "vm1")
        a.dmmig("unwrap", "vm1")
        step("cleaned up (abort: era removed, destination export stopped; unwrap)", t0)
        print("DEMO " + ("PASSED" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
