"""`dmmig status`: what the journal says, what the kernel says, and where they disagree."""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from dmmig import sizing
from dmmig.adapters import nbd, proc
from dmmig.adapters.dm.guard import log_path as guard_log
from dmmig.adapters.dm.targets import MIRRORS, Era, Linear, ParseError
from dmmig.core import gate, journal
from dmmig.core.records import Incoming, Unreadable, to_json
from dmmig.core.stack import Stack
from dmmig.core.watch import read_health
from dmmig.flows import warm
from dmmig.flows.destination import incoming
from dmmig.names import era_name, lv_name, top_name


def names(stack: Stack) -> list[str]:
    """Every disk dmmig knows here: journaled, incoming from a source's dmmig, or with a gate."""
    return sorted(set(stack.journal.names()) | set(incoming(stack.journal.dir)) | set(gate.names(stack.journal.dir))
                  | set(warm.names(stack.journal.dir)))


def disk_status(stack: Stack, name: str) -> dict[str, Any]:
    entry = stack.journal.load(name)
    out: dict[str, Any] = {"name": name, "journal": None, "incoming": None, "devices": {}, "problems": []}
    problems: list[str] = out["problems"]
    rec = incoming(stack.journal.dir).get(name)
    if rec is not None:
        out["incoming"] = _incoming(name, rec, problems, journaled=entry is not None)
    out["gate"] = _gate(stack.journal.dir, name, problems)
    out["warm"] = warm.status(stack, name, entry)
    if entry is not None:
        out["journal"] = {"phase": entry.phase, "origin": entry.origin, "origin_devno": entry.origin_devno,
                          "block_bytes": entry.block_sectors * 512 if entry.block_sectors else None,
                          "metadata": entry.metadata, "checkpoints": entry.checkpoints,
                          "dest": to_json(entry.dest) if entry.dest else {}, "copy": to_json(entry.copy),
                          "mirror": to_json(entry.mirror),
                          "history": entry.history[-10:]}
    if entry is not None and entry.adopted is not None:
        out["adopted"] = _adopted(stack, entry, problems)
    for dev in (top_name(name), era_name(name), lv_name(name)):
        info = stack.dm.info(dev)
        if info is None:
            continue
        d: dict[str, Any] = {"devno": info.devno, "open": info.open_count, "suspended": info.suspended,
                             "inactive_table": info.has_inactive, "events": info.events,
                             "table": stack.dm.table_text(dev)}
        if dev == lv_name(name):  # an adopted LV's own table, several segments: shown as it is
            pass
        elif not info.suspended:  # never ask a suspended era device for status: it answers through its worker
            line = stack.dm.status_line(dev)
            d["status"] = line
            try:
                t = stack.dm.table(dev).target
                if isinstance(t, Era):
                    st = stack.dm.era_status(dev)
                    d["era"] = {"current_era": st.current_era, "metadata_used": st.metadata_used,
                                "metadata_total": st.metadata_total, "snapshot_held": st.snapshot_block is not None}
                    if st.snapshot_block is not None:
                        problems.append(f"{dev} holds a metadata snapshot (left by an interrupted dmmig; harmless, "
                                        "the next query drops it)")
                elif isinstance(t, MIRRORS):
                    ms = stack.dm.mirror_status(dev)
                    d["mirror"] = {"in_sync": ms.in_sync, "regions": ms.regions, "health": ms.health,
                                   "log_health": ms.log_health, "healthy": ms.healthy}
                    if not ms.healthy:
                        h = read_health(stack.journal.dir, name)
                        since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.failed_at))}"
                                 if h else " (time unknown: no watcher record)")
                        d["mirror"]["failed_at"] = h.failed_at if h else None
                        problems.append(f"{dev}: mirror leg(s) {ms.failed_legs} failed{since} (health {ms.health}); "
                                        "the guest's writes go on to the local disk and era records them; "
                                        f"`dmmig copy {name}` + `dmmig cutover {name}` catch up, "
                                        f"`dmmig abort {name}` returns to linear")
            except ParseError as e:
                problems.append(f"{dev}: cannot parse its table or status: {e}")
        else:
            problems.append(f"{dev} is suspended: I/O to it is blocked (an interrupted table swap?); "
                            f"`dmmig abort {name}` resumes it")
        out["devices"][dev] = d

    glog = guard_log(stack.journal.dir, top_name(name))
    if os.path.exists(glog):
        with open(glog) as f:
            problems += [f"{ln.strip()} (`dmmig abort {name}` clears this note)" for ln in f if ln.strip()]
    top = out["devices"].get(top_name(name))
    era = out["devices"].get(era_name(name))
    if entry is None:
        if top or era or out["devices"].get(lv_name(name)):
            problems.append("dm devices exist but there is no journal entry (journal lost?)")
        return out
    if top is None and entry.phase != journal.ADOPTING:
        problems.append(f"journal says {entry.phase} but {top_name(name)} does not exist")
    if entry.phase == journal.WRAPPED and era is not None:
        problems.append(f"journal says wrapped but {era_name(name)} exists (interrupted prepare?)")
    if entry.phase not in (journal.ADOPTING, journal.WRAPPED, journal.PREPARING, journal.ABORTING) and era is None:
        problems.append(f"journal says {entry.phase} but {era_name(name)} does not exist")
    busy = stack.journal.busy(name)
    out["busy"] = busy
    if entry.phase in (journal.ADOPTING, journal.PREPARING, journal.COPYING, journal.CUTTING_OVER, journal.FINISHING,
                       journal.ABORTING):
        if busy:
            problems.append(f"a dmmig is working on {name} now (phase {entry.phase}); wait for it")
        else:
            again = {journal.COPYING: f"`dmmig copy {name}` resumes it, ",
                     journal.CUTTING_OVER: f"`dmmig cutover {name}` runs it again, ",
                     journal.ADOPTING: "the LV may or may not have dmmig's table yet; "}.get(entry.phase, "")
            problems.append(f"a `{entry.phase}` step did not complete (dmmig was interrupted, and no dmmig holds "
                            f"{name} now): {again}`dmmig abort {name}` cleans up")
    if entry.phase == journal.MIRRORING and top is not None and "mirror" in top:
        synced = entry.mirror.synced
        if synced and top["events"] != synced.events:
            problems.append(f"{top_name(name)}: dm event counter {top['events']} differs from "
                            f"{synced.events} at sync: something happened to the mirror since")
        if entry.mirror.watcher and not proc.alive(entry.mirror.watcher, stack.mirror.watcher_marker(name)):
            problems.append("the leg watcher is not running: a leg failure would not be timed")
        tun = entry.mirror.tunnel
        # an older dmmig's tunnel has no log: its socket names it
        if tun and tun.pid and not proc.alive(tun.pid, tun.log or tun.sock or "ssh"):
            problems.append(f"the SSH tunnel of the NBD leg (pid {tun.pid}, {tun.mode or 'forward'}) is gone; "
                            f"its log: {stack.mirror.tunnel_log(name)}")
    stray = sorted(set(stack.mirror.nbd.owned(stack.mirror.nbd_owner(name))) - {entry.mirror.nbd})
    if stray:  # marked for this disk (udev keeps off them) but no mirror of it uses them
        problems.append(f"{', '.join(stray)} marked as {name}'s mirror leg but not in its journal (left by an "
                        f"interrupted cutover); `dmmig abort {name}` detaches and unmarks them")
    if entry.metadata_file and entry.phase != journal.WRAPPED and not os.path.exists(entry.metadata_file):
        problems.append(f"era metadata file {entry.metadata_file} is missing")
    if top is not None and entry.phase == journal.WRAPPED:
        try:
            t = stack.dm.table(top_name(name)).target
            if not (isinstance(t, Linear) and t.device == entry.origin_devno):
                problems.append(f"{top_name(name)} is not linear over the origin {entry.origin_devno}")
        except ParseError:
            pass
    return out


def _adopted(stack: Stack, entry: journal.Entry, problems: list[str]) -> dict[str, Any]:
    """The LV ENTRY was adopted from: its device now, its table, and whether that is dmmig's."""
    a = entry.adopted
    assert a is not None
    info = stack.dm.info_of(a.devno)
    live = stack.dm.table_text_of(a.devno) if info is not None and info.uuid == a.uuid else None
    problem = stack.lv_problem(entry) if entry.phase != journal.ADOPTING else None
    if problem is not None:
        problems.append(f"{problem}. Nothing dmmig copies or vouches for is complete now; `dmmig abort {entry.name}` "
                        f"removes dmmig's devices and leaves that table as LVM loaded it")
    return {"lv": a.lv, "path": a.path, "devno": a.devno, "name_now": info.name if info else None,
            "own_table": a.table, "table": live, "top_devno": a.top_devno,
            "ours": problem is None and entry.phase != journal.ADOPTING}


def _gate(state: str, name: str, problems: list[str]) -> dict[str, Any] | None:
    """This host's handover gate for NAME (dmmig/core/gate.py): an agent waiting, or a socket a
    killed agent left."""
    if not os.path.exists(gate.socket_path(state, name)):
        return None
    pid = gate.holder(state, name)
    if pid is None:
        problems.append(f"{gate.socket_path(state, name)} was left by a killed agent (nobody listens); "
                        f"`dmmig abort {name}` here removes it")
    return {"socket": gate.socket_path(state, name), "agent_pid": pid}


def _incoming(name: str, rec: Incoming | Unreadable, problems: list[str], *, journaled: bool) -> dict[str, Any]:
    """The destination's side of a migration: the agent's record of the disk."""
    if isinstance(rec, Unreadable):
        problems.append(f"the record of incoming {name} is unreadable ({rec.error}); "
                        f"`dmmig abort {name}` here removes it")
        return {"unreadable": rec.error}
    exp = rec.export
    alive = bool(exp and exp.alive())
    st = {"path": rec.path, "size": rec.size, "created": rec.created,
          "created_as": rec.created_as, "migration": rec.migration,
          "handed_over": bool(rec.handed_over), "export": asdict(exp) if exp else None, "export_alive": alive}
    if exp and not alive:
        problems.append(f"the NBD export of incoming {name} (qemu-nbd pid {exp.pid}) is gone")
    if not journaled and not st["handed_over"]:
        gone = f" and removes {st['path']} (dmmig created it)" if st["created"] else ""
        problems.append(f"{name} is being migrated into this host by the source's dmmig, which stops it "
                        f"(`dmmig abort {name}` there). If that host or its dmmig is gone: `dmmig abort {name}` "
                        f"here stops the export{gone}")
    return st


def render(st: dict[str, Any], *, tables: bool = False) -> str:
    """NAME in detail. A mirror set's table is one line per part: shown whole with TABLES, else
    its first line and how many there are."""
    at = glance(st)
    lines = [f"{st['name']}: {at['phase']}, {at['progress']}, {at['state']}"]
    j = st["journal"]
    if j:
        lines.append(f"  phase:   {j['phase']}")
        lines.append(f"  origin:  {j['origin']} ({j['origin_devno']})")
        if j["block_bytes"]:
            lines.append(f"  era:     block {j['block_bytes']} bytes, metadata {j['metadata']}")
        if j["dest"]:
            d = j["dest"]
            how = (f"ssh, tunnel {d.get('tunnel') or 'not chosen yet'}" if d.get("transport", "ssh") == "ssh"
                   else f"nbd to {d.get('nbd_address')}, " + ("TLS" if d.get("tls") else "NO TLS (--insecure)"))
            lines.append(f"  dest:    {d.get('host')} {d.get('disk', '')} ({how})")
    elif not st.get("incoming"):
        lines.append("  phase:   (no journal entry)")
    ad = st.get("adopted")
    if ad:
        lines.append(f"  adopted: {ad['path']} ({ad['name_now'] or ad['lv']}, {ad['devno']}), table "
                     + ("dmmig's: linear over the top" if ad["ours"] else f"{ad['table']!r}"))
    g = st.get("gate")
    if g:
        lines.append(f"  gate:    {g['socket']}" + (f" (agent pid {g['agent_pid']} waits for the destination's "
                                                     "question)" if g["agent_pid"] else " (stale)"))
    inc = st.get("incoming")
    if inc and "unreadable" not in inc:
        exp = inc["export"]
        lines.append(f"  incoming: onto {inc['path']}"
                     + ((" (created by dmmig as an LV)" if inc.get("created_as") == "lv" else " (created by dmmig)")
                        if inc["created"] else "")
                     + (", handed over" if inc["handed_over"] else ", not handed over")
                     + (f"; NBD export on {nbd.Export(**exp).where}, qemu-nbd pid {exp['pid']}"
                        f" ({'running' if inc['export_alive'] else 'gone'})" if exp else "; no NBD export"))
    lines += _render_warm(st.get("warm"))
    for dev, d in st["devices"].items():
        flags = (" SUSPENDED" if d["suspended"] else "") + (" +inactive-table" if d["inactive_table"] else "")
        lines.append(f"  {dev} ({d['devno']}, open {d['open']}{flags})")
        for what in ("table", "status"):
            text = d.get(what)
            if text is None:
                continue
            rows = text.splitlines() or [""]
            if tables or len(rows) == 1:
                lines += [f"    {what}:  {rows[0]}"] + [f"            {r}" for r in rows[1:]]
            else:
                lines.append(f"    {what}:  {rows[0]}")
                lines.append(f"            ... {len(rows) - 1} more line(s), one per mirror part (--tables shows them)")
        if "era" in d:
            e = d["era"]
            lines.append(f"    era {e['current_era']}, metadata {e['metadata_used']}/{e['metadata_total']} blocks")
        if "mirror" in d:
            m = d["mirror"]
            lines.append(f"    mirror {m['in_sync']}/{m['regions']} in sync, legs {m['health']}"
                         + (f", log {m['log_health']}" if m.get("log_health") else ""))
    for p in st["problems"]:
        lines.append(f"  ! {p}")
    return "\n".join(lines)


def _render_warm(w: dict[str, Any] | None) -> list[str]:
    if not w:
        return []
    if "error" in w:
        return [f"  warm:    unreadable ({w['error']}): {w['effect']}"]
    out = []
    if "generation" in w:
        state = ("broken: " + w["broken"] if w.get("broken") else
                 "untouched" if w.get("untouched") else "WRITTEN since: no longer trusted" if "untouched" in w
                 else "era tracks writes" if w.get("tracking") else "not tracked yet (`dmmig wrap` starts it)")
        out.append(f"  warm:    generation {w['generation'][:12]} with {w.get('peer') or '?'}, {w['role']} "
                   f"{w['path']} ({state})")
    t = w.get("tracking")
    if isinstance(t, dict):
        cost = t.get("era_metadata_bytes")
        out.append(f"  warm:    writes tracked since era {t['since_era']}"
                   + (f", era metadata {sizing.human(cost)}" if cost is not None else "")
                   + (f"; {t['decision']}" if t.get("decision") else ""))
    if w.get("effect"):
        out.append(f"           {w['effect']}")
    return out


def _size_bytes(st: dict[str, Any]) -> int | None:
    """The disk's size, from its top device's table (the journal does not keep it)."""
    d = st["devices"].get(top_name(st["name"]))
    if d and d.get("table"):
        try:
            return max(int(f[0]) + int(f[1]) for f in (ln.split() for ln in d["table"].splitlines()) if f) * 512
        except (ValueError, IndexError):
            return None
    return None


def glance(st: dict[str, Any]) -> dict[str, str]:
    """One line's worth of NAME's status: phase, destination, progress, state."""
    j, inc = st["journal"], st.get("incoming")
    row = {"disk": st["name"], "phase": "-", "destination": "-", "progress": "-", "state": "ok"}
    if j:
        row["phase"] = j["phase"]
        d = j["dest"] or {}
        if d:
            how = "ssh" if d.get("transport", "ssh") == "ssh" else ("nbd+tls" if d.get("tls") else "nbd, NO TLS")
            row["destination"] = f"{d.get('host')}:{d.get('disk', '?')} ({how})"
        c, m = j["copy"] or {}, j["mirror"] or {}
        size = _size_bytes(st)
        if j["phase"] == journal.MIRRORING or j["phase"] == journal.CUTTING_OVER:
            mir = next((d["mirror"] for d in st["devices"].values() if "mirror" in d), None)
            if mir is None:
                row["progress"] = "no mirror table"
            elif mir["in_sync"] >= mir["regions"]:
                row["progress"] = f"mirrored, in sync ({m.get('parts') or 1} parts)"
            else:
                row["progress"] = f"resync {100 * mir['in_sync'] // max(1, mir['regions'])}% " \
                                  f"({mir['regions'] - mir['in_sync']} regions left)"
        elif c.get("base_done"):
            rounds = c.get("rounds") or []
            last = f", last delta {sizing.human(rounds[-1]['dirty_bytes'])}" if rounds else ""
            row["progress"] = f"base copied, {len(rounds)} round(s){last}"
        elif c.get("base_started") and size:
            row["progress"] = f"base {100 * int(c.get('base_offset', 0)) // size}% of {sizing.human(size)}"
    elif inc and "unreadable" not in inc:
        row["phase"] = "incoming"
        row["destination"] = f"{inc.get('path')} (this host)"
        row["progress"] = "handed over" if inc.get("handed_over") else \
            ("export running" if inc.get("export_alive") else "no export")
    w = st.get("warm")
    if w and "error" not in w:
        t = w.get("tracking")
        if not j and not inc and "role" in w:
            row["phase"] = f"warm ({w['role']})"
            row["destination"] = f"{w['path']} (with {w.get('peer') or '?'})"
            row["progress"] = ("broken" if w.get("broken") else "untouched" if w.get("untouched")
                               else "WRITTEN since" if "untouched" in w else "not tracked yet")
        elif isinstance(t, dict) and row["progress"] == "-":
            row["progress"] = f"warm: writes tracked since era {t['since_era']}"
    failed = any("mirror" in d and not d["mirror"]["healthy"] for d in st["devices"].values())
    n = len(st["problems"])
    if failed:
        row["state"] = "LEG FAILED"
    elif n:
        row["state"] = f"{n} problem{'s' if n > 1 else ''}"
    return row


def render_glance(sts: list[dict[str, Any]]) -> str:
    """Every disk on one line each, then their problems: `dmmig status` with no NAME."""
    rows = [glance(s) for s in sts]
    cols = ["disk", "phase", "destination", "progress", "state"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in rows]
    for s in sts:
        lines += [f"! {s['name']}: {p}" for p in s["problems"]]
    if len(sts) > 0:
        lines.append("(`dmmig status NAME` for the device stack, era and mirror of one disk)")
    return "\n".join(lines)
