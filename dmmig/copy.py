"""The copy engine: read extents of the source with O_DIRECT, send them over NBD.

O_DIRECT matters: the guest's writes reach the origin through dm, below the origin's page
cache, so a buffered read could return stale data. Zero runs are not sent: skipped when the
destination is known to be zero, else sent as NBD write-zeroes (no payload).
"""
from __future__ import annotations

import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dmmig.errors import RemoteError

SUB = 64 << 10  # zero detection granularity
ZERO = bytes(SUB)


@dataclass
class Counters:
    read: int = 0
    sent: int = 0       # payload bytes written over NBD
    zeroed: int = 0     # bytes zeroed with NBD write-zeroes (no payload)
    skipped: int = 0    # zero bytes not sent at all (destination known zero)
    seconds: float = 0.0

    def add(self, o: "Counters") -> None:
        self.read += o.read
        self.sent += o.sent
        self.zeroed += o.zeroed
        self.skipped += o.skipped
        self.seconds += o.seconds

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Copier:
    src: str
    handle: Any                  # libnbd handle
    dest_zero: bool
    chunk: int = 1 << 20
    queue: int = 16               # requests in flight
    bwlimit: float | None = None  # bytes/s of payload
    on_progress: Callable[[int], None] | None = None
    _inflight: deque[int] = field(default_factory=deque)

    def copy(self, extents: Iterable[tuple[int, int]], checkpoint: Callable[[int], None] | None = None) -> Counters:
        """Copy (offset, length) extents in order. CHECKPOINT(offset) is called after all data
        below OFFSET is acknowledged by the destination (so it can be journaled)."""
        import nbd
        c = Counters()
        t0 = time.monotonic()
        fd = os.open(self.src, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, self.chunk)
        last_ck = time.monotonic()
        try:
            for off, length in extents:
                end = off + length
                pos = off
                while pos < end:
                    n = min(self.chunk, end - pos)
                    got = os.preadv(fd, [memoryview(buf)[:n]], pos)
                    if got != n:
                        raise OSError(f"short read at {pos}: {got} of {n} bytes")
                    c.read += n
                    self._send(nbd, buf, pos, n, c)
                    pos += n
                    if self.on_progress:
                        self.on_progress(n)
                    self._throttle(c, t0)
                    if checkpoint and time.monotonic() - last_ck > 2:
                        self._drain(0)
                        checkpoint(pos)
                        last_ck = time.monotonic()
            self._drain(0)
            self.handle.flush()
        except nbd.Error as e:
            raise RemoteError(f"NBD write to the destination failed: {e}",
                              hint="rerun `dmmig copy`: it resumes from what era recorded") from None
        finally:
            os.close(fd)
            buf.close()
        c.seconds = time.monotonic() - t0
        return c

    def _send(self, nbd: Any, buf: mmap.mmap, pos: int, n: int, c: Counters) -> None:
        # split the chunk into runs of zero / non-zero SUB-sized pieces
        i = 0
        while i < n:
            j = i
            zero = buf[i:i + min(SUB, n - i)] == ZERO[:min(SUB, n - i)]
            while j < n and (buf[j:j + min(SUB, n - j)] == ZERO[:min(SUB, n - j)]) == zero:
                j += min(SUB, n - j)
            length = j - i
            if zero and self.dest_zero:
                c.skipped += length
            elif zero:
                self._drain(self.queue - 1)
                self._inflight.append(self.handle.aio_zero(length, pos + i))
                c.zeroed += length
            else:
                self._drain(self.queue - 1)
                data = nbd.Buffer.from_bytearray(bytearray(buf[i:j]))
                self._inflight.append(self.handle.aio_pwrite(data, pos + i))
                c.sent += length
            i = j

    def _drain(self, limit: int) -> None:
        """Wait until at most LIMIT requests are in flight; raises the first failed one."""
        while len(self._inflight) > limit:
            while not self.handle.aio_command_completed(self._inflight[0]):
                self.handle.poll(-1)
            self._inflight.popleft()

    def _throttle(self, c: Counters, t0: float) -> None:
        if self.bwlimit:
            ahead = c.sent / self.bwlimit - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
