"""dm-era userspace: metadata snapshots and era_invalidate (thin-provisioning-tools).

Read the dirty set of a live era device only through a metadata snapshot:
take_metadata_snap -> era_invalidate --metadata-snapshot -> drop_metadata_snap.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dmmig.dm.dmsetup import DmSetup
from dmmig.errors import CommandError, DmmigError
from dmmig.runner import Runner


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
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DmmigError(f"cannot parse era_invalidate output: {e}: {text[:200]!r}") from e
    if root.tag != "blocks":
        raise DmmigError(f"unexpected era_invalidate output root <{root.tag}>")
    out: list[BlockRange] = []
    for el in root:
        if el.tag == "range":
            out.append(BlockRange(int(el.attrib["begin"]), int(el.attrib["end"])))
        elif el.tag == "block":
            b = int(el.attrib["block"])
            out.append(BlockRange(b, b + 1))
        else:
            raise DmmigError(f"unexpected element <{el.tag}> in era_invalidate output")
    return merge(out)


def merge(ranges: list[BlockRange]) -> list[BlockRange]:
    out: list[BlockRange] = []
    for r in sorted(ranges, key=lambda r: r.begin):
        if out and r.begin <= out[-1].end:
            if r.end > out[-1].end:
                out[-1] = BlockRange(out[-1].begin, r.end)
        else:
            out.append(r)
    return out


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
        st = self.dm.era_status(era_dev)
        if st.snapshot_block is not None:
            # left by a crashed dmmig: it only pins old metadata, so drop and retake
            self.dm.message(era_dev, "drop_metadata_snap")
        self.dm.message(era_dev, "take_metadata_snap")
        try:
            yield self.dm.era_status(era_dev).current_era
        finally:
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

    def dirty(self, era_dev: str, metadata_dev: str, since_era: int) -> tuple[list[BlockRange], int]:
        """Dirty blocks since since_era and the era that was current when they were read."""
        with self.snapshot(era_dev) as now:
            return self.written_since(metadata_dev, since_era), now
