"""The destination agent's confinement: which paths it may prepare, create, export or digest.

Whoever can run `dmmig agent` on a host (a source's dmmig, or anyone holding the key a
`command=`-restricted authorized_keys entry lets run it) gets only this from it:

- block devices whose path matches one of `devices` (shell globs; `*` also matches `/`);
- regular files under one of `file_roots`, checked on the path as given and again with every
  symlink resolved (a link out of a root is refused);
- a new disk (`create`) only where that is allowed, only as large as the free space there
  and `max_create`;
- export and digest only of a disk it prepared, within that disk's size.

No path with `..`, `.`, `//` or control characters is accepted. The settings come from
/etc/dmmig/agent.conf ($DMMIG_AGENT_CONF, or `dmmig agent --config FILE`); flags of
`dmmig agent` replace the file's value of the same setting:

    # /etc/dmmig/agent.conf  (key = value; an [agent] section header is optional)
    file_roots = /var/lib/xen/images /srv/xen    # the default; `none`: no files at all
    devices = /dev/*                             # the default
    max_create = 0                               # bytes (K/M/G/T suffixes); 0: free space only
    create = yes                                 # no: the agent creates no disk

The default file roots are where Xen's own tools keep disk images (/var/lib/xen/images: xl's
and virt-install's examples; /srv/xen: xen-tools' usual `dir`), never /etc, /root or /.
"""
from __future__ import annotations

import configparser
import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field, replace

from dmmig.adapters.lvm import NAME as LVM_NAME
from dmmig.adapters.lvm import Lvm
from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput
from dmmig.validate import parse_size

DEFAULT_CONF = "/etc/dmmig/agent.conf"
DEFAULT_FILE_ROOTS = ("/var/lib/xen/images", "/srv/xen")
DEFAULT_DEVICES = ("/dev/*",)
MAX_CHUNK = 64 << 20   # a digest chunk is one read buffer in the agent
KEYS = ("file_roots", "devices", "max_create", "create")
# LVM's own rule for VG and LV names (lvm(8) "VALID NAMES"), and never an option to lvcreate
# /dev/X/Y where X is no VG: never taken for /dev/VG/LV
_NOT_VG = ("mapper", "shm", "disk", "block", "pts", "mqueue", "hugepages", "char", "bus", "fd", "net", "xen")


class Refused(BadInput):
    """The agent's confinement refuses the request."""


@dataclass(frozen=True)
class Policy:
    file_roots: tuple[str, ...] = DEFAULT_FILE_ROOTS
    devices: tuple[str, ...] = DEFAULT_DEVICES
    max_create: int = 0
    create: bool = True
    origin: str = "built-in defaults"   # where the settings came from, named in refusals
    _real_roots: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        for r in self.file_roots:
            if not r.startswith("/") or os.path.normpath(r) != r or r.startswith("//"):
                raise BadInput(f"file root {r!r} is not an absolute, normalised path ({self.origin})")
        for g in self.devices:
            if not g.startswith("/"):
                raise BadInput(f"device pattern {g!r} is not an absolute path pattern ({self.origin})")
        object.__setattr__(self, "_real_roots", tuple(os.path.realpath(r) for r in self.file_roots))

    # ---- paths ----------------------------------------------------------------------------
    def lexical(self, path: str) -> str:
        """PATH could be one the agent serves (a device pattern or a file root names it):
        checked before PATH is looked at, so a refusal tells nothing of what exists there."""
        clean_path(path)
        if not (_under(path, self.file_roots) or any(fnmatch.fnmatchcase(path, g) for g in self.devices)):
            raise Refused(f"{path} is not under this agent's file roots (file_roots = "
                          f"{' '.join(self.file_roots) or 'none'}) and matches none of its device patterns "
                          f"(devices = {' '.join(self.devices) or 'none'}; {self.origin})",
                          hint="put disk images under a file root, or allow the path in the destination's "
                               "/etc/dmmig/agent.conf")
        return path

    def existing(self, path: str) -> str:
        """PATH as the agent may use it: 'block' or 'file'. Refuses anything else."""
        self.lexical(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BadInput(f"destination disk {path} does not exist", hint="pass --create to make it") from None
        except OSError as e:
            raise Refused(f"{path}: cannot stat: {e.strerror}") from e
        if stat.S_ISBLK(st.st_mode):
            self._device_allowed(path)
            return "block"
        if stat.S_ISREG(st.st_mode):
            self._file_allowed(path, os.path.realpath(path))
            return "file"
        raise Refused(f"{path} is neither a block device nor a regular file: the agent serves only disks")

    def creatable(self, path: str, size: int, runner: Runner) -> tuple[str, str, str]:
        """('file', parent dir, '') or ('lv', VG, LV) for a new disk of SIZE bytes at PATH,
        whose last component does not exist. Refuses what the agent may not create, or what
        does not fit."""
        self.lexical(path)
        if not self.create:
            raise Refused(f"cannot create {path}: this agent creates no disks (create = no, {self.origin})",
                          hint="create the disk on the destination first")
        if self.max_create and size > self.max_create:
            raise Refused(f"cannot create {path}: {size} bytes is more than this agent creates "
                          f"(max_create = {self.max_create}, {self.origin})")
        if os.path.lexists(path):
            raise Refused(f"cannot create {path}: it exists (a dangling symlink?)")
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "dev" and parts[2] not in _NOT_VG and Lvm(runner).is_vg(parts[2]):
            vg, lv = parts[2], parts[3]
            if not LVM_NAME.fullmatch(lv) or lv.startswith(("snapshot", "pvmove")) or lv in (".", ".."):
                raise Refused(f"cannot create {path}: {lv!r} is no valid LV name")
            self._device_allowed(path)
            free = Lvm(runner).vg_free(vg)
            if free is None:
                raise Refused(f"cannot tell the free space of volume group {vg}")
            if size > free:
                raise Refused(f"cannot create {path}: {size} bytes do not fit in the {free} bytes free in "
                              f"volume group {vg}")
            return "lv", vg, lv
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise Refused(f"cannot create {path}: {parent} is not a directory")
        self._file_allowed(path, os.path.join(os.path.realpath(parent), os.path.basename(path)))
        sv = os.statvfs(parent)
        free = sv.f_bavail * sv.f_frsize
        if size > free:
            raise Refused(f"cannot create {path}: {size} bytes do not fit in the {free} bytes free in {parent}")
        return "file", parent, ""

    def _device_allowed(self, path: str) -> None:
        if not any(fnmatch.fnmatchcase(path, g) for g in self.devices):
            raise Refused(f"{path} is not a block device this agent serves (devices = "
                          f"{' '.join(self.devices) or 'none'}, {self.origin})",
                          hint="allow it in the destination's /etc/dmmig/agent.conf")

    def _file_allowed(self, path: str, real: str) -> None:
        if not _under(path, self.file_roots) or not _under(real, self._real_roots):
            where = f"{path} (really {real})" if real != path else path
            raise Refused(f"{where} is not under this agent's file roots (file_roots = "
                          f"{' '.join(self.file_roots) or 'none'}, {self.origin})",
                          hint="put disk images under a file root, or add one in the destination's "
                               "/etc/dmmig/agent.conf")


def clean_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise Refused(f"{path!r} is not an absolute path")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise Refused(f"{path!r} has control characters")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise Refused(f"{path!r} is not a normalised path (no '..', '.', '//' or trailing '/')")
    return path


def size_ok(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512 or size >= 1 << 62:
        raise Refused(f"invalid disk size {size!r}: a positive multiple of 512 bytes")
    return size


def range_ok(path: str, disk_size: int, offset: object, length: object, chunk: object) -> tuple[int, int, int]:
    """A digest request within the disk's size, in chunks the agent reads one at a time."""
    for v in (offset, length, chunk):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise Refused(f"invalid digest range: offset {offset!r}, length {length!r}, chunk {chunk!r}")
    assert isinstance(offset, int) and isinstance(length, int) and isinstance(chunk, int)
    if not 0 < chunk <= MAX_CHUNK or chunk % 512:
        raise Refused(f"invalid digest chunk {chunk}: a multiple of 512 bytes up to {MAX_CHUNK}")
    if offset + length > disk_size:
        raise Refused(f"digest of {path} beyond the migrated disk's {disk_size} bytes "
                      f"(offset {offset}, length {length})")
    return offset, length, chunk


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path.startswith(r.rstrip("/") + "/") for r in roots)


# ---- settings -------------------------------------------------------------------------------
def load(path: str | None = None, **flags: object) -> Policy:
    """The agent's policy: PATH (default $DMMIG_AGENT_CONF or /etc/dmmig/agent.conf; a missing
    default file means the built-in defaults), then FLAGS that are not None."""
    explicit = path or os.environ.get("DMMIG_AGENT_CONF")
    conf = explicit or DEFAULT_CONF
    values: dict[str, str] = {}
    origin = "built-in defaults"
    try:
        with open(conf) as f:
            text = f.read()
        values = parse(text, conf)
        origin = conf
    except FileNotFoundError:
        if explicit:
            raise BadInput(f"agent configuration {conf} does not exist") from None
    except OSError as e:
        raise BadInput(f"cannot read the agent configuration {conf}: {e.strerror}") from e
    p = Policy(origin=origin)
    try:
        if "file_roots" in values:
            p = replace(p, file_roots=_list(values["file_roots"]))
        if "devices" in values:
            p = replace(p, devices=_list(values["devices"]))
        if "max_create" in values:
            p = replace(p, max_create=parse_size(values["max_create"]))
        if "create" in values:
            p = replace(p, create=_bool(values["create"], conf))
    except BadInput as e:
        raise BadInput(f"{conf}: {e.message}") from e
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        p = replace(p, origin=f"{p.origin} and `dmmig agent` flags", **given)  # type: ignore[arg-type]
    return p


def parse(text: str, where: str) -> dict[str, str]:
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",), delimiters=("=",))
    body = text if re.search(r"^\s*\[", text, re.M) else "[agent]\n" + text
    try:
        cp.read_string(body, source=where)
    except configparser.Error as e:
        raise BadInput(f"cannot parse the agent configuration {where}: {e}") from e
    extra = [s for s in cp.sections() if s != "agent"]
    if extra:
        raise BadInput(f"{where}: unknown section(s) {', '.join(extra)}; settings go under [agent]")
    values = dict(cp["agent"]) if cp.has_section("agent") else {}
    unknown = sorted(set(values) - set(KEYS))
    if unknown:  # a typo must not silently leave a default in place
        raise BadInput(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return values


def _list(v: str) -> tuple[str, ...]:
    words = tuple(w for w in re.split(r"[\s,]+", v.strip()) if w)
    return () if words == ("none",) else words


def _bool(v: str, where: str) -> bool:
    s = v.strip().lower()
    if s in ("yes", "true", "on", "1"):
        return True
    if s in ("no", "false", "off", "0"):
        return False
    raise BadInput(f"{where}: create = {v!r}: use yes or no")
