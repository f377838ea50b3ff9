"""Input checks done before anything changes."""
from __future__ import annotations

import re
import shutil

from dmmig.errors import BadInput, MissingDependency

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}")
# the state dir holds NAME.json (journal) next to NAME.dest.json (an incoming disk, the agent's)
# and NAME.health.json (the mirror watcher's), NAME.gate.sock/.lock (the agent's handover gate):
# a disk named X.dest would be read as X's record, X.gate's journal lock would be X's gate lock
RESERVED_SUFFIXES = (".dest", ".health", ".gate")
SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def disk_name(name: str) -> str:
    """A disk NAME becomes part of dm names, file names and XenStore values."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise BadInput(
            f"invalid disk name {name!r}: use letters, digits and _ . + - "
            "(no '/', spaces, '..' or shell characters; at most 96 characters; "
            "first character a letter or digit)")
    if name.endswith(RESERVED_SUFFIXES):
        raise BadInput(f"invalid disk name {name!r}: names ending in {' or '.join(RESERVED_SUFFIXES)} are "
                       "reserved for dmmig's own records")
    return name


def parse_size(text: str) -> int:
    """'64K', '1M', '4096', '1.5G' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise BadInput(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def era_block_size(nbytes: int) -> int:
    """Era block size in sectors. A multiple of 4 KiB (dm-era) and a power of two (one
    mirror region per era block at cutover)."""
    if nbytes <= 0 or nbytes % 4096:
        raise BadInput(f"block size {nbytes} bytes is not a multiple of 4 KiB (dm-era's minimum unit)")
    if nbytes & (nbytes - 1):
        raise BadInput(f"block size {nbytes} bytes is not a power of two "
                       "(dm-mirror regions must be, and dmmig uses one region per era block)")
    return nbytes // 512


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = {"era_invalidate": "thin-provisioning-tools", "dmsetup": "dmsetup",
                "losetup": "mount", "nbd-client": "nbd-client", "nbdkit": "nbdkit"}
        named = ", ".join(f"{t} (Debian package {pkgs.get(t, t)})" for t in missing)
        raise MissingDependency(f"missing tool(s): {named}", hint="run the README's install command")
