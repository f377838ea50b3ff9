"""Names, in one place: a disk's NAME from its target path, the dm devices of a NAME, and
every file dmmig keeps for a NAME in a state directory (both hosts use the same scheme).

The state directory is flat: NAME.json (the source's journal) next to NAME.dest.json (the
destination agent's record of an incoming disk) and the others below; validate's
RESERVED_SUFFIXES keeps one disk's files from being another NAME's."""
from __future__ import annotations

import os
from dataclasses import dataclass

from dmmig.errors import BadInput
from dmmig.validate import RESERVED_SUFFIXES, disk_name

SCRIPT = "block-dmmig"
# what lives only as long as this boot's dm devices do, on memory whatever the state directory
# is: the mirror's disk logs (rewritten after every region the resync recovers)
RUN_DIR = "/run/dmmig"  # the Xen block script's name, as a disk line's script= names it


def top_name(name: str) -> str:
    """The dm device blkback opens: its table is the only one ever swapped under the guest."""
    return f"dmmig-{name}"


def lv_name(name: str) -> str:
    """An adopted LV's own table, moved under dmmig's top device (core/stack.py adopt)."""
    return f"dmmig-{name}-lv"


def era_name(name: str) -> str:
    return f"dmmig-{name}-era"


def format_devno(rdev: int) -> str:
    """major:minor in hex without 0x, as XenStore's physical-device holds it."""
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


def disk_name_for(params: str) -> str:
    """The disk NAME for a target path: '/dev/vg0/vm1' -> 'vg0-vm1', '/srv/xen/vm1.img' ->
    'srv-xen-vm1.img', '/dev/vg0/vm-1' -> 'vg0-vm--1'.

    The path is normalised, '/dev/' (else just '/') dropped, and its components joined by '-'.
    Inside a component '-' is doubled (as lvm2 names /dev/mapper entries), a '-' that starts
    or ends a component, a second '.' in a row and every character outside [A-Za-z0-9_.]
    become '+' and two hex digits per UTF-8 byte (so does the '.' of a name that would end in
    a reserved suffix, '.dest' or '.health'). So a single '-' always separates components and
    different paths under /dev (or different paths outside it) get different names. The one
    overlap, /dev/X vs /X, is refused by wrap: a NAME already wrapping another origin is never
    shared."""
    if not params.startswith("/"):
        raise BadInput(f"target {params!r} is not an absolute path: block-dmmig needs a block device "
                       "(e.g. target=/dev/vg0/vm1) or a disk image file")
    path = os.path.normpath(params)
    rel = path[len("/dev/"):] if path.startswith("/dev/") else "" if path == "/dev" else path.lstrip("/")
    if not rel:
        raise BadInput(f"target {params!r} names no disk")
    name = "-".join(_component(c) for c in rel.split("/"))
    for suffix in RESERVED_SUFFIXES:  # vm.dest -> vm+2edest: the '.' encoded, the name stays unique
        if name.endswith(suffix):
            name = name[:-len(suffix)] + "+2e" + suffix[1:]
    try:
        return disk_name(name)
    except BadInput as e:
        raise BadInput(f"target {params!r} gives the disk name {name!r}, which dmmig cannot use: "
                       f"{e.message}; rename or symlink the disk") from e


def _component(c: str) -> str:
    out: list[str] = []
    for i, ch in enumerate(c):
        plain = ch.isascii() and (ch.isalnum() or ch == "_" or (ch == "." and out[-1:] != ["."]))
        if plain or (ch == "-" and 0 < i < len(c) - 1):
            out.append(ch * 2 if ch == "-" else ch)
        else:
            out.append("".join(f"+{b:02x}" for b in ch.encode("utf-8", "surrogateescape")))
    return "".join(out)


INCOMING_SUFFIX = ".dest.json"


@dataclass(frozen=True)
class Files:
    """The files of disk NAME in state directory STATE. NAME is validated (validate.disk_name)
    before it becomes part of a path."""
    state: str
    name: str

    def __post_init__(self) -> None:
        disk_name(self.name)

    def _at(self, suffix: str) -> str:
        return os.path.join(self.state, f"{self.name}.{suffix}")

    # the source
    @property
    def journal(self) -> str:
        return self._at("json")

    @property
    def lock(self) -> str:
        return self._at("lock")

    @property
    def era_metadata(self) -> str:
        return self._at("era-meta")

    @property
    def dirty(self) -> str:
        """era_invalidate's answer while a round copies it (a killed dmmig leaves it: abort removes it)."""
        return self._at("dirty.xml")

    @property
    def health(self) -> str:
        return self._at("health.json")

    @property
    def guard_log(self) -> str:
        return self._at("guard.log")

    @property
    def mirror_log(self) -> str:
        """The mirror's disk logs, one slot per part (dmmig/core/mirrorlog.py): in RUN_DIR, a tmpfs."""
        return os.path.join(RUN_DIR, f"{self.name}.mirror-log")

    def mirror(self, what: str) -> str:
        """The mirror's files: mirror-log, tunnel.log, nbd.sock, tls (dmmig/core/mirror.py)."""
        return self._at(what)

    # the handover gate (the source's agent listens; the destination's hotplug asks)
    @property
    def gate_socket(self) -> str:
        return self._at("gate.sock")

    @property
    def gate_lock(self) -> str:
        return self._at("gate.lock")

    @property
    def warm(self) -> str:
        """The generation of a finished migration (records.Warm), on both of its hosts."""
        return self._at("warm.json")

    # the destination
    @property
    def incoming(self) -> str:
        return os.path.join(self.state, self.name + INCOMING_SUFFIX)

    @property
    def qemu_nbd_pid(self) -> str:
        return self._at("qemu-nbd.pid")

    @property
    def export_socket(self) -> str:
        return os.path.join(export_dir(self.state), f"{self.name}.sock")

    @property
    def export_tls(self) -> str:
        return os.path.join(export_dir(self.state), f"{self.name}.tls")


def export_dir(state: str) -> str:
    """Where the exports' unix sockets and TLS keys live: a directory only root can enter."""
    return os.path.join(state, "nbd")


def incoming_names(files: list[str]) -> list[str]:
    """The NAMEs of the incoming records among a state directory's FILES."""
    return [f[:-len(INCOMING_SUFFIX)] for f in sorted(files) if f.endswith(INCOMING_SUFFIX)]
