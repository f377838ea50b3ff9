"""The domain config `dmmig migrate` hands to `xl migrate -C` for a domain whose LVs it adopts:
the operator's config file, verbatim, with a `disk = [...]` and a `uuid = ...` appended.

What -C is (Xen tools/xl): main_migrate (xl_migrate.c) passes the file to migrate_domain, whose
save_domain_core_begin (xl_saverestore.c) reads it and parses it with parse_config_data
(xl_parse.c), i.e. xl's config syntax (xl.cfg(5)), not JSON; the result goes to the destination
as libxl JSON *instead of* the running domain's (libxl_retrieve_domain_configuration). This
happens before the migration child starts: a file xl cannot parse makes it exit with the guest
untouched. Nothing of the running domain the file does not say survives: parse_config_data
generates a new uuid when the file has none, and a vif without mac= gets a random one on the
destination (libxl's nic setdefault).

Why append rather than edit: libxlu (tools/libs/util/libxlu_cfg.c) prepends each setting to its
list (xlu__cfg_set_store) and find() takes the first, so the file's last assignment of a name
wins; every other line stays the operator's. The disk specs are written from libxl's own parse
of the file (`xl -N create`, JSON) in xl-disk-configuration(5)'s keyword form, and the result
is parsed by libxl again and compared (diff_configs): a field the writer lost or got wrong is a
refusal, never a silently different guest.
"""
from __future__ import annotations

import re
from typing import Any

from dmmig.errors import BadInput

# what may appear inside a disk spec dmmig writes: no quote, no newline, no comma in a value
# (target= takes the rest of the spec; dmmig writes it last anyway), no '=' in a value
_PATH = re.compile(r"/[A-Za-z0-9_.+/-]*")
_VDEV = re.compile(r"[A-Za-z0-9]+")
_SCRIPT = re.compile(r"[A-Za-z0-9_.+/-]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
_BACKENDS = ("phy", "qdisk", "tap", "standalone")
# libxl_device_disk's fields (libxl_types.idl) this writer renders; any other at a non-default
# value (colo_*, backend_domname, specification, transport, ...) is refused
_KNOWN = {"pdev_path", "vdev", "backend", "format", "script", "readwrite", "is_cdrom", "removable",
          "direct_io_safe", "discard_enable", "trusted", "backend_domid"}
_DEFAULTS: tuple[object, ...] = (None, "", 0, "False", "unknown", "default", {}, [])


def disk_spec(d: dict[str, Any], script: str | None = None) -> str:
    """The xl disk spec (keyword form, target last) for libxl's JSON of one disk, with its
    script replaced by SCRIPT if given. Refuses what it cannot write exactly."""
    vdev = str(d.get("vdev", ""))
    what = f"disk {vdev or '(no vdev)'}"
    if not _VDEV.fullmatch(vdev):
        raise BadInput(f"{what}: vdev {vdev!r} is not a plain device name; dmmig writes no config for it")
    odd = sorted(k for k, v in d.items() if k not in _KNOWN and v not in _DEFAULTS)
    if odd:
        raise BadInput(f"{what}: dmmig cannot write its {', '.join(odd)} into a config for xl migrate -C",
                       hint="pass your own config with the adopted disks on script=block-dmmig: `-- -C FILE`")
    if d.get("backend_domid", 0):
        raise BadInput(f"{what}: served from driver domain {d['backend_domid']}; dmmig writes no config for it")
    parts = []
    fmt = str(d.get("format", ""))
    if fmt and fmt != "unknown":
        if fmt not in _FORMATS:
            raise BadInput(f"{what}: unknown format {fmt!r}")
        parts.append(f"format={fmt}")
    parts += [f"vdev={vdev}", "access=rw" if d.get("readwrite") else "access=ro"]
    if d.get("is_cdrom"):
        parts.append("devtype=cdrom")
    elif d.get("removable"):
        raise BadInput(f"{what}: removable but not a cdrom; xl's disk spec cannot say that")
    backend = str(d.get("backend", ""))
    if backend and backend != "unknown":
        if backend not in _BACKENDS:
            raise BadInput(f"{what}: unknown backend type {backend!r}")
        parts.append(f"backendtype={backend}")
    scr = script if script is not None else str(d.get("script", ""))
    if scr:
        if not _SCRIPT.fullmatch(scr) or scr.startswith("-"):
            raise BadInput(f"{what}: script {scr!r} has characters dmmig does not write into a config")
        parts.append(f"script={scr}")
    if d.get("direct_io_safe"):
        parts.append("direct-io-safe")
    for key, yes, no in (("discard_enable", "discard", "no-discard"), ("trusted", "trusted", "untrusted")):
        v = d.get(key)
        if v in ("True", True):
            parts.append(yes)
        elif v in ("False", False):
            parts.append(no)
        elif v not in (None, "", "default"):
            raise BadInput(f"{what}: {key} {v!r}?")
    target = str(d.get("pdev_path", ""))
    if target:
        if not _PATH.fullmatch(target) or "/../" in target + "/" or "//" in target:
            raise BadInput(f"{what}: target {target!r} has characters dmmig does not write into a config",
                           hint="pass your own config with the adopted disks on script=block-dmmig: `-- -C FILE`")
        parts.append(f"target={target}")
    return ",".join(parts)


def rewrite(text: str, disks: list[dict[str, Any]], scripts: dict[str, str], uuid: str) -> str:
    """TEXT (the operator's config file) with `disk = [...]` (DISKS, libxl's JSON of the file's
    disks, in order; SCRIPTS: vdev -> the script to give it instead) and `uuid = UUID` (the
    running domain's: a file without one would give the guest a new uuid) appended."""
    if not _UUID.fullmatch(uuid):
        raise BadInput(f"the running domain's uuid {uuid!r} is not a uuid")
    if "\0" in text:
        raise BadInput("the config file has a NUL byte")
    specs = [disk_spec(d, scripts.get(str(d.get("vdev")))) for d in disks]
    missing = set(scripts) - {str(d.get("vdev")) for d in disks}
    if missing:
        raise BadInput(f"the config has no disk {', '.join(sorted(missing))}")
    tail = "" if text.endswith("\n") or not text else "\n"
    return (text + tail + "\n# dmmig migrate: the disks it adopted on script=block-dmmig, the running domain's uuid\n"
            + "disk = [ " + ", ".join(f"'{s}'" for s in specs) + " ]\n"
            + f'uuid = "{uuid.lower()}"\n')


def diff_configs(before: dict[str, Any], after: dict[str, Any], scripts: dict[str, str]) -> list[str]:
    """What differs between libxl's parse of the operator's file (BEFORE) and of the rewritten
    one (AFTER), beyond what the rewrite is for: the scripts of SCRIPTS' vdevs and the uuid."""
    out = []
    b, a = dict(before), dict(after)
    for cfg in (b, a):
        cfg["c_info"] = {k: v for k, v in (cfg.get("c_info") or {}).items() if k != "uuid"}
    bd, ad = b.pop("disks", None) or [], a.pop("disks", None) or []
    for key in sorted(set(b) | set(a)):
        if b.get(key) != a.get(key):
            out.append(f"{key}: {b.get(key)!r} became {a.get(key)!r}")
    if len(bd) != len(ad):
        return out + [f"{len(bd)} disks became {len(ad)}"]
    for x, y in zip(bd, ad):
        vdev = str(x.get("vdev"))
        want = dict(x)
        if vdev in scripts:
            want["script"] = scripts[vdev]
        if want != y:
            keys = sorted(k for k in set(want) | set(y) if want.get(k) != y.get(k))
            out.append(f"disk {vdev}: " + ", ".join(f"{k} {want.get(k)!r} became {y.get(k)!r}" for k in keys))
    return out
