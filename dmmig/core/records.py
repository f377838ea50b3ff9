"""Versioned records on disk: the agent's record of an incoming disk (NAME.dest.json) and the
parts of the source's journal (dmmig/core/journal.py).

Every record is written with a `version`. A record without one was written by dmmig before
records had types (version 0): it is migrated on load, in memory, and written back in the
current version at its next save. Keys this code does not know (a newer dmmig wrote them, or
an older one this code no longer reads) are neither dropped nor trusted: they are logged as a
warning, kept in `extra` and written back unchanged, so a downgrade in the middle of a
migration loses nothing the newer dmmig needs after an upgrade again. A record of a newer
version loads the same way, with a warning: `status` and `abort` must work whatever wrote it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from dmmig.adapters import nbd
from dmmig.adapters.writefence import Counters, Fence, FileStamp

log = logging.getLogger("dmmig.records")

INCOMING_VERSION = 1

T = TypeVar("T")


def split(cls: type[T], data: dict[str, Any], what: str, version: int,
          current: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """DATA's keys that are fields of CLS, and the others (warned about, for `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
             if f.init and f.name not in ("extra", "version")}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    if version > current:
        log.warning("%s was written by a newer dmmig (record version %s, this one reads %s): read as far as "
                    "this version understands it", what, version, current)
    if extra:
        log.warning("%s has keys this dmmig does not know (%s): kept as they are, not used",
                    what, ", ".join(sorted(extra)))
    return known, extra


def to_json(obj: Any) -> dict[str, Any]:
    """OBJ (a record dataclass) as the JSON object saved: its unknown keys, then its fields
    (under their JSON_KEYS name, if they have one); the same for the records in it.

    A record's field that is None is left out, as the writers before typed records left a key
    out until it had a value: a dmmig of that version reading this file (a downgrade) finds
    what it expects ("base_era" not in copy: no base pass yet; no "tunnel": not probed)."""
    record = hasattr(obj, "extra")
    out: dict[str, Any] = dict(getattr(obj, "extra", None) or {})
    keys: dict[str, str] = getattr(obj, "JSON_KEYS", {})
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name != "extra" and not (record and v is None):
            out[keys.get(f.name, f.name)] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_json(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def version_of(data: dict[str, Any]) -> int:
    v = data.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def export_of(data: dict[str, Any] | None, what: str) -> nbd.Export | None:
    """A qemu-nbd export as journaled (its dataclass's fields; a record from before unix
    sockets has only addr and port)."""
    if not data:
        return None
    known, _ = split(nbd.Export, data, what, 0, 0)
    return nbd.Export(**known)


@dataclass
class Incoming:
    """The agent's record of a disk a source's dmmig is (or was) migrating into this host."""
    name: str
    path: str
    size: int
    created: bool = False            # dmmig created the disk here (abort removes it)
    created_as: str | None = None    # "file" or "lv"; None for a record of a version that did not say
    migration: str | None = None     # the source's migration id
    # written before migration ids existed (version 0 without "migration"): taken for the same
    # migration as any request, as that version did (a migration in flight across an upgrade)
    pre_ids: bool = False
    block_size: int | None = None
    since: float | None = None
    export: nbd.Export | None = None
    written: bool = False            # exported once: no longer known to read as zeros
    handed_over: float | None = None  # when the `add` here got the source's yes
    version: int = INCOMING_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str, what: str) -> Incoming:
        v = version_of(data)
        data = {k: val for k, val in data.items() if k != "version"}
        if v < 1:
            # version 0 (dmmig before typed records): the same keys, some of them missing;
            # handed_over could be a bool (tests and hand edits), now a time
            data.setdefault("name", name)
            if "migration" not in data:
                data["pre_ids"] = True
        known, extra = split(cls, data, what, v, INCOMING_VERSION)
        known["export"] = export_of(known.get("export"), f"{what} (its export)")
        ho = known.get("handed_over")
        known["handed_over"] = float(ho) if ho else None
        known["created"] = bool(known.get("created"))
        known["written"] = bool(known.get("written"))
        return cls(**known, extra=extra)

    def created_how(self) -> str | None:
        """'file' or 'lv' if dmmig created the disk. A record of an earlier version says only
        `created`: that version made an LV (lvcreate) for a block device, else a sparse file."""
        if not self.created:
            return None
        if self.created_as:
            return self.created_as
        try:
            return "lv" if stat.S_ISBLK(os.stat(self.path).st_mode) else "file"
        except OSError:
            return "file"


@dataclass
class Unreadable:
    """A record that is not JSON (a torn write of a version without atomic saves, a hand edit)."""
    error: str


def read_incoming(path: str, name: str) -> Incoming | None:
    """The record at PATH, or None if there is none; raises OSError/ValueError if unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        return Incoming.from_json(data, name, path)
    except (TypeError, ValueError) as e:  # a required key missing, a wrong type
        raise ValueError(f"{path}: {e}") from e



DESTINATION_VERSION = 1


@dataclass
class Destination:
    """Where a disk is being migrated to (the journal's `dest`): how to log in there (what
    Remote and OpenSSH's tunnel connect with), the disk there, and how NBD reaches it."""
    host: str
    user: str
    port: int
    known_hosts: str
    disk: str
    identity: str | None = None
    transport: str = "ssh"             # or "nbd"
    nbd_address: str | None = None     # --transport nbd: where the export listens
    remote_dmmig: str = "dmmig"
    remote_state_dir: str | None = None  # the operator's --remote-state-dir (None: the agent's default)
    insecure: bool = False             # --transport nbd without TLS: the operator's explicit choice
    tunnel: str | None = None          # --transport ssh: the mirror leg's mode (None: not chosen yet)
    tunnel_probe: str | None = None    # why the plan's probe chose it (None: --tunnel chose it)
    tls: str | None = None             # --transport nbd: this migration's credentials here
    export: nbd.Export | None = None   # the export there, as its agent reported it
    remote_state: str | None = None    # the agent's state dir there, as its hello said
    version: int = DESTINATION_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> Destination:
        v = version_of(data)
        # version 0 (dmmig before typed records): the same keys; "tunnel" absent until chosen
        known, extra = split(cls, {k: val for k, val in data.items() if k != "version"}, what, v,
                             DESTINATION_VERSION)
        known["export"] = export_of(known.get("export"), f"{what} (its export)")
        known["insecure"] = bool(known.get("insecure"))
        return cls(**known, extra=extra)

    def copy(self) -> Destination:
        """A copy to change (a plan's decisions) before it is journaled."""
        return dataclasses.replace(self, extra=dict(self.extra))


def destination_of(data: dict[str, Any] | None, what: str) -> Destination | None:
    """The journal's `dest`: {} (version 0) or null when none is known."""
    return Destination.from_json(data, what) if data else None


def fence_of(data: Any) -> Fence:
    """A writefence.Fence as saved (to_json); ValueError/TypeError if it is not one."""
    if not isinstance(data, dict):
        raise ValueError(f"not a fence: {data!r:.100}")
    dev, file = data.get("device"), data.get("file")
    return Fence(path=str(data["path"]), boot_id=str(data["boot_id"]),
                 device=Counters(**dev) if dev else None, file=FileStamp(**file) if file else None,
                 file_path=data.get("file_path"), settled=data.get("settled", True) is True)


def counters_of(data: Any) -> Counters:
    if not isinstance(data, dict):
        raise ValueError(f"not write counters: {data!r:.100}")
    return Counters(**data)


WARM_VERSION = 1
KEPT = "kept"            # the old source's disk, left behind by a migration
TOOK_OVER = "took-over"  # the new owner's disk: the destination of that migration


@dataclass
class Warm:
    """A generation (NAME.warm.json, on both hosts of a finished migration): the disk PATH
    here and the other host's disk were identical when it was recorded, and FENCE is what
    PATH was then (dmmig/adapters/writefence.py). A warm copy back needs both halves intact."""
    name: str
    generation: str                 # the pair's id, the same on both hosts
    role: str                       # KEPT or TOOK_OVER
    path: str
    size: int
    at: float
    fence: Fence
    peer: str = ""                  # the other host, as this host knows it (for status)
    tracking: bool = False          # TOOK_OVER: era tracks the writes here since `wrap`
    broken: str | None = None       # why this generation can no longer make a copy warm
    version: int = WARM_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> Warm:
        v = version_of(data)
        known, extra = split(cls, {k: val for k, val in data.items() if k != "version"}, what, v, WARM_VERSION)
        known["fence"] = fence_of(known.get("fence"))
        known["tracking"] = bool(known.get("tracking"))
        return cls(**known, extra=extra)


def read_warm(path: str) -> Warm | None:
    """The generation at PATH, None if there is none; ValueError if it is unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        return Warm.from_json(data, path)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass
class WarmTrack:
    """The source's era tracking for a warm copy (the journal's copy.warm): era device ERA_DEV,
    made over the origin before anything could write it after generation GENERATION, tracks
    every write since era ERA; ORIGIN and ERA_DEV are the write counters when it was made
    (writefence.bypassed). DECISION: what this migration's copy chose ("warm: ..." or
    "cold: full copy, because ..."), None until a copy asked the destination."""
    generation: str
    era: int
    origin: Counters
    era_dev: Counters
    decision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, what: str) -> WarmTrack:
        known, extra = split(cls, dict(data), what, 0, 0)
        known["origin"] = counters_of(known.get("origin"))
        known["era_dev"] = counters_of(known.get("era_dev"))
        return cls(**known, extra=extra)

    @property
    def warm(self) -> bool:
        return bool(self.decision and self.decision.startswith("warm"))


COPY_VERSION = 1


@dataclass
class BasePass:
    """The copy's base pass, once done: where it began and what the copier counted."""
    JSON_KEYS: ClassVar[dict[str, str]] = {"start": "from"}
    start: int = 0        # the offset the (last, resumed) base pass began at
    read: int = 0
    sent: int = 0         # payload bytes written over NBD
    zeroed: int = 0       # bytes zeroed with NBD write-zeroes
    skipped: int = 0      # zero bytes not sent at all (the destination known zero)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> BasePass:
        data = {("start" if k == "from" else k): v for k, v in data.items()}
        known, extra = split(cls, data, what, 0, 0)
        return cls(**known, extra=extra)


@dataclass
class Round:
    """A round of the copy: what era recorded since SINCE, sent."""
    since: int
    dirty_bytes: int
    read: int = 0
    sent: int = 0
    zeroed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    era_seconds: float = 0.0  # the drained era snapshot's query
    full: str | None = None   # why this round sent the whole disk (a discard since the last one), else None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> Round:
        known, extra = split(cls, data, what, 0, 0)
        return cls(**known, extra=extra)


@dataclass
class CopyState:
    """The copy's progress (the journal's `copy`), from prepare on: a killed copy resumes from
    it, the cutover and the rounds query era from next_since."""
    migration: str | None = None     # this migration's id (None: prepared by a version without ids)
    zeroed: bool | None = None       # the destination disk was known zero when the copy began (None: not asked)
    base_era: int | None = None      # the base pass reads every write tagged below it (None: not taken yet)
    base_offset: int = 0             # how far the base pass got
    base_started: bool = False       # a base pass wrote to the destination (it is no longer known zero)
    base_done: bool = False
    base: BasePass | None = None
    next_since: int | None = None    # the era the next round (or the cutover) queries from
    # the era device's discard mark (writefence.discard_mark) read with next_since, drained;
    # another one later means a discard era recorded by its first block only (Stack.discards)
    discards: str | None = None
    rounds: list[Round] = field(default_factory=list)
    warm: WarmTrack | None = None    # tracking since a generation (a warm copy back); None: none
    version: int = COPY_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, what: str) -> CopyState:
        """Version 0 (before typed records): the same keys, each absent until it had a value."""
        data = dict(data or {})
        v = version_of(data)
        data.pop("version", None)
        known, extra = split(cls, data, what, v, COPY_VERSION)
        if known.get("base"):
            known["base"] = BasePass.from_json(known["base"], f"{what} (base)")
        else:
            known["base"] = None
        known["warm"] = WarmTrack.from_json(known["warm"], f"{what} (warm)") if known.get("warm") else None
        known["rounds"] = [Round.from_json(r, f"{what} (round {i + 1})")
                           for i, r in enumerate(known.get("rounds") or [])]
        known["base_offset"] = int(known.get("base_offset") or 0)
        known["base_started"] = bool(known.get("base_started"))
        known["base_done"] = bool(known.get("base_done"))
        return cls(**known, extra=extra)

    def passes(self) -> list[BasePass | Round]:
        return ([self.base] if self.base else []) + list(self.rounds)


MIRROR_VERSION = 1


def _sub(cls: type[Any], data: Any, what: str) -> Any:
    """A record inside another (no version of its own: its parent's covers it)."""
    if not data:
        return None
    known, extra = split(cls, dict(data), what, 0, 0)
    return cls(**known, extra=extra)


@dataclass
class Tunnel:
    """--transport ssh: the OpenSSH tunnel of the mirror's NBD leg (adapters/tunnel.py)."""
    sock: str                   # the unix socket here nbd-client connects to
    pid: int | None = None      # None: planned, not started yet (its log names it)
    mode: str | None = None     # "forward" or "relay"; None: an older dmmig's (forward)
    log: str | None = None      # None: an older dmmig's, found by its socket
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Synced:
    """The mirror's first full sync after the cutover."""
    events: int                 # the top's dm event counter then: any later event is news
    at: float = 0.0
    seconds: float = 0.0
    kernel_out_of_sync_first_seen: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Handover:
    """The gate's answer to the destination's `add` (flows/handover.py)."""
    at: float = 0.0
    ok: bool = False
    why: str = ""
    caught_up_bytes: int = 0
    seconds: float = 0.0
    cap_seconds: float = 0.0
    delivered: bool | None = False  # None: the destination did not confirm the yes either way
    generation: str | None = None   # warm copies: the generation this yes recorded on both hosts
    steps_ms: dict[str, int] | None = None  # where the window's time went (dest_*: there)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MirrorState:
    """The source's mirror of a disk (the journal's `mirror`): every resource journaled before
    or right after it exists (teardown finds it), and what the cutover and the gate saw."""
    tunnel: Tunnel | None = None
    log_file: str | None = None
    log_devs: list[str] = field(default_factory=list)
    nbd: str | None = None           # the kernel's NBD device of leg 1
    watcher: int | None = None       # the leg watcher's pid
    era: int | None = None           # the era the cutover's second query ended at
    pause_seconds: float | None = None
    pauses: list[float] = field(default_factory=list)
    resync_regions: int | None = None
    resync_bytes: int | None = None
    regions: int | None = None
    region_bytes: int | None = None
    parts: int | None = None
    resync_ranges: list[list[int]] = field(default_factory=list)  # the first SHOWN_RANGES of them
    resync_ranges_cut: bool = False
    synced: Synced | None = None
    handover: Handover | None = None
    version: int = MIRROR_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, what: str) -> MirrorState:
        """Version 0 (before typed records): the same keys, each absent until it had a value."""
        data = dict(data or {})
        v = version_of(data)
        data.pop("version", None)
        known, extra = split(cls, data, what, v, MIRROR_VERSION)
        known["tunnel"] = _sub(Tunnel, known.get("tunnel"), f"{what} (tunnel)")
        known["synced"] = _sub(Synced, known.get("synced"), f"{what} (synced)")
        known["handover"] = _sub(Handover, known.get("handover"), f"{what} (handover)")
        for k in ("log_devs", "pauses", "resync_ranges"):
            known[k] = list(known.get(k) or [])
        known["resync_ranges_cut"] = bool(known.get("resync_ranges_cut"))
        return cls(**known, extra=extra)

    def empty(self) -> bool:
        """Nothing of a mirror journaled (keys a newer dmmig wrote count as something)."""
        return self == MirrorState()


ADOPTED_VERSION = 1


@dataclass
class Adopted:
    """The LV a disk was adopted from (the journal's `adopted`, core/stack.py adopt): its own dm
    device, which blkback (or any opener) holds open and whose table dmmig swapped for linear
    over its top device, and that table as LVM had made it, to put back at the end."""
    lv: str                          # its dm name (vg0-vm1)
    path: str                        # as the operator gave it (/dev/vg0/vm1): the destination's default
    devno: str                       # major:minor: found by it even if renamed (lvrename)
    uuid: str                        # its dm uuid, LVM-...
    table: str                       # its table before the adopt, verbatim (one line per segment)
    top_devno: str | None = None     # dmmig-NAME's, once made: while adopted, the LV is linear over it
    version: int = ADOPTED_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, what: str) -> Adopted | None:
        if not data:
            return None
        v = version_of(data)
        known, extra = split(cls, {k: val for k, val in data.items() if k != "version"}, what, v, ADOPTED_VERSION)
        return cls(**known, extra=extra)


HEALTH_VERSION = 1


@dataclass
class LegFailure:
    """The leg watcher's record of the first leg failure it saw (NAME.health.json)."""
    failed_at: float
    health: str = ""                 # the mirror's health characters then, one per leg
    log_health: str | None = None
    events: int = 0                  # the top's dm event counter then
    failed_legs: list[int] = field(default_factory=list)
    version: int = HEALTH_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str) -> LegFailure:
        """Version 0 (before typed records): the same keys."""
        v = version_of(data)
        known, extra = split(cls, {k: val for k, val in data.items() if k != "version"}, what, v, HEALTH_VERSION)
        return cls(**known, extra=extra)
