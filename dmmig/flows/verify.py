"""`dmmig verify`: compare the source and the destination block by block while the mirror runs.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from dmmig.adapters.era import BlockRange, merge
from dmmig.core.copier import digest_ranges
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, StateError
from dmmig.flows.session import Remote
from dmmig.names import top_name
from dmmig.progress import Progress


# ---- verify -------------------------------------------------------------------------------
def verify(stack: Stack, name: str, *, chunk: int = 1 << 20, batch: int = 256 << 20, rechecks: int = 2,
           progress: Progress | None = None, offset: int = 0, length: int | None = None) -> dict[str, Any]:
    """Compare source and destination chunk by chunk by digests computed on each side, over
    [OFFSET, OFFSET+LENGTH) (default: the whole disk; a multi-TiB disk is read whole on both
    hosts, hours, so a range lets the operator check what matters, e.g. what the guest wrote).
    While mirroring, a chunk written during the pass can differ once; it is read again
    (RECHECKS times) before it counts as a mismatch."""
    entry = stack.entry_of(name)
    if not entry.dest:
        raise StateError(f"no destination known for {name}", hint=f"`dmmig copy {name} HOST` first")
    if chunk <= 0 or chunk % 4096:
        raise BadInput(f"--chunk must be a positive multiple of 4096, got {chunk}")
    disk = stack.dm.table(top_name(name)).length * 512
    if offset < 0 or offset % chunk or offset >= disk:
        raise BadInput(f"--offset {offset} must be a multiple of --chunk {chunk} below the disk's {disk} bytes")
    if length is not None and length <= 0:
        raise BadInput(f"--length must be positive, got {length}")
    size = disk if length is None else min(disk, offset + length)  # the end of the range
    src, dst = entry.origin, entry.dest.disk
    t0 = time.monotonic()
    remote = Remote(entry.dest)
    bad: list[int] = []
    try:
        if progress:
            progress.start("verify", size - offset)
        for off in range(offset, size, batch):
            n = min(batch, size - off)
            mine: list[str] = []
            # joined below in this iteration (or the loop is left): the loop variables hold
            th = threading.Thread(target=lambda: mine.extend(digest_ranges(src, off, n, chunk)))  # noqa: B023
            th.start()
            theirs = remote.agent.call("digest", name=name, path=dst, offset=off, length=n, chunk=chunk)["digests"]
            th.join()
            bad += [off // chunk + i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
            if progress:
                progress.advance(n)
        for _ in range(rechecks):
            if not bad:
                break
            time.sleep(0.5)
            still = []
            for i in bad:
                n = min(chunk, size - i * chunk)
                a = digest_ranges(src, i * chunk, n, chunk)
                b = remote.agent.call("digest", name=name, path=dst, offset=i * chunk, length=n,
                                      chunk=chunk)["digests"]
                if a != b:
                    still.append(i)
            bad = still
    finally:
        remote.close()
    ranges = merge([BlockRange(i, i + 1) for i in bad])
    res = {"name": name, "source": src, "destination": f"{entry.dest.host}:{dst}", "bytes": size - offset,
           "offset": offset,
           "chunk": chunk, "seconds": round(time.monotonic() - t0, 3),
           "mismatches": [{"offset": r.begin * chunk, "length": min(r.end * chunk, size) - r.begin * chunk}
                          for r in ranges]}
    if progress:
        progress.end(mismatched_ranges=len(ranges))
    return res
