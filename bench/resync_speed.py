"""The kernel's resync at cutover vs dmmig's own copier, by era block (= mirror region) size.

dm-mirror recovers one region at a time (MAX_RECOVERY 1 in dm-raid1.c): each region is one
read and one write across the NBD leg, so a resync is bound by the round trip, not by the
link's bandwidth. This puts a number on it, side by side in one rig run (two UML kernels on a
veth pair): for each transport (ssh: the leg goes through dmmig's OpenSSH tunnel; nbd: straight
to the export) and block size, the disk is copied (the anchor: dmmig copy, the same link, the
same export), then every block is written once, then the cutover resyncs all of them. Then
again with 2 ms of delay added each way (netem on both hosts' links), as on a routed network.

    .venv/bin/python -m bench.resync_speed [SIZE_MIB [TRANSPORT ...]]   (default: 32 ssh nbd)
"""
from __future__ import annotations

import sys
import tempfile

from tests.kernel.test_copy import summary
from tests.rig.pair import B_IP, SSH_OPTS, Pair
from tests.rig.uml import ROOT, UmlHost

DMMIG = str(ROOT / ".venv" / "bin" / "dmmig")
SIZES_KIB = (64, 1024)


def one(a: UmlHost, b: UmlHost, size: int, block_kib: int, transport: str) -> tuple[float, float, int]:
    """(copier MB/s, resync MB/s, regions resynced) for one block size."""
    # random data: the copier skips blocks of zeros, the kernel does not
    a.sh(f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={size} status=none && losetup /dev/loop0 /dev/shm/src")
    b.sh(f"truncate -s {size}M /dev/shm/dst && losetup /dev/loop0 /dev/shm/dst")
    try:
        a.dmmig("wrap", "rs", "/dev/loop0")
        a.dmmig("prepare", "rs", "--block-size", f"{block_kib}K")
        c = summary(a.dmmig("copy", "rs", f"root@{B_IP}", "--dest-disk", "/dev/loop0", "--remote-dmmig", DMMIG,
                         *SSH_OPTS, "--json", "--max-rounds", "1", "--transport", transport,
                         *(["--nbd-address", B_IP] if transport == "nbd" else [])).out)
        assert c["sent"] >= size << 20, c
        # every block dirty: the whole disk is out of sync at the cutover
        a.run(["dd", "if=/dev/urandom", "of=/dev/mapper/dmmig-rs", "bs=1M", f"count={size}", "oflag=direct"])
        cut = summary(a.dmmig("cutover", "rs", "--json").out)
        a.dmmig("finish", "rs")
        return c["throughput_bytes_per_s"] / 1e6, cut["resync_bytes"] / 1e6 / cut["resync_seconds"], \
            cut["resync_regions"]
    finally:
        a.sh(f"{DMMIG} abort rs; {DMMIG} unwrap rs; true", check=False)
        a.sh("losetup -d /dev/loop0; rm -f /dev/shm/src", check=False)
        b.sh("losetup -d /dev/loop0; rm -f /dev/shm/dst", check=False)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    transports = sys.argv[2:] or ["ssh", "nbd"]
    p = Pair(tempfile.mkdtemp(prefix="dmmig-bench-"))
    try:
        a, b = p.start()
        for h in (a, b):
            h.run(["modprobe", "--dirname=/run/mods", "sch_netem"])
        print(f"disk {size} MiB, two UML kernels on a veth pair; resync = the kernel's, at cutover")
        for delay in (None, "2ms"):
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "add", "dev", "vec0", "root", "netem", "delay", delay])
            rtt = a.sh(f"ping -c 5 -i 0.2 -q {B_IP} | tail -1").out.strip()
            print(f"link: {'+' + delay + ' each way' if delay else 'as is'} ({rtt})")
            for transport in transports:
                for kib in SIZES_KIB:
                    copier, resync, regions = one(a, b, size, kib, transport)
                    print(f"  --transport {transport}, block/region {kib:5d} KiB: copier {copier:6.2f} MB/s "
                          f"(anchor), kernel resync {resync:6.2f} MB/s over {regions} regions = "
                          f"{resync / copier:.2f}x the copier")
            if delay:
                for h in (a, b):
                    h.run(["tc", "qdisc", "del", "dev", "vec0", "root"])
    finally:
        p.stop()


if __name__ == "__main__":
    main()
