"""A guest's discard that spans several era blocks reaches the destination. dm (6.1 and later:
drivers/md/dm.c __process_abnormal_io) splits a discard only at target boundaries unless the
target sets max_discard_granularity, which era does not, and era_map marks the era block the bio
starts in: a discard over blocks k..k+n is recorded as block k only. The origin here is a loop
device over a file in /dev/shm, so a discard punches a hole and the blocks read as zeros."""
from __future__ import annotations

import pytest

from tests.kernel.steps import cleanup, copy_args, digest
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
    top = f"/dev/mapper/dmmig-{name}"
    a.dmmig("wrap", name, origin)
    try:
        a.dmmig("prepare", name, "--block-size", "64K")
        summary(a.dmmig(*copy_args(name, dest, "--create")).out)
        lim = limits(a, top)
        assert lim["discard_max_bytes"] > 0, lim      # the top passes discards on (blkback does too)
        # 1 MiB + 4 KiB from 96 KiB: starts mid-block 1, ends inside block 17, covers 2..16 whole
        off, length = 96 * KiB, MiB + 4 * KiB
        a.run(["blkdiscard", "-o", str(off), "-l", str(length), top])
        assert zeros(a, origin, off, length), "the origin did not discard (the test proves nothing)"
        s = summary(a.dmmig("copy", name, "--json").out)  # the rounds
        assert s["full_rounds"] >= 1, s                   # the discard made a round send the whole disk
        assert zeros(b, dest, off, length), (f"the destination kept the data the guest discarded; top limits "
                                             f"{lim}; rounds {s['rounds']}")
        assert digest(a, origin) == digest(b, dest)
        again = summary(a.dmmig("copy", name, "--json").out)  # no discard since: the delta only
        assert again["full_rounds"] == 0, again
        print("full round:", s["rounds"][0], "\nnext round:", again["rounds"][0])
    finally:
        a.dmmig("abort", name, check=False)
        cleanup(a, b, name)
        b.run(["rm", "-f", dest])


def test_a_discard_across_era_blocks_before_the_cutover_reaches_the_destination(pair, pdisks, name: str) -> None:
    """The cutover's last delta comes from era too (the mirror's log marks what era recorded
    since the last round): a discard between the last round and the swap must reach the
    destination through the kernel's resync."""
    a, b = pair
    da, _ = pdisks
    origin = da(16, fill_seed=43)
    dest = f"/dev/shm/{name}.img"
    top = f"/dev/mapper/dmmig-{name}"
    a.dmmig("wrap", name, origin)
    try:
        a.dmmig("prepare", name, "--block-size", "64K")
        summary(a.dmmig(*copy_args(name, dest, "--create")).out)
        s = summary(a.dmmig("copy", name, "--json").out)     # a round with no discard: no full one
        assert "full" not in s["rounds"][0] and s["full_rounds"] == 0, s
        off, length = 200 * KiB, 2 * MiB
        a.run(["blkdiscard", "-o", str(off), "-l", str(length), top])
        assert zeros(a, origin, off, length), "the origin did not discard (the test proves nothing)"
        c = summary(a.dmmig("cutover", name, "--json", "--nbd-timeout", "3").out)
        assert zeros(b, dest, off, length), f"the destination kept the data the guest discarded; cutover {c}"
        assert c["full_resync"] and c["resync_regions"] == c["regions"], c  # what it cost: every region
        assert digest(a, origin) == digest(b, dest)
        a.dmmig("finish", name)
    finally:
        a.dmmig("abort", name, check=False)
        cleanup(a, b, name)
        b.run(["rm", "-f", dest])
