"""The copy engine: read extents of the source with O_DIRECT, send them over NBD.

O_DIRECT matters: the guest's writes reach the origin through dm, below the origin's page
cache, so a buffered read could return stale data. Zero runs are not sent: skipped when the
destination is known to be zero, else sent as NBD write-zeroes (no payload).

Over several NBD connections to the same export (qemu-nbd --shared), requests go round-robin:
one connection's window (an SSH channel's 2 MiB, one TLS stream's CPU) no longer bounds the
copy. The extents of one copy() never overlap, so the order across connections does not
matter; a checkpoint and the end wait for every connection's requests.
"""
from __future__ import annotations

import mmap
import os
import select
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dmmig.adapters.nbd import direct_io_ok
from dmmig.errors import LocalIOError, RemoteError

SUB = 64 << 10  # zero detection granularity
ZERO = bytes(SUB)
ZERO_VIEW = memoryview(ZERO)
HOLE_PIECE = 1 << 30  # one NBD write-zeroes request over a hole (the protocol's length is 32-bit)


@dataclass
class Counters:
    read: int = 0
    sent: int = 0       # payload bytes written over NBD
    zeroed: int = 0     # bytes zeroed with NBD write-zeroes (no payload)
    skipped: int = 0    # zero bytes not sent at all (destination known zero)
    seconds: float = 0.0

    def add(self, o: Counters) -> None:
        self.read += o.read
        self.sent += o.sent
        self.zeroed += o.zeroed
        self.skipped += o.skipped
        self.seconds += o.seconds

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Slots:
    """Write buffers that are reused once their request has completed.

    libnbd 1.14's Python binding never releases the buffer object handed to aio_pwrite,
    so a fresh bytearray per request leaks its whole payload: RSS grew with the disk size
    (300 MiB at 256 MiB). A bounded set of mmaps, reused, keeps memory flat. Slots are
    never closed for the same reason (the binding still holds an export on each)."""

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}

    def get(self, size: int) -> mmap.mmap:
        free = self._free.get(size)
        return free.pop() if free else mmap.mmap(-1, size)

    def put(self, slot: mmap.mmap) -> None:
        self._free.setdefault(len(slot), []).append(slot)


def _pieces(length: int) -> Iterator[int]:
    """Split a run into power-of-two multiples of SUB (few distinct sizes, so few slots)."""
    while length >= SUB:
        size = SUB << ((length // SUB).bit_length() - 1)
        yield size
        length -= size
    if length:
        yield length


@dataclass
class Copier:
    src: str
    handle: Any                  # a libnbd handle, or a list of handles on the same export
    dest_zero: bool
    chunk: int = 1 << 20
    queue: int = 16               # requests in flight, over all connections
    checkpoint_every: float = 2.0  # seconds between checkpoints (each waits for every request)
    bwlimit: float | None = None  # bytes/s of payload
    on_progress: Callable[[int], None] | None = None
    # (start, end) -> (offset, length, is_data) pieces: where the source is known to hold no
    # data (sparse.FileLayout.pieces); None: every byte is read
    layout: Callable[[int, int], Iterable[tuple[int, int, bool]]] | None = None
    _inflight: deque[tuple[Any, int, mmap.mmap | None]] = field(default_factory=deque)
    _slots: _Slots = field(default_factory=_Slots)
    _scratch: bytearray = field(default_factory=lambda: bytearray(SUB))
    _next: int = 0

    def __post_init__(self) -> None:
        self._handles: list[Any] = list(self.handle) if isinstance(self.handle, (list, tuple)) else [self.handle]
        if not self._handles:
            raise ValueError("Copier needs at least one NBD handle")

    def _h(self) -> Any:
        """The next connection, round-robin."""
        h = self._handles[self._next % len(self._handles)]
        self._next += 1
        return h

    def copy(self, extents: Iterable[tuple[int, int]], checkpoint: Callable[[int], None] | None = None) -> Counters:
        """Copy (offset, length) extents in order. CHECKPOINT(offset) is called after all data
        below OFFSET is acknowledged by the destination (so it can be journaled)."""
        import nbd
        c = Counters()
        t0 = time.monotonic()
        fd = os.open(self.src, os.O_RDONLY | os.O_DIRECT)
        last_ck = time.monotonic()

        def tick(pos: int) -> None:
            nonlocal last_ck
            if checkpoint and time.monotonic() - last_ck > self.checkpoint_every:
                self._drain(0)
                checkpoint(pos)
                last_ck = time.monotonic()
        try:
            for off, length in extents:
                for pos, n, data in (self.layout(off, off + length) if self.layout else [(off, length, True)]):
                    if not data:
                        self._hole(pos, n, c)
                        tick(pos + n)
                    else:
                        self._data(fd, nbd, pos, pos + n, c, t0, tick)
            self._drain(0)
            for h in self._handles:  # directsync acknowledges only what is stable; a flush costs little
                h.flush()
        except nbd.Error as e:
            raise RemoteError(f"NBD write to the destination failed: {e}",
                              hint="rerun `dmmig copy`: it resumes from what era recorded") from e
        finally:
            os.close(fd)
        c.seconds = time.monotonic() - t0
        return c

    def _data(self, fd: int, nbd: Any, pos: int, end: int, c: Counters, t0: float,
              tick: Callable[[int], None]) -> None:
        while pos < end:
            n = min(self.chunk, end - pos)
            buf = self._slots.get(self.chunk)  # page-aligned, as O_DIRECT needs
            try:
                with memoryview(buf) as view:
                    got = os.preadv(fd, [view[:n]], pos)
            except OSError as e:
                raise LocalIOError(f"reading the source {self.src} failed at byte {pos}: {e.strerror}",
                                   hint="the guest's own disk returns errors: check it (dmesg); once it "
                                        "reads again, rerun `dmmig copy` (it resumes), or `dmmig abort`") from e
            if got != n:
                raise LocalIOError(f"reading the source {self.src} came up short at byte {pos}: {got} of "
                                   f"{n} bytes", hint="has the source shrunk? `dmmig abort` the migration")
            c.read += n
            self._send(nbd, buf, pos, n, c)
            pos += n
            if self.on_progress:
                self.on_progress(n)
            self._throttle(c, t0)
            tick(pos)

    def _hole(self, pos: int, n: int, c: Counters) -> None:
        """A range the source's layout says reads as zeros: not read at all; skipped on a
        destination known to be zero, else zeroed without payload (NBD lengths are 32-bit)."""
        if self.dest_zero:
            c.skipped += n
        else:
            self._zero_add(pos, n)
            c.zeroed += n
        if self.on_progress:
            self.on_progress(n)

    def _zero_flags(self, buf: mmap.mmap, n: int) -> list[bool]:
        """Which SUB pieces of BUF[:N] hold only zeros, without a new object per piece.

        Slicing the mmap made a 64 KiB bytes object per piece, which glibc gave back to the
        kernel at its free when it topped the heap, so the next one faulted in 16 fresh pages:
        under user-mode-linux 40 ms per MiB, most of a small round's time in the rig. Data is
        mostly told by its first or last byte; the rest is copied to one reused buffer and
        compared there (memcmp)."""
        flags = []
        with memoryview(buf) as view, memoryview(self._scratch) as scratch:
            for i in range(0, n, SUB):
                j = min(i + SUB, n)
                if buf[i] or buf[j - 1]:
                    flags.append(False)
                elif j - i == SUB:
                    scratch[:] = view[i:j]  # a memoryview's: bytearray's own would copy first
                    flags.append(self._scratch == ZERO)
                else:  # a short last piece: compared byte by byte, no copy
                    flags.append(view[i:j] == ZERO_VIEW[:j - i])
        return flags

    def _send(self, nbd: Any, buf: mmap.mmap, pos: int, n: int, c: Counters) -> None:
        zero = self._zero_flags(buf, n)
        if n == len(buf) and not any(zero):
            # the common dense case: send the read buffer itself, no copy
            h = self._h()
            self._submit(h, h.aio_pwrite(nbd.Buffer.from_buffer(buf), pos), buf)
            c.sent += n
            return
        # runs of equal zero flags: [i, j) in bytes
        k = 0
        while k < len(zero):
            m = k
            while m < len(zero) and zero[m] == zero[k]:
                m += 1
            i, j = k * SUB, min(m * SUB, n)
            if zero[k] and self.dest_zero:
                c.skipped += j - i
            elif zero[k]:
                self._zero_add(pos + i, j - i)
                c.zeroed += j - i
            else:
                for size in _pieces(j - i):
                    slot = self._slots.get(size)
                    with memoryview(slot) as dst, memoryview(buf) as src:
                        dst[:] = src[i:i + size]
                    h = self._h()
                    self._submit(h, h.aio_pwrite(nbd.Buffer.from_buffer(slot), pos + i), slot)
                    i += size
                c.sent += j - k * SUB
            k = m
        self._slots.put(buf)

    def _zero_add(self, pos: int, n: int) -> None:
        """Zero [pos, pos+n) with write-zeroes requests (NBD lengths are 32-bit: HOLE_PIECE at a
        time). Not joined with the next zero run: with runs joined (one 96 MiB request instead of
        96 of 1 MiB) bench/copy_wall's --transport ssh row was slower (2026-12-05; not isolated)."""
        for off in range(pos, pos + n, HOLE_PIECE):
            h = self._h()
            self._submit(h, h.aio_zero(min(HOLE_PIECE, pos + n - off), off), None)

    def _submit(self, h: Any, cookie: int, slot: mmap.mmap | None) -> None:
        self._inflight.append((h, cookie, slot))
        self._drain(self.queue)

    def _drain(self, limit: int) -> None:
        """Wait until at most LIMIT requests are in flight; raises the first failed one."""
        while len(self._inflight) > limit:
            h, cookie, slot = self._inflight[0]
            while not h.aio_command_completed(cookie):
                self._poll()
            self._inflight.popleft()
            if slot is not None:
                self._slots.put(slot)

    def _poll(self) -> None:
        """Move every connection on (libnbd's poll() serves one handle: the others' requests
        would wait meanwhile)."""
        if len(self._handles) == 1:
            self._handles[0].poll(-1)
            return
        import nbd
        p = select.poll()
        by_fd: dict[int, Any] = {}
        for h in self._handles:
            d = h.aio_get_direction()
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (
                select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                fd = h.aio_get_fd()
                by_fd[fd] = h
                p.register(fd, ev)
        if not by_fd:  # nothing to wait for (a dead connection): its own poll says why
            self._handles[0].poll(-1)
            return
        for fd, ev in p.poll(-1):
            h = by_fd[fd]
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif ev & select.POLLOUT:
                h.aio_notify_write()

    def _throttle(self, c: Counters, t0: float) -> None:
        if self.bwlimit:
            ahead = c.sent / self.bwlimit - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)


def digest_ranges(path: str, offset: int, length: int, chunk: int) -> list[str]:
    """sha256 of each CHUNK of [offset, offset+length) read with O_DIRECT when possible."""
    import hashlib  # here: OpenSSL's load is 45 ms of every `dmmig agent` start in the rig
    flags = os.O_RDONLY | (os.O_DIRECT if direct_io_ok(path) else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, chunk)
    out = []
    try:
        pos = offset
        end = offset + length
        with memoryview(buf) as view:  # hashed in place: a slice of the mmap would copy the chunk
            while pos < end:
                n = os.preadv(fd, [buf], pos)
                want = min(chunk, end - pos)
                out.append(hashlib.sha256(view[:min(n, want)]).hexdigest())
                pos += want
    finally:
        os.close(fd)
    return out
