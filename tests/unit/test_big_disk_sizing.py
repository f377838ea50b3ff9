"""Issue 14 part 3 without a kernel: the era block chosen from the disk size, the era metadata
model against what real era devices used in the rig, the sparse layout of a real file, the
copier over holes (real qemu-nbd), and the dry-run estimates of `copy` and `migrate`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmmig import sizing
from dmmig.adapters import sparse
from dmmig.errors import BadInput
from dmmig.flows import copying
from tests.unit.fakes import World

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("disk,block", [(128 * MiB, 64 * KiB), (256 * GiB, 64 * KiB), (257 * GiB, 128 * KiB),
                                        (1 * TiB, 256 * KiB), (2 * TiB, 512 * KiB), (8 * TiB, 2 * MiB),
                                        (64 * TiB, 16 * MiB)])
def test_the_default_era_block_grows_with_the_disk(disk: int, block: int) -> None:
    c = sizing.choose_block(disk)
    assert (c.block_bytes, c.chosen, c.warning) == (block, True, None)
    assert c.nr_blocks <= sizing.AUTO_MAX_BLOCKS
    assert c.metadata_bytes <= 17 * MiB and c.metadata_file <= 40 * MiB
    assert "chosen for a" in c.describe()


def test_an_explicit_block_is_honoured_warned_about_or_refused() -> None:
    c = sizing.choose_block(2 * TiB, 64 * KiB)  # the old default: 32 Mi blocks
    assert (c.block_bytes, c.nr_blocks, c.chosen) == (64 * KiB, 32 * 2**20, False)
    assert c.warning and "without --block-size dmmig would use 512 KiB" in c.warning
    assert "(--block-size)" in c.describe()
    assert sizing.choose_block(2 * TiB, 256 * KiB).warning is None
    with pytest.raises(BadInput, match="fewer than 2.31"):
        sizing.choose_block(8 * TiB, 4 * KiB)
    with pytest.raises(BadInput, match="space map holds at most 15.9 GiB"):
        sizing.choose_block(8 * TiB - 4 * KiB, 4 * KiB)


# `dmsetup status` of real era devices in the rig, right after prepare: (disk, block, used
# metadata blocks); the 2 TiB / 512 KiB one again in tests/kernel/test_big_disk.py
MEASURED = [(128 * MiB, 64 * KiB, 11), (2 * TiB, 64 * KiB, 34143), (2 * TiB, 128 * KiB, 17076),
            (2 * TiB, 256 * KiB, 8543), (2 * TiB, 512 * KiB, 4274), (2 * TiB, 1 * MiB, 2142),
            (8 * TiB, 1 * MiB, 8543)]


@pytest.mark.parametrize("disk,block,used", MEASURED)
def test_the_metadata_model_matches_real_era_devices(disk: int, block: int, used: int) -> None:
    model = sizing.era_metadata_blocks(sizing.nr_blocks(disk, block))
    assert abs(model - used) <= max(2, used // 1000), (model, used)
    # the device dmmig makes holds that twice over (a snapshot pins the old array blocks)
    assert sizing.metadata_file_bytes(sizing.nr_blocks(disk, block)) >= 2 * used * 4096


def sparse_file(path: Path, size: int, data: list[tuple[int, int]]) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(os.urandom(n))
    return b""


def test_layout_of_a_real_sparse_file(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    sparse_file(p, 64 * GiB, [(0, 4096), (5 * MiB + 100, 10), (32 * GiB, 3 * MiB), (64 * GiB - 4096, 4096)])
    fd = os.open(p, os.O_RDONLY)
    lay = sparse.FileLayout(str(p), fd, 0, 64 * GiB)
    try:
        pieces = list(lay.pieces(0, 64 * GiB))
        # in order, no gap, no overlap, covering the range
        pos = 0
        for off, n, _ in pieces:
            assert off == pos and n > 0
            pos += n
        assert pos == 64 * GiB
        data = [(off, n) for off, n, d in pieces if d]
        # every written byte is inside a data run; runs are widened to 64 KiB, not more
        for off, n in [(0, 4096), (5 * MiB + 100, 10), (32 * GiB, 3 * MiB), (64 * GiB - 4096, 4096)]:
            assert any(b <= off and off + n <= b + m for b, m in data), (off, data)
        assert lay.data_bytes(0, 64 * GiB) <= 4 * 64 * KiB + 3 * MiB + 2 * 64 * KiB
        # a sub-range: the same answer, clipped
        assert list(lay.pieces(32 * GiB, 32 * GiB + MiB)) == [(32 * GiB, MiB, True)]
        assert list(lay.pieces(40 * GiB, 41 * GiB)) == [(40 * GiB, GiB, False)]
        # with a loop offset: device byte B is file byte OFFSET + B
        lay.offset, lay.size = 32 * GiB, 32 * GiB
        assert list(lay.pieces(0, MiB)) == [(0, MiB, True)]
    finally:
        lay.close()


def test_the_copier_reads_no_hole_and_zeroes_them_on_a_destination_not_known_zero(tmp_path: Path) -> None:
    nbd = pytest.importorskip("nbd")  # noqa: F841
    from dmmig.core.copier import Copier
    from tests.unit.test_copy_engine import start
    size = 3 * GiB + 5 * MiB
    src = tmp_path / "src.img"
    sparse_file(src, size, [(MiB, 2 * MiB), (3 * GiB + MiB, MiB)])
    dest, sock = tmp_path / "dest.img", tmp_path / "nbd.sock"
    proc, h = start(dest, sock, size)
    for off in (0, 2 * GiB, size - 4096):  # garbage where the source has holes
        h.pwrite(os.urandom(4096), off)  # type: ignore[attr-defined]
    fd = os.open(src, os.O_RDONLY)
    lay = sparse.FileLayout(str(src), fd, 0, size)
    try:
        c = Copier(str(src), h, dest_zero=False, layout=lay.pieces).copy([(0, size)])
    finally:
        lay.close()
        h.shutdown()  # type: ignore[attr-defined]
        proc.wait(10)
    assert c.read <= 3 * MiB + 4 * 64 * KiB  # the data runs, not 3 GiB
    assert c.read + c.zeroed == size and c.skipped == 0
    with open(src, "rb") as a, open(dest, "rb") as b:
        for off in (0, MiB, 2 * GiB, 3 * GiB + MiB, size - 4096):
            a.seek(off)
            b.seek(off)
            assert a.read(MiB) == b.read(MiB), off


def two_tib(world: World) -> str:
    name = world.disk()
    os.truncate(world.dest_dir / "d1", 2 * TiB)  # the destination disk, sparse
    world.runner.rules.insert(0, (["dmsetup", "table", f"dmmig-{name}"], (0, f"0 {2 * TiB // 512} linear 7:1 0\n", "")))
    return name


def test_migrate_dry_run_says_block_metadata_bytes_and_time(world: World) -> None:  # noqa: F811
    two_tib(world)
    text = world.plan().render()
    assert "era block 512 KiB (chosen from the disk size): 4194304 blocks; era metadata 16.7 MiB at prepare on a " \
           "39 MiB sparse device" in text, text
    assert "era <metadata loop> 7:1 1024" in text  # the table prepare will load uses it
    # the origin (/dev/loop1 here) is no loop device over a file this host can see: the whole disk
    assert "base copy sends 2 TiB of 2 TiB: the whole disk" in text, text
    assert "time at 100 MiB/s (assumed 100 MiB/s (about a 1 Gbit/s link); give --rate for yours): 5.8 h" in text, text
    text = world.plan(rate=float(GiB)).render()
    assert "time at 1 GiB/s (--rate): 34 min" in text, text
    text = world.plan(block_bytes=64 * KiB).render()
    assert "era block 64 KiB (--block-size): 33554432 blocks" in text and "warning: 33554432 era blocks" in text
    assert world.mutating() == []


def test_copy_dry_run_of_a_prepared_disk_uses_its_block_and_the_measured_rate(world: World) -> None:  # noqa: F811
    from dmmig.core import journal
    from dmmig.core.records import BasePass, CopyState
    name = two_tib(world)
    entry = world.stack.journal.load(name)
    assert entry is not None
    entry.block_sectors = 128  # 64 KiB, prepared by an older dmmig
    entry.copy = CopyState(base_offset=TiB, base=BasePass(read=512 * MiB, seconds=2.0))
    world.stack.journal.save(entry, journal.COPYING)
    e = copying.estimate(world.stack, name)
    assert (e["block_bytes"], e["block"], e["send_bytes"]) == (64 * KiB, "prepared", TiB)  # the rest of the base
    assert e["rate_bytes_per_s"] == 256 * MiB and "reached" in e["rate_basis"]
    assert e["seconds"] == TiB / (256 * MiB)
    lines = copying.render_estimate(e)
    assert lines[0].startswith("era block 64 KiB (prepared): 33554432 blocks") and "warning" in lines[-1]
    entry.copy.base_done = True
    world.stack.journal.save(entry)
    assert copying.estimate(world.stack, name, rate=1e9)["send_bytes"] == 0
    assert world.mutating() == []


def test_a_scattered_delta_is_streamed_not_held(tmp_path: Path) -> None:
    """1 Mi dirty blocks, every other one (a guest's scattered writes between two rounds of a
    2 TiB disk at 512 KiB blocks): the round counts and iterates them from the file with a
    bounded peak RSS. Before, ElementTree plus the list took 1.5 GiB for 2 Mi of them."""
    import json
    import subprocess
    import sys
    xml = tmp_path / "dirty.xml"
    n = 1 << 20
    with open(xml, "w") as f:
        f.write("<blocks>\n")
        for i in range(0, 2 * n, 2048):
            f.write("".join(f'  <block block="{b}"/>\n' for b in range(i, i + 2048, 2)))
        f.write(f'  <range begin="{2 * n}" end = "{2 * n + 10}"/>\n</blocks>\n')
    code = f"""
import json, resource
from dmmig.adapters.era import DirtyRanges
d = DirtyRanges.load({str(xml)!r})
blocks = ranges = 0
for r in d:
    blocks += r.count
    ranges += 1
print(json.dumps([d.blocks, d.ranges, blocks, ranges, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    blocks, ranges, b2, r2, rss_kib = json.loads(out)
    assert (blocks, ranges) == (b2, r2) == (n + 10, n + 1)
    # alone ~30 MiB; 142 MiB once in the full suite under load (allocator, not the list): the
    # bound still catches holding them (780 MiB for 1 Mi blocks before)
    assert rss_kib < 200 * 1024, rss_kib


def test_dirty_ranges_out_of_order_are_sorted_and_bad_output_refused(tmp_path: Path) -> None:
    from dmmig.adapters.era import BlockRange, DirtyRanges
    from dmmig.errors import DmmigError
    p = tmp_path / "d.xml"
    p.write_text('<blocks><block block="16"/><range begin="0" end="16"/><block block="30"/></blocks>')
    d = DirtyRanges.load(str(p))
    assert list(d) == [BlockRange(0, 17), BlockRange(30, 31)] and (d.blocks, d.ranges) == (18, 2)
    d.close()
    assert not p.exists()
    p.write_text("<blocks><range begin='0' end='1'/>")
    with pytest.raises(DmmigError, match="cannot parse era_invalidate output"):
        DirtyRanges.load(str(p))
