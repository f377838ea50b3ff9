"""Generations of warm copies on disk (NAME.warm.json, records.Warm): what both hosts of a
finished migration record, and the destination agent's check of its half before a copy writes
the disk (dmmig/flows/warm.py explains the whole). No disk stack here: the agent uses it.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid

from dmmig.adapters import writefence
from dmmig.adapters.runner import Runner
from dmmig.core.records import KEPT, Warm, read_warm, to_json
from dmmig.names import Files

log = logging.getLogger("dmmig.warm")


# ---- the record ---------------------------------------------------------------------------
def load(state: str, name: str) -> Warm | None:
    """NAME's generation here; None if there is none or it is unreadable (logged: a record
    that cannot be read makes no copy warm)."""
    try:
        return read_warm(Files(state, name).warm)
    except ValueError as e:
        log.warning("the generation of %s is unreadable, so no copy of it is warm: %s", name, e)
        return None


def names(state: str) -> list[str]:
    """The disks with a generation here."""
    try:
        return sorted(f[:-len(".warm.json")] for f in os.listdir(state) if f.endswith(".warm.json"))
    except FileNotFoundError:
        return []


def save(state: str, rec: Warm) -> None:
    os.makedirs(state, mode=0o700, exist_ok=True)
    path = Files(state, rec.name).warm
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_json(rec), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop(state: str, name: str) -> bool:
    try:
        os.unlink(Files(state, name).warm)
        return True
    except FileNotFoundError:
        return False


def drop_for(state: str, name: str, path: str) -> None:
    """Drop NAME's generation if it names PATH (a copy is about to write PATH)."""
    rec = load(state, name)
    if rec is None or os.path.realpath(rec.path) == os.path.realpath(path):
        drop(state, name)


def record(state: str, name: str, role: str, path: str, size: int, generation: str, peer: str,
           runner: Runner) -> Warm:
    """The generation's half on this host, with PATH's fence taken now (OSError: PATH cannot
    be fenced, and no generation is recorded)."""
    rec = Warm(name=name, generation=generation, role=role, path=path, size=size, at=time.time(),
               fence=writefence.take(path, runner), peer=peer)
    save(state, rec)
    return rec


def new_generation() -> str:
    return uuid.uuid4().hex


# ---- A: the destination's check -----------------------------------------------------------
def check_kept(state: str, name: str, path: str, size: int, generation: str, runner: Runner) -> tuple[bool, str]:
    """On A, before anything writes PATH for NAME: does PATH carry GENERATION, untouched since?
    The record is consumed (a copy is about to write the disk, whatever the answer)."""
    rec = load(state, name)
    if rec is None:
        return False, f"no generation of {name} is recorded on this host"
    try:
        if rec.generation != generation:
            return False, f"{path} carries generation {rec.generation[:12]}, not {generation[:12]}"
        if rec.role != KEPT:
            return False, f"{path} was not kept here by the migration of generation {generation[:12]}"
        if os.path.realpath(rec.path) != os.path.realpath(path):
            return False, f"the generation names {rec.path}, not {path}"
        if rec.size != size:
            return False, f"{path} was {rec.size} bytes at the generation, the source is {size}"
        why = writefence.written_since(rec.fence, runner)
        return (False, why) if why else (True, f"{path} is untouched since generation {generation[:12]}")
    finally:
        drop(state, name)
