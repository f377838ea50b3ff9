"""Copy speed, side by side in one rig run (two UML kernels on a veth pair), as ratios:

- dmmig copy (ssh and nbd transports) vs nbdcopy vs `dd bs=4M oflag=direct` to /dev/nbd0,
  all writing to the same kind of qemu-nbd export on host b;
- an era round with 1% of the disk dirty vs the full base copy;
- dmmig's peak RSS on a disk 4x larger (must stay flat).

    .venv/bin/python -m bench.copy_speed [SIZE_MIB]
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import time

from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

PY = str(ROOT / ".venv" / "bin" / "python")
ORACLE = str(ROOT / "tests" / "tools" / "oracle.py")
DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")


def timed(h: UmlHost, argv: list[str]) -> tuple[float, str]:
    t = time.monotonic()
    r = h.run(argv)
    return time.monotonic() - t, r.out + r.err


def dmmig_copy(a: UmlHost, b: UmlHost, size: int, transport: str) -> tuple[float, int, dict]:
    a.sh(f"truncate -s {size}M /dev/shm/src && losetup /dev/loop0 /dev/shm/src")
    a.run([PY, ORACLE, "fill", "/dev/loop0", "--seed", "1"])
    b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    a.dmmig("wrap", "bench", "/dev/loop0")
    a.dmmig("prepare", "bench")
    extra = ["--transport", "nbd", "--nbd-address", B_IP] if transport == "nbd" else []
    t = time.monotonic()
    r = a.run(["/usr/bin/time", "-f", "RSS %M", DMMIG, "copy", "bench", f"root@{B_IP}", "--dest-disk", "/dev/loop0",
               "--remote-dmmig", DMMIG, *SSH_OPTS, "--json", *extra])
    secs = time.monotonic() - t
    rss = int(re.search(r"RSS (\d+)", r.err).group(1))  # type: ignore[union-attr]
    summ = json.loads(r.out.strip().splitlines()[-1])
    # one era round with 1% of the disk dirty. The writes stay inside 1% of the disk: random
    # 4 KiB writes spread over all of it would dirty 16x as many 64 KiB era blocks
    blocks = size * 256 // 100
    a.run([PY, ORACLE, "write", "/dev/mapper/dmmig-bench", "--record", "/dev/shm/rec", "--count", str(4 * blocks),
           "--blocks", f"0:{blocks}"])
    t = time.monotonic()
    r2 = a.run([DMMIG, "copy", "bench", "--json"])
    round_secs = time.monotonic() - t
    summ["round"] = json.loads(r2.out.strip().splitlines()[-1])
    summ["round_wall"] = round_secs
    a.dmmig("abort", "bench")
    a.dmmig("unwrap", "bench")
    a.sh("losetup -d /dev/loop0; rm -f /dev/shm/src /dev/shm/rec*")
    b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst")
    return secs, rss, summ


def anchors(a: UmlHost, b: UmlHost, size: int) -> tuple[float, float]:
    a.sh(f"truncate -s {size}M /dev/shm/src && losetup /dev/loop0 /dev/shm/src")
    a.run([PY, ORACLE, "fill", "/dev/loop0", "--seed", "1"])
    b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    b.run(["qemu-nbd", "--fork", "--pid-file=/run/bench-nbd.pid", "--persistent", "--shared=8", "--format=raw",
           "--cache=directsync", f"--bind={B_IP}", "--port=10809", "--export-name=x", "/dev/loop0"])
    try:
        nbdcopy, _ = timed(a, ["nbdcopy", "/dev/loop0", f"nbd://{B_IP}:10809/x"])
        a.run(["nbd-client", B_IP, "10809", "/dev/nbd0", "-N", "x", "-b", "4096", "-t", "30"])
        try:
            dd, _ = timed(a, ["dd", "if=/dev/loop0", "of=/dev/nbd0", "bs=4M", "oflag=direct", "iflag=direct"])
        finally:
            a.run(["nbd-client", "-d", "/dev/nbd0"])
    finally:
        b.sh("kill $(cat /run/bench-nbd.pid); sleep 0.5; losetup -d /dev/loop0; rm -f /dev/shm/dst")
        a.sh("losetup -d /dev/loop0; rm -f /dev/shm/src")
    return nbdcopy, dd


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        nbdcopy, dd = anchors(a, b, size)
        res = {t: dmmig_copy(a, b, size, t) for t in ("nbd", "ssh")}
        big = dmmig_copy(a, b, size * 4, "nbd")
        print(f"disk {size} MiB, two UML kernels on a veth pair")
        print(f"  nbdcopy            {nbdcopy:6.2f}s  (anchor)")
        print(f"  dd 4M direct->nbd0 {dd:6.2f}s  ({dd / nbdcopy:.2f}x nbdcopy)")
        for t, (secs, rss, s) in res.items():
            print(f"  dmmig copy --transport {t}: {secs:6.2f}s wall, base {s['seconds']:.2f}s "
                  f"({secs / nbdcopy:.2f}x nbdcopy, {secs / dd:.2f}x dd); peak RSS {rss / 1024:.0f} MiB")
            r = s["round"]
            print(f"    era round with 1% dirty: {r['seconds']:.2f}s copying, {s['round_wall']:.2f}s wall "
                  f"({r['read'] >> 10} KiB read) = {100 * r['seconds'] / s['seconds']:.1f}% of the base copy time "
                  f"({100 * s['round_wall'] / secs:.1f}% wall)")
        print(f"  peak RSS at {size * 4} MiB (nbd): {big[1] / 1024:.0f} MiB "
              f"vs {res['nbd'][1] / 1024:.0f} MiB at {size} MiB")
    finally:
        p.stop()


if __name__ == "__main__":
    main()
