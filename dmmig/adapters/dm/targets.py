"""dm targets as small typed objects: render a table line, parse status and table lines.

Sizes and offsets are in 512-byte sectors, as the kernel uses them. Device references are
strings the kernel accepts: a path or "major:minor".  Formats: kernel
drivers/md/dm-linear.c, dm-era-target.c, dm-raid1.c and dm-log.c.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

SECTOR = 512


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Linear:
    length: int
    device: str
    offset: int = 0
    name: ClassVar[str] = "linear"

    def args(self) -> list[str]:
        return [self.device, str(self.offset)]

    @classmethod
    def parse_table(cls, length: int, args: list[str]) -> Linear:
        if len(args) != 2:
            raise ParseError(f"linear table needs 2 args, got {args}")
        return cls(length, args[0], int(args[1]))


@dataclass(frozen=True)
class Era:
    length: int
    metadata: str
    origin: str
    block_sectors: int
    name: ClassVar[str] = "era"

    def __post_init__(self) -> None:
        # era_ctr: block size > 0 and a multiple of 8 sectors (4 KiB)
        if self.block_sectors <= 0 or self.block_sectors % 8:
            raise ValueError(f"era block size must be a positive multiple of 8 sectors, got {self.block_sectors}")

    def args(self) -> list[str]:
        return [self.metadata, self.origin, str(self.block_sectors)]

    @classmethod
    def parse_table(cls, length: int, args: list[str]) -> Era:
        if len(args) != 3:
            raise ParseError(f"era table needs 3 args, got {args}")
        return cls(length, args[0], args[1], int(args[2]))


@dataclass(frozen=True)
class CoreLog:
    region_sectors: int
    sync: str | None = None  # None (use log state), "sync" or "nosync"

    def args(self) -> list[str]:
        a = [str(self.region_sectors)] + ([self.sync] if self.sync else [])
        return ["core", str(len(a))] + a


@dataclass(frozen=True)
class DiskLog:
    device: str
    region_sectors: int
    sync: str | None = None

    def args(self) -> list[str]:
        a = [self.device, str(self.region_sectors)] + ([self.sync] if self.sync else [])
        return ["disk", str(len(a))] + a


@dataclass(frozen=True)
class Mirror:
    length: int
    log: CoreLog | DiskLog
    legs: tuple[str, ...]  # leg 0 is the default leg: the source of every resync
    handle_errors: bool = False
    keep_log: bool = False
    offset: int = 0  # on every leg: a part of a MirrorSet maps its slice of each leg
    name: ClassVar[str] = "mirror"

    def __post_init__(self) -> None:
        rs = self.log.region_sectors
        if rs < 2 or rs & (rs - 1):
            raise ValueError(f"mirror region size must be a power of two >= 2 sectors, got {rs}")
        if not 2 <= len(self.legs) <= 9:
            raise ValueError("a mirror needs 2..9 legs")
        if self.keep_log and not self.handle_errors:
            raise ValueError("keep_log requires handle_errors")

    @property
    def region_count(self) -> int:
        return -(-self.length // self.log.region_sectors)

    def args(self) -> list[str]:
        a = self.log.args() + [str(len(self.legs))]
        for leg in self.legs:
            a += [leg, str(self.offset)]
        feats = (["handle_errors"] if self.handle_errors else []) + (["keep_log"] if self.keep_log else [])
        if feats:
            a += [str(len(feats))] + feats
        return a

    @classmethod
    def parse_table(cls, length: int, args: list[str]) -> Mirror:
        try:
            kind, n = args[0], int(args[1])
            largs = args[2:2 + n]
            rest = args[2 + n:]
            log: CoreLog | DiskLog
            if kind == "core":
                log = CoreLog(int(largs[0]), _sync_flag(largs[1:]))
            elif kind == "disk":
                log = DiskLog(largs[0], int(largs[1]), _sync_flag(largs[2:]))
            else:
                raise ParseError(f"unknown mirror log type {kind!r}")
            nlegs = int(rest[0])
            legs = tuple(rest[1 + 2 * i] for i in range(nlegs))
            offsets = {int(rest[2 + 2 * i]) for i in range(nlegs)}
            if len(offsets) != 1:
                # Mirror models one offset for every leg: dropping one would make a foreign
                # table compare equal to one dmmig rendered
                raise ParseError(f"mirror leg offsets {sorted(offsets)} differ")
            feats = rest[1 + 2 * nlegs:]
            feat_words = feats[1:1 + int(feats[0])] if feats else []
        except (IndexError, ValueError) as e:
            raise ParseError(f"bad mirror table {args}: {e}") from e
        return cls(length, log, legs, "handle_errors" in feat_words, "keep_log" in feat_words, offsets.pop())


@dataclass(frozen=True)
class MirrorSet:
    """Several dm-mirror targets side by side in one table, part i over its own slice of the
    disk (the same sectors of every leg) with its own log. dm-mirror recovers one region at a
    time per target (MAX_RECOVERY 1 in dm-raid1.c), so K parts recover K regions at once; a
    write to a region being recovered still waits for it, within its part."""

    parts: tuple[Mirror, ...]
    name: ClassVar[str] = "mirror"

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a mirror set needs at least one part")
        at = 0
        for m in self.parts:
            if m.offset != at:
                raise ValueError(f"mirror part at {m.offset} does not follow the one ending at {at}")
            if m.legs and len(m.legs) != len(self.parts[0].legs):
                raise ValueError("every part of a mirror set has the same legs")
            at += m.length

    @property
    def length(self) -> int:
        return sum(m.length for m in self.parts)

    @property
    def legs(self) -> tuple[str, ...]:
        return self.parts[0].legs

    def lines(self) -> list[str]:
        return [" ".join([str(m.offset), str(m.length), m.name] + m.args()) for m in self.parts]

    def args(self) -> list[str]:
        raise TypeError("a mirror set is several table lines: use lines()")


def _sync_flag(words: list[str]) -> str | None:
    return words[0] if words and words[0] in ("sync", "nosync") else None


@dataclass(frozen=True)
class Other:
    """A target dmmig does not manage (e.g. a table someone else loaded)."""

    length: int
    kind: str
    raw_args: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.kind

    def args(self) -> list[str]:
        return list(self.raw_args)


Target = Linear | Era | Mirror | MirrorSet | Other
MIRRORS = (Mirror, MirrorSet)  # what the top holds while mirroring (one part, or several)
_KINDS: dict[str, type[Linear] | type[Era] | type[Mirror]] = {"linear": Linear, "era": Era, "mirror": Mirror}


@dataclass(frozen=True)
class Table:
    """A one-target table starting at sector 0 (era numbers blocks from sector 0, so
    dmmig never needs more than one target per device)."""

    target: Target

    def render(self) -> str:
        t = self.target
        if isinstance(t, MirrorSet):
            return "\n".join(t.lines())
        return " ".join(["0", str(t.length), t.name] + t.args())

    @property
    def length(self) -> int:
        return self.target.length

    @classmethod
    def parse(cls, text: str) -> Table:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if len(lines) > 1:
            return cls(_parse_mirror_set(lines))
        if len(lines) != 1:
            raise ParseError(f"expected a one-target table, got {len(lines)} lines: {text!r}")
        words = lines[0].split()
        if len(words) < 3:
            raise ParseError(f"bad table line {lines[0]!r}")
        start, length, kind = int(words[0]), int(words[1]), words[2]
        if start != 0:
            raise ParseError(f"table does not start at sector 0: {lines[0]!r}")
        if kind not in _KINDS:
            return cls(Other(length, kind, tuple(words[3:])))
        return cls(_KINDS[kind].parse_table(length, words[3:]))


def _parse_mirror_set(lines: list[str]) -> MirrorSet:
    """The only several-line table dmmig loads: mirrors side by side, each over its own slice."""
    parts = []
    for ln in lines:
        words = ln.split()
        if len(words) < 3 or words[2] != "mirror":
            raise ParseError(f"a several-line table that is not a mirror set: {ln!r}")
        m = Mirror.parse_table(int(words[1]), words[3:])
        if m.offset != int(words[0]):
            raise ParseError(f"mirror part at sector {words[0]} maps its legs from {m.offset}: {ln!r}")
        parts.append(m)
    try:
        return MirrorSet(tuple(parts))
    except ValueError as e:
        raise ParseError(f"bad mirror set: {e}") from e


@dataclass(frozen=True)
class Segments:
    """A table dmmig does not model, kept verbatim: an adopted LV's own table, as many targets
    side by side as LVM gave it (linear, striped), each line as the kernel printed it. Loaded
    again exactly as read, so `dmsetup table` prints the same text back."""

    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.lines:
            raise ParseError("an empty table")
        at = 0
        for ln in self.lines:
            w = ln.split()
            try:
                start, length = int(w[0]), int(w[1])
                kind = w[2]
            except (IndexError, ValueError):
                raise ParseError(f"bad table line {ln!r}") from None
            if start != at or length <= 0 or not kind:
                raise ParseError(f"table line {ln!r} does not follow the one ending at sector {at}")
            at += length

    @classmethod
    def parse(cls, text: str) -> Segments:
        return cls(tuple(" ".join(ln.split()) for ln in text.strip().splitlines() if ln.strip()))

    @property
    def length(self) -> int:
        return sum(int(ln.split()[1]) for ln in self.lines)

    @property
    def kinds(self) -> list[str]:
        """The target of each line, in order."""
        return [ln.split()[2] for ln in self.lines]

    def render(self) -> str:
        return "\n".join(self.lines)


# ---- status lines -----------------------------------------------------------------------

@dataclass(frozen=True)
class EraStatus:
    metadata_block_sectors: int
    metadata_used: int
    metadata_total: int
    current_era: int
    snapshot_block: int | None  # held metadata snapshot, or None

    @classmethod
    def parse(cls, line: str) -> EraStatus:
        # "0 131072 era 8 20/1024 3 -"
        w = line.split()
        try:
            if w[2] != "era":
                raise ParseError(f"not an era status line: {line!r}")
            used, total = w[4].split("/")
            snap = None if w[6] == "-" else int(w[6])
            return cls(int(w[3]), int(used), int(total), int(w[5]), snap)
        except (IndexError, ValueError) as e:
            raise ParseError(f"bad era status {line!r}: {e}") from e


HEALTH = {"A": "alive", "F": "flush error", "D": "write error", "S": "sync error",
          "R": "read error", "U": "unknown"}


@dataclass(frozen=True)
class MirrorStatus:
    legs: tuple[str, ...]
    in_sync: int
    regions: int
    health: str              # one character per leg, see HEALTH
    log_kind: str            # "core" or "disk"
    log_device: str | None = None
    log_health: str | None = None  # disk log: A, D or F

    @property
    def synced(self) -> bool:
        return self.in_sync == self.regions

    @property
    def healthy(self) -> bool:
        # the sync ratio alone lies: without handle_errors a dead leg still reaches N/N
        return set(self.health) == {"A"} and self.log_health in (None, "A")

    @property
    def failed_legs(self) -> list[int]:
        return [i for i, c in enumerate(self.health) if c != "A"]

    @classmethod
    def parse(cls, line: str) -> MirrorStatus:
        # "0 131072 mirror 2 254:1 43:0 1024/1024 1 AA 1 core"
        # "0 131072 mirror 2 254:1 43:0 12/128 1 AD 3 disk 7:2 A"
        w = line.split()
        try:
            if w[2] != "mirror":
                raise ParseError(f"not a mirror status line: {line!r}")
            n = int(w[3])
            legs = tuple(w[4:4 + n])
            i = 4 + n
            in_sync, regions = (int(x) for x in w[i].split("/"))
            health = w[i + 2]
            nlog = int(w[i + 3])
            logw = w[i + 4:i + 4 + nlog]
            if len(health) != n:
                raise ParseError(f"{n} legs but health {health!r}")
            if logw[0] == "disk":
                return cls(legs, in_sync, regions, health, "disk", logw[1], logw[2])
            return cls(legs, in_sync, regions, health, logw[0])
        except (IndexError, ValueError) as e:
            raise ParseError(f"bad mirror status {line!r}: {e}") from e

    @classmethod
    def parse_lines(cls, text: str) -> MirrorStatus:
        """The status of a whole mirror table, one line per part (MirrorSet): regions and
        in-sync counts add up; a leg or log is as healthy as its worst part."""
        parts = [cls.parse(ln) for ln in text.strip().splitlines() if ln.strip()]
        if not parts:
            raise ParseError("empty mirror status")
        if len(parts) == 1:
            return parts[0]
        if any(p.legs != parts[0].legs for p in parts):
            raise ParseError(f"mirror parts with different legs: {text!r}")

        def worst(chars: list[str]) -> str:
            return next((c for c in chars if c != "A"), "A")
        health = "".join(worst([p.health[i] for p in parts]) for i in range(len(parts[0].legs)))
        logs = [p.log_health for p in parts if p.log_health is not None]
        return cls(parts[0].legs, sum(p.in_sync for p in parts), sum(p.regions for p in parts), health,
                   parts[0].log_kind, None, worst(logs) if logs else None)
