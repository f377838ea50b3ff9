"""The copy engine against a real NBD server (qemu-nbd on a unix socket): no root, no kernel.

The oracle is the file itself: after the copy the destination file must equal the source
byte for byte, and the counters must account for every byte exactly once."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

nbd = pytest.importorskip("nbd")

from dmmig.core.copier import SUB, Copier, _pieces  # noqa: E402

MiB = 1 << 20


def start(dest: Path, sock: Path, size: int) -> tuple[subprocess.Popen[bytes], object]:
    with open(dest, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "--cache=writethrough",
                             str(dest)])  # no -t: it exits when we disconnect
    return proc, connect(sock, proc)


def connect(sock: Path, proc: subprocess.Popen[bytes], within: float = 60) -> nbd.NBD:
    """A connection to qemu-nbd's socket once it listens. The socket's file exists from its
    bind, before the listen: a connect then is refused (seen in 1 of ~10 unit runs), and a
    loaded machine (xdist workers beside rigs) took qemu-nbd past 5 s to get there."""
    deadline = time.monotonic() + within
    while True:
        h = nbd.NBD()
        try:
            h.connect_unix(str(sock))
            return h
        except nbd.Error:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def pattern(path: Path, size: int, zero_runs: list[tuple[int, int]]) -> bytes:
    data = bytearray(os.urandom(size))
    for off, length in zero_runs:
        data[off:off + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


def test_pieces_are_power_of_two_multiples_of_sub() -> None:
    assert list(_pieces(SUB)) == [SUB]
    assert list(_pieces(3 * SUB)) == [2 * SUB, SUB]
    assert list(_pieces(15 * SUB + 512)) == [8 * SUB, 4 * SUB, 2 * SUB, SUB, 512]


@pytest.mark.parametrize("dest_zero", [True, False])
def test_copy_is_exact_and_counts_every_byte_once(tmp_path: Path, dest_zero: bool) -> None:
    size = 8 * MiB + 3 * 4096  # not a multiple of the chunk nor of SUB
    zero_runs = [(0, SUB), (MiB + SUB, 3 * SUB), (2 * MiB, 2 * MiB), (8 * MiB, 3 * 4096)]  # a short zero tail
    src = tmp_path / "src.img"
    want = pattern(src, size, zero_runs)
    dest, sock = tmp_path / "dest.img", tmp_path / "nbd.sock"
    proc, h = start(dest, sock, size)
    if not dest_zero:  # the destination holds garbage that zero runs must overwrite
        h.pwrite(os.urandom(size), 0)  # type: ignore[attr-defined]
    try:
        c = Copier(str(src), h, dest_zero=dest_zero).copy([(0, size)])
    finally:
        h.shutdown()  # type: ignore[attr-defined]
        proc.wait(10)
    assert dest.read_bytes() == want
    zeros = SUB + 3 * SUB + 2 * MiB + 3 * 4096
    assert c.read == size
    assert c.sent == size - zeros
    assert (c.skipped if dest_zero else c.zeroed) == zeros
    assert (c.zeroed if dest_zero else c.skipped) == 0


def test_data_with_zero_ends_is_data_and_zero_detection_allocates_no_piece(tmp_path: Path) -> None:
    """A guest chooses what it writes: pieces whose first and last bytes are zero, with data in
    between (one byte, or all but the ends), must be sent as data, and all-zero pieces not; a
    short last piece likewise. The zero check makes no object the size of a piece: one per piece
    was most of a small round's time under user-mode-linux (each faulted in fresh pages)."""
    import tracemalloc
    size = 6 * SUB + 4096 + 512
    data = bytearray(os.urandom(size))
    for k in range(0, 6 * SUB, SUB):
        data[k] = data[k + SUB - 1] = 0  # every piece's ends are zero: the whole compare decides
    data[SUB:2 * SUB] = bytes(SUB)
    data[2 * SUB:3 * SUB] = bytes(SUB)
    data[2 * SUB + SUB // 2] = 7          # one byte in the middle
    data[4 * SUB:5 * SUB] = bytes(SUB)    # all zero
    data[6 * SUB:] = bytes(4096 + 512)
    data[6 * SUB + 2048] = 1              # the short last piece: one byte of data
    src = tmp_path / "src.img"
    src.write_bytes(data)
    dest, sock = tmp_path / "dest.img", tmp_path / "nbd.sock"
    proc, h = start(dest, sock, size)
    h.pwrite(os.urandom(size), 0)  # type: ignore[attr-defined]  # garbage the zero pieces overwrite
    cp = Copier(str(src), h, dest_zero=False)
    tracemalloc.start()
    try:
        c = cp.copy([(0, size)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        h.shutdown()  # type: ignore[attr-defined]
        proc.wait(10)
    assert dest.read_bytes() == bytes(data)
    assert c.zeroed == 2 * SUB and c.sent == size - 2 * SUB
    assert peak < SUB // 2, f"the copy allocated {peak} bytes at its peak"


def test_write_buffers_are_bounded_not_per_request(tmp_path: Path) -> None:
    """libnbd 1.14 leaks every object handed to aio_pwrite: the engine must reuse a bounded
    set of buffers, however much it copies."""
    size = 32 * MiB
    src = tmp_path / "src.img"
    # a zero run in every chunk forces the piecewise path, the one that needs extra slots
    pattern(src, size, [(k * MiB + 5 * SUB, SUB) for k in range(32)])
    dest, sock = tmp_path / "dest.img", tmp_path / "nbd.sock"
    proc, h = start(dest, sock, size)
    try:
        cp = Copier(str(src), h, dest_zero=True, queue=4)
        cp.copy([(0, size)])
    finally:
        h.shutdown()  # type: ignore[attr-defined]
        proc.wait(10)
    assert dest.read_bytes() == src.read_bytes()
    slots = sum(len(v) for v in cp._slots._free.values())
    # per size at most queue + 1 buffers (queue in flight, one being filled)
    sizes = len(cp._slots._free)
    assert slots <= sizes * (cp.queue + 1), cp._slots._free.keys()
    assert slots < 32


@pytest.mark.parametrize("every", [0.0, 1000.0])  # a checkpoint after each chunk, or none on the way
@pytest.mark.parametrize("dest_zero", [True, False])
def test_several_connections_place_every_byte_exactly_once(tmp_path: Path, dest_zero: bool, every: float) -> None:
    """The copier's requests spread over four connections to one export (qemu-nbd --shared):
    the destination must equal the source byte for byte (a request dropped, sent twice to the
    wrong place or left unacknowledged on a connection nobody polled would show), zero runs
    across chunk boundaries included, and a checkpoint must only name what every connection
    has acknowledged. The extents leave a gap (a round's clean blocks) between two zero runs:
    what the destination holds there must stay."""
    size = 24 * MiB + 5 * 4096
    zero_runs = [(0, SUB), (3 * MiB - SUB, 2 * MiB + 2 * SUB), (9 * MiB, 3 * MiB), (13 * MiB, 3 * MiB),
                 (24 * MiB, 5 * 4096)]
    gap = (12 * MiB, 13 * MiB)  # not copied: data the destination already has
    src = tmp_path / "src.img"
    want = pattern(src, size, zero_runs)
    dest, sock = tmp_path / "dest.img", tmp_path / "nbd.sock"
    with open(dest, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "--shared=4", "--cache=writethrough",
                             str(dest)])
    hs: list[nbd.NBD] = []
    try:
        for _ in range(4):  # inside the try: a failed connect must not leave qemu-nbd running
            hs.append(connect(sock, proc))
        if not dest_zero:  # garbage that the zero runs must overwrite
            hs[0].pwrite(os.urandom(size), 0)  # type: ignore[attr-defined]
        hs[0].pwrite(want[gap[0]:gap[1]], gap[0])  # type: ignore[attr-defined]
        seen: list[int] = []

        def checkpoint(pos: int) -> None:  # everything below POS is acknowledged: it must be there now
            seen.append(pos)
            assert dest.read_bytes()[:pos] == want[:pos]
        cp = Copier(str(src), hs, dest_zero=dest_zero, queue=8, checkpoint_every=every)
        c = cp.copy([(0, 10 * MiB), (10 * MiB, gap[0] - 10 * MiB), (gap[1], size - gap[1])], checkpoint=checkpoint)
        assert not cp._inflight and cp._next >= len(hs)  # every connection used, nothing left in flight
        assert len(seen) > 10 if every == 0 else not seen
    finally:
        for h in hs:
            h.shutdown()  # type: ignore[attr-defined]
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert dest.read_bytes() == want
    zeros = sum(n for _, n in zero_runs)
    assert c.read == size - (gap[1] - gap[0]) and c.sent == size - zeros - (gap[1] - gap[0])
    assert (c.skipped if dest_zero else c.zeroed) == zeros


def test_digests_hash_each_chunk_in_place(tmp_path: Path) -> None:
    """verify's digests (both hosts) equal sha256 of each chunk, the short last one included,
    and hash the read buffer itself: a slice of it copied every chunk (fresh pages each time)."""
    import hashlib
    import tracemalloc

    from dmmig.core.copier import digest_ranges
    data = os.urandom(3 * MiB + 8192)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    end = 4096 + 3 * MiB + 4096
    tracemalloc.start()
    try:
        got = digest_ranges(str(src), 4096, end - 4096, MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = [hashlib.sha256(data[o:min(o + MiB, end)]).hexdigest() for o in range(4096, end, MiB)]
    assert len(got) == 4 and got == want
    assert peak < SUB, f"the digests allocated {peak} bytes at their peak"
