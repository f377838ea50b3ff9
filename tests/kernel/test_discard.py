"""A guest's discard that spans several era blocks reaches the destination, without a full round
or a full resync. dm hands a discard to era whole within a target (drivers/md/dm.c
__send_changing_extent_only) and era_map marks only the era block the bio starts in; but
dm_split_and_process_bio cuts a discard to the device's own queue limits first
(bio_split_to_limits), at discard_granularity boundaries. prepare writes the era device's
discard_max_bytes down to its granularity: each piece lies in one era block, and era marks
them all. The cutover sets the NBD leg's discard_max_bytes to 0: the mirror, and the top over
it, take no discard (dm-raid1 would not hold one for a region under recovery). The origin is a
loop device over a file in /dev/shm, so a discard punches a hole and the blocks read as zeros."""
from __future__ import annotations

import os
import time

import pytest

from tests.kernel.steps import DMMIG, cleanup, copy_args, digest, status
from tests.rig.output import summary

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
KiB, MiB = 1 << 10, 1 << 20


def limits(h, dev: str) -> dict[str, int]:
    q = f"/sys/class/block/$(basename $(readlink -f {dev}))/queue"
    out = h.sh(f"for f in discard_max_bytes discard_granularity; do echo $f $(cat {q}/$f); done").out
    return {k: int(v) for k, v in (ln.split() for ln in out.splitlines())}


def zeros(h, path: str, off: int, length: int) -> bool:
    """Whether PATH reads as zeros over [OFF, OFF+LENGTH) (a device below any page cache)."""
    direct = "" if path.startswith("/dev/shm/") else "iflag=direct"  # tmpfs refuses O_DIRECT
    read = f"dd if={path} bs=4096 skip={off // 4096} count={length // 4096} {direct} status=none"
    res = h.sh(f"{read} | wc -c; {read} | tr -d '\\000' | wc -c").out.split()
    assert int(res[0]) == length // 4096 * 4096, f"read {res[0]} bytes of {path}"
    return int(res[1]) == 0


def test_a_discard_across_era_blocks_during_the_rounds_reaches_the_destination(pair, pdisks, name: str) -> None:
    a, b = pair
    da, _ = pdisks
    origin = da(16, fill_seed=41)          # every block holds data
    dest = f"/dev/shm/{name}.img"
    top, era = f"/dev/mapper/dmmig-{name}", f"/dev/mapper/dmmig-{name}-era"
    a.dmmig("wrap", name, origin)
    try:
        unit = limits(a, origin)["discard_granularity"]
        a.dmmig("prepare", name, "--block-size", "64K")
        # era's limit is its granularity; the top, loaded over era after it was set, stacked it
        assert limits(a, era) == limits(a, top) == {"discard_max_bytes": unit, "discard_granularity": unit}, \
            (limits(a, era), limits(a, top))
        summary(a.dmmig(*copy_args(name, dest, "--create")).out)
        # 1 MiB + 4 KiB from 96 KiB: starts mid-block 1, ends inside block 17, covers 2..16 whole
        off, length = 96 * KiB, MiB + 4 * KiB
        a.run(["blkdiscard", "-o", str(off), "-l", str(length), top])
        assert zeros(a, origin, off, length), "the origin did not discard (the test proves nothing)"
        s = summary(a.dmmig("copy", name, "--json").out)  # the rounds
        assert zeros(b, dest, off, length), (f"the destination kept the data the guest discarded; top limits "
                                             f"{limits(a, top)}; rounds {s['rounds']}")
        assert s["full_rounds"] == 0, s                   # era marked every block: the delta only
        assert s["rounds"][0]["dirty_bytes"] == 17 * 64 * KiB, s["rounds"][0]  # blocks 1..17
        assert digest(a, origin) == digest(b, dest)
        assert limits(a, top)["discard_max_bytes"] == unit  # the rounds' suspends kept it
    finally:
        a.dmmig("abort", name, check=False)
        cleanup(a, b, name)
        b.run(["rm", "-f", dest])


def test_discards_before_and_during_the_cutover_neither_resync_the_disk_nor_reach_the_mirror(
        pair, pdisks, name: str) -> None:
    """The cutover's last delta comes from era too: a discard between the last round and the swap
    is in it (the resync covers its regions only). After the swap the top takes no discard: one
    while the kernel resyncs fails with EOPNOTSUPP (blkback answers a guest the same), and the
    mirror stays clean."""
    a, b = pair
    da, _ = pdisks
    origin = da(32, fill_seed=43)
    dest = f"/dev/shm/{name}.img"
    top = f"/dev/mapper/dmmig-{name}"
    a.dmmig("wrap", name, origin)
    try:
        a.dmmig("prepare", name, "--block-size", "64K")
        summary(a.dmmig(*copy_args(name, dest, "--create")).out)
        s = summary(a.dmmig("copy", name, "--json").out)     # a round with no discard
        assert s["full_rounds"] == 0, s
        off, length = 200 * KiB, 2 * MiB
        a.run(["blkdiscard", "-o", str(off), "-l", str(length), top])
        assert zeros(a, origin, off, length), "the origin did not discard (the test proves nothing)"
        # a delta the kernel takes a while to resync, so the discard below lands during it
        a.run(["dd", "if=/dev/urandom", f"of={top}", "bs=1M", "seek=8", "count=24", "oflag=direct",
               "status=none"])
        job = a.spawn([DMMIG, "cutover", name, "--json", "--nbd-timeout", "3"])
        t0 = time.monotonic()
        while " mirror " not in a.run(["dmsetup", "table", f"dmmig-{name}"]).out:
            assert not job.done() and time.monotonic() - t0 < 120, "the cutover never swapped to the mirror"
            time.sleep(0.05)
        d = a.run(["blkdiscard", "-o", str(4 * MiB), "-l", str(MiB), top], check=False)
        syncing = a.run(["dmsetup", "status", f"dmmig-{name}"]).out
        top_limit = limits(a, top)
        res = job.wait(300)
        assert res.rc == 0, (res.out, res.err)
        c = summary(res.out)
        print("discard during the mirror:", d.rc, d.err.strip(), "\nmirror status then:", syncing)
        assert d.rc != 0 and "Operation not supported" in d.err, (d.rc, d.out, d.err)
        assert top_limit["discard_max_bytes"] == 0, top_limit      # the mirror over the NBD leg has none
        leg = os.path.basename(status(a, name)["journal"]["mirror"]["nbd"])
        assert limits(a, f"/dev/{leg}")["discard_max_bytes"] == 0
        assert not zeros(a, origin, 4 * MiB, MiB)                 # the refused discard did nothing
        assert zeros(b, dest, off, length), f"the destination kept the data the guest discarded; cutover {c}"
        assert not c["full_resync"] and c["resync_regions"] < c["regions"], c  # the delta's regions only
        v = a.dmmig("verify", name, "--json", check=False)
        assert v.rc == 0 and summary(v.out)["mismatches"] == [], v.out
        assert digest(a, origin) == digest(b, dest)
        a.dmmig("finish", name)
        assert limits(a, top)["discard_max_bytes"] > 0          # linear over the origin again: discards back
    finally:
        a.dmmig("abort", name, check=False)
        cleanup(a, b, name)
        b.run(["rm", "-f", dest])
