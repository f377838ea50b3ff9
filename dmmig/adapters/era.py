"""dm-era userspace: metadata snapshots and era_invalidate (thin-provisioning-tools).

Read the dirty set of a live era device only through a metadata snapshot:
take_metadata_snap -> era_invalidate --metadata-snapshot -> drop_metadata_snap.
"""
from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.runner import Runner
from dmmig.errors import CommandError, DmmigError, ToolError


@dataclass(frozen=True)
class BlockRange:
    begin: int  # era block number
    end: int    # exclusive

    @property
    def count(self) -> int:
        return self.end - self.begin


def parse_invalidate_xml(text: str) -> list[BlockRange]:
    """Parse era_invalidate output. Both <range begin end/> (end exclusive) and
    <block block/> occur; the C++ tools write `end = "16"`, which XML allows."""
    try:
        return merge(list(iter_invalidate_xml(io.BytesIO(text.encode()))))
    except _Unparsable as e:
        raise ToolError(f"cannot parse era_invalidate output: {e}: {text[:200]!r}") from e


class _Unparsable(DmmigError):
    pass


def iter_invalidate_xml(source: str | IO[bytes]) -> Iterator[BlockRange]:
    """era_invalidate's output (a file name or a binary stream), element by element in the
    order written, each freed once read: a scattered delta of 2 Mi blocks was 1.5 GiB of
    Python as one ElementTree and list (56 MB of XML)."""
    root: ET.Element | None = None
    try:
        for ev, el in ET.iterparse(source, events=("start", "end")):
            if root is None:
                root = el
                if el.tag != "blocks":
                    raise _Unparsable(f"unexpected era_invalidate output root <{el.tag}>")
                continue
            if ev != "end" or el is root:
                continue
            if el.tag == "range":
                yield BlockRange(int(el.attrib["begin"]), int(el.attrib["end"]))
            elif el.tag == "block":
                b = int(el.attrib["block"])
                yield BlockRange(b, b + 1)
            else:
                raise _Unparsable(f"unexpected element <{el.tag}> in era_invalidate output")
            root.clear()
    except ET.ParseError as e:
        raise _Unparsable(str(e)) from e


def merge_sorted(ranges: Iterable[BlockRange]) -> Iterator[BlockRange]:
    """Merge overlapping and adjacent ranges of a stream sorted by begin, as it flows."""
    cur: BlockRange | None = None
    for r in ranges:
        if cur is not None and r.begin <= cur.end:
            if r.end > cur.end:
                cur = BlockRange(cur.begin, r.end)
        else:
            if cur is not None:
                yield cur
            cur = r
    if cur is not None:
        yield cur


@dataclass
class DirtyRanges:
    """One era_invalidate answer kept in a file and streamed (merged) as often as a caller
    iterates it, never held whole in memory. era_invalidate writes blocks in ascending order
    (both the C++ and the Rust tools walk the era array in order); if one ever did not, the
    ranges are sorted in memory instead: correct, not bounded."""
    path: str
    blocks: int = 0           # dirty blocks in all
    ranges: int = 0           # merged ranges
    _sorted: list[BlockRange] | None = None

    @classmethod
    def load(cls, path: str) -> DirtyRanges:
        d = cls(path)
        prev = -1
        try:
            for r in iter_invalidate_xml(path):
                if r.begin < prev:
                    d._sorted = merge(list(iter_invalidate_xml(path)))
                    break
                prev = r.begin
            for r in d:
                d.blocks += r.count
                d.ranges += 1
        except _Unparsable as e:
            with open(path, "rb") as f:
                head = f.read(200)
            raise ToolError(f"cannot parse era_invalidate output: {e}: {head!r}") from e
        return d

    def __iter__(self) -> Iterator[BlockRange]:
        return iter(self._sorted) if self._sorted is not None else merge_sorted(iter_invalidate_xml(self.path))

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def merge(ranges: list[BlockRange]) -> list[BlockRange]:
    out: list[BlockRange] = []
    for r in sorted(ranges, key=lambda r: r.begin):
        if out and r.begin <= out[-1].end:
            if r.end > out[-1].end:
                out[-1] = BlockRange(out[-1].begin, r.end)
        else:
            out.append(r)
    return out


NICE = ("nice", "-n", "19")  # coreutils: everywhere dmmig runs


class EraTools:
    def __init__(self, runner: Runner, dm: DmSetup) -> None:
        self.r = runner
        self.dm = dm

    def checkpoint(self, era_dev: str) -> int:
        """Start a new era; return its number (writes from now on carry it or later).
        A checkpoint does not drain writes in flight: query one era back to cover them."""
        self.dm.message(era_dev, "checkpoint")
        return self.dm.era_status(era_dev).current_era

    @contextmanager
    def snapshot(self, era_dev: str) -> Iterator[int]:
        """Hold a metadata snapshot; yields the era current after it (the snapshot holds
        every era below it)."""
        now = self.take(era_dev)
        try:
            yield now
        finally:
            self.release(era_dev)

    def take(self, era_dev: str) -> int:
        """Take a metadata snapshot (release drops it); returns the era current after it."""
        self.take_snapshot(era_dev)
        try:
            return self.dm.era_status(era_dev).current_era
        except BaseException:
            self.release(era_dev)
            raise

    def take_snapshot(self, era_dev: str) -> None:
        """Take a metadata snapshot (release drops it), without reading the era it rolled over to
        (a status is a process start: a caller with the top suspended reads it after the resume)."""
        try:
            self.dm.message(era_dev, "take_metadata_snap")
        except CommandError:
            # one left by a crashed dmmig (era refuses a second): it only pins old metadata, so
            # drop and retake. Asked only then: a status is a process start per query
            if self.dm.era_status(era_dev).snapshot_block is None:
                raise
            self.release(era_dev)
            self.dm.message(era_dev, "take_metadata_snap")

    def release(self, era_dev: str) -> None:
        self.dm.message(era_dev, "drop_metadata_snap")

    def written_since(self, metadata_dev: str, since_era: int) -> list[BlockRange]:
        """Blocks whose era >= since_era, from the held metadata snapshot."""
        try:
            res = self.r.run(["era_invalidate", "--metadata-snapshot",
                              "--written-since", str(since_era), metadata_dev], timeout=300)
        except CommandError as e:
            e.hint = "is a metadata snapshot held? (dmmig takes one around this call)"
            raise
        return parse_invalidate_xml(res.stdout)

    def written_since_file(self, metadata_dev: str, since_era: int, path: str, *,
                           background: bool = False) -> DirtyRanges:
        """As written_since, the answer in PATH (era_invalidate -o), streamed by the caller.
        BACKGROUND: at the lowest CPU priority, for a query that holds no window and no guest
        (a copy round's, the cutover's second): over a multi-TiB era array it takes seconds of
        CPU, which the guest's I/O path (blkback, dm and loop workers, the resync) needs first."""
        try:
            self.r.run([*(NICE if background else ()), "era_invalidate", "--metadata-snapshot",
                        "--written-since", str(since_era), "-o", path, metadata_dev], timeout=300)
            return DirtyRanges.load(path)
        except BaseException as e:
            DirtyRanges(path).close()
            if isinstance(e, CommandError):
                e.hint = "is a metadata snapshot held? (dmmig takes one around this call)"
            raise

    def dirty_ranges(self, era_dev: str, metadata_dev: str, since_era: int, path: str, *,
                     background: bool = False, hold: bool = False) -> tuple[DirtyRanges, int]:
        """As dirty, the answer in PATH, streamed; the caller closes it. HOLD: the snapshot stays
        held once the answer is in PATH, for the caller to release (release) off its critical
        path; a query that fails releases it. One left held by a killed dmmig is dropped by the
        next take."""
        now = self.take(era_dev)
        try:
            answer = self.written_since_file(metadata_dev, since_era, path, background=background)
        except BaseException:
            self.release(era_dev)
            raise
        if not hold:
            self.release(era_dev)
        return answer, now

    def dirty(self, era_dev: str, metadata_dev: str, since_era: int) -> tuple[list[BlockRange], int]:
        """Dirty blocks since since_era and the era that was current when they were read."""
        with self.snapshot(era_dev) as now:
            return self.written_since(metadata_dev, since_era), now
