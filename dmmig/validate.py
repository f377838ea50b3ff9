"""Input checks done before anything changes."""
from __future__ import annotations

import re
import shutil

from dmmig.errors import BadInput, MissingDependency

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}")
# the state dir holds NAME.json (journal) next to NAME.dest.json (an incoming disk, the agent's)
# and NAME.health.json (the mirror watcher's), NAME.gate.sock/.lock (the agent's handover gate),
# NAME.warm.json (a finished migration's generation, dmmig/flows/warm.py):
# a disk named X.dest would be read as X's record, X.gate's journal lock would be X's gate lock
RESERVED_SUFFIXES = (".dest", ".health", ".gate", ".warm")
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
        raise missing_tools(missing)


def missing_tools(missing: list[str], where: str = "") -> MissingDependency:
    """The error naming MISSING tools (and their Debian packages), on this host or WHERE."""
    pkgs = {"era_invalidate": "thin-provisioning-tools", "dmsetup": "dmsetup",
            "losetup": "mount", "nbd-client": "nbd-client", "ssh": "openssh-client",
            "qemu-nbd": "qemu-utils"}
    named = ", ".join(f"{t} (Debian package {pkgs.get(t, t)})" for t in missing)
    return MissingDependency(f"{where + ': ' if where else ''}missing tool(s): {named}",
                             hint="run the README's install command" + (" there" if where else ""))


NBD_TIMEOUT_RANGE = (1, 600)
ERA_MAX_BLOCKS = (1 << 31) - 1  # dm-era's valid_nr_blocks: fewer than 2^31 blocks


def nbd_timeout(seconds: int) -> int:
    """The mirror leg's NBD request timeout: 0 would let a dead destination hang the guest's
    writes forever (the kernel only logs "Possible stuck request")."""
    lo, hi = NBD_TIMEOUT_RANGE
    if not lo <= seconds <= hi:
        raise BadInput(f"--nbd-timeout must be {lo}..{hi} seconds, got {seconds}")
    return seconds


def block_fits(block_sectors: int, length_sectors: int, what: str) -> None:
    """An era block (= mirror region) the disk can use: dm-mirror refuses a region larger than
    the device (found only at cutover, after the whole copy), dm-era 2^31 blocks or more."""
    if block_sectors > length_sectors:
        raise BadInput(f"{what}: block size {block_sectors * 512} bytes is larger than the disk "
                       f"({length_sectors * 512} bytes): dm-mirror cannot use a region larger than the device",
                       hint="use a smaller --block-size (default 64K)")
    if -(-length_sectors // block_sectors) > ERA_MAX_BLOCKS:
        raise BadInput(f"{what}: block size {block_sectors * 512} bytes makes more than 2^31 era blocks of "
                       f"{length_sectors * 512} bytes", hint="use a larger --block-size")


# ---- [USER@]HOST -----------------------------------------------------------------------------
# The destination reaches paramiko, OpenSSH's command line (after `--`) and `xl migrate`, which
# hands it to `sh -c "exec ssh HOST xl migrate-receive"` (tools/xl/xl_migrate.c): no word may
# start with '-', and nothing a shell would read as more than a word may pass.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")        # RFC 1123
# Debian's useradd takes more with --badname, but these are the names it makes by default
# plus upper case and '.'; no '$' (a shell expansion in xl's `sh -c`)
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def host_name(host: str) -> str:
    """An RFC 1123 host name, an IPv4 address or an IPv6 literal (bare or in brackets, with an
    optional %scope); returns it without brackets."""
    import ipaddress
    bad = BadInput(f"invalid destination host {host!r}: expected a host name (RFC 1123), "
                   "an IPv4 address or an IPv6 address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise bad
    if ":" in host:
        addr, _, scope = host.partition("%")
        if "%" in host and not _SCOPE.fullmatch(scope):
            raise bad
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise bad from None
        return host
    if not _HOSTNAME.fullmatch(host) or len(host.rstrip(".")) > 253:
        raise bad
    if all(p.isdigit() for p in host.rstrip(".").split(".")):  # looks like IPv4: must be one
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            raise bad from None
    return host


def user_name(user: str) -> str:
    if not _USER.fullmatch(user):
        raise BadInput(f"invalid destination user {user!r}: use letters, digits and _ . - "
                       "(first a letter or _, at most 32 characters)")
    return user


def destination(spec: str) -> tuple[str | None, str]:
    """`[USER@]HOST` -> (USER or None, HOST), both validated."""
    user, at, host = spec.rpartition("@")
    try:
        return (user_name(user) if at else None), host_name(host)
    except BadInput as e:
        raise BadInput(f"invalid destination {spec!r}: {e.message.removeprefix('invalid destination ')}",
                       hint="give the destination as [USER@]HOST (host name, IPv4 or IPv6 address)") from e


def ssh_path(what: str, path: str) -> str:
    """A file OpenSSH reads from an -o option: it splits those at whitespace and expands
    %-tokens, so neither may be in the path."""
    if not path or any(c.isspace() for c in path) or "%" in path:
        raise BadInput(f"{what} {path!r}: the path must not contain whitespace or '%' (OpenSSH reads it)")
    return path
