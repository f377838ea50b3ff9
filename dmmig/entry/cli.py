"""Command line. The one error boundary: every DmmigError becomes a plain message, a hint
and a distinct exit code; --debug shows the traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dmmig import __version__
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core.journal import DEFAULT_STATE_DIR, Journal, state_dir
from dmmig.errors import BadInput, DmmigError, Exit
from dmmig.validate import era_block_size, nbd_timeout, parse_size

if TYPE_CHECKING:
    from dmmig.adapters.ssh import SshOptions
    from dmmig.core.stack import Stack


def make_stack(args: argparse.Namespace) -> Stack:
    # imported here: `dmmig agent` (each start of it on the destination) needs no disk stack
    from dmmig.adapters.dm.dmsetup import DmSetup
    from dmmig.adapters.dm.guard import SuspendGuard
    from dmmig.adapters.udev import wait_dm_node
    from dmmig.core.stack import Stack
    runner = SubprocessRunner()
    journal = Journal(state_dir(args.state_dir))
    # a dmmig killed while the top device is suspended must not leave the guest's disk frozen
    guard = SuspendGuard(runner, journal.dir)
    return Stack(runner, DmSetup(runner, wait_node=wait_dm_node, guard=guard), journal)


def cmd_wrap(a: argparse.Namespace) -> int:
    from dmmig.flows import warm
    stack = make_stack(a)
    print(stack.wrap(a.name, a.origin), flush=True)
    note = warm.track(stack, a.name)  # a disk a migration handed over: era under the top, now
    if note:
        print(f"dmmig wrap: {note}", file=sys.stderr)
    return 0


def cmd_forget(a: argparse.Namespace) -> int:
    from dmmig.flows import warm
    for step in warm.forget(make_stack(a), a.name):
        print(f"done: {step}")
    return 0


def cmd_adopt(a: argparse.Namespace) -> int:
    from dmmig.core.stack import HOLD_LVM
    stack = make_stack(a)
    if a.dry_run:
        print("\n".join(stack.adopt_plan(a.name, a.lv).render()))
        return 0
    path, pause = stack.adopt(a.name, a.lv)
    entry = stack.entry_of(a.name)
    assert entry.adopted is not None
    print(path)
    took = (f"the swap's resume took {pause * 1000:.0f} ms with its udev sync: its I/O paused for less" if pause
            else "adopted already")
    print(f"{entry.adopted.lv} is linear over {path} now ({took}); `dmmig abort {a.name}` gives it its own table "
          "back", file=sys.stderr)
    print(f"dmmig adopt: {HOLD_LVM.format(lv=entry.adopted.lv)}", file=sys.stderr)
    return 0


def _released(stack: Stack, name: str) -> str:
    """What abort/finish left of NAME's device stack, for their last line."""
    from dmmig.names import top_name
    if stack.journal.load(name) is None and stack.dm.info(top_name(name)) is None:
        return "dmmig's devices are gone (an adopted LV has its own table again)"
    return f"{top_name(name)} is linear over its origin"


def cmd_unwrap(a: argparse.Namespace) -> int:
    make_stack(a).unwrap(a.name, force=a.force)
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from dmmig.sizing import choose_block
    block = parse_size(a.block_size) if a.block_size else None
    stack = make_stack(a)
    table = stack.prepare(a.name, block_bytes=block, metadata=a.metadata)
    print(f"dmmig-{a.name}: {table.render()}")
    # what prepare chose: the same pure function
    choice = choose_block(table.length * 512, block, stack.discard_unit(a.name))
    print(f"  {choice.describe()}")
    if choice.warning:
        print(f"dmmig prepare: warning: {choice.warning}", file=sys.stderr)
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    print(make_stack(a).checkpoint(a.name))
    return 0


def cmd_dirty(a: argparse.Namespace) -> int:
    ranges, bs, now = make_stack(a).dirty(a.name, a.since)
    total = sum(r.count for r in ranges) * bs
    if a.json:
        print(json.dumps({"block_bytes": bs, "since_era": a.since, "current_era": now, "total_bytes": total,
                          "extents": [[r.begin * bs, r.end * bs] for r in ranges]}))
    else:
        for r in ranges:
            print(f"{r.begin * bs}-{r.end * bs} ({r.count * bs} bytes)")
        print(f"total {total} bytes in {sum(r.count for r in ranges)} block(s) of {bs} bytes, "
              f"written since era {a.since} (era now {now})")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from dmmig.flows.status import disk_status, render, render_glance
    from dmmig.flows.status import names as known
    stack = make_stack(a)
    names = [a.name] if a.name else known(stack)
    if not names:
        print("no disks managed by dmmig" if not a.json else "[]")
        return 0
    sts = [disk_status(stack, n) for n in names]
    if a.json:
        print(json.dumps(sts if not a.name else sts[0], indent=1))
    else:
        print(render(sts[0], tables=a.tables) if a.name else render_glance(sts))
    return 0


def cmd_abort(a: argparse.Namespace) -> int:
    from dmmig.flows import finish
    stack = make_stack(a)
    done, left = finish.abort(stack, a.name)
    for step in done:
        print(f"done: {step}")
    print(f"{a.name}: aborted; {_released(stack, a.name)}")
    if left:
        for x in left:
            print(f"left behind: {x}", file=sys.stderr)
        return int(Exit.REMOTE)
    return 0


def cmd_copy(a: argparse.Namespace) -> int:
    from dmmig.flows import copying
    from dmmig.progress import Progress
    _check_destination(a)
    if a.dry_run:
        e = copying.estimate(make_stack(a), a.name, rate=_rate(a))
        print(json.dumps({"event": "plan", **e}) if a.json else "\n".join([f"copy {a.name}:"]
                                                                          + copying.render_estimate(e, "  ")))
        return 0
    s = copying.copy(make_stack(a), a.name, a.host, _ssh_opts(a), _copy_opts(a, a.dest_disk), Progress(a.json))
    if a.json:
        print(json.dumps({"event": "summary", **s}))
        return 0
    mib = 1 << 20
    print(f"{a.name}: copied; {s['stopped_because']}")
    print(f"  {s['warm']}")
    print(f"  read {s['read'] / mib:.1f} MiB, sent {s['sent'] / mib:.1f} MiB, zeroed {s['zeroed'] / mib:.1f} MiB, "
          f"skipped as zero {s['skipped'] / mib:.1f} MiB in {s['seconds']:.1f}s "
          f"({s['throughput_bytes_per_s'] / mib:.1f} MiB/s)")
    for i, r in enumerate(s["rounds"], 1):
        print(f"  round {i}: {r['dirty_bytes'] / mib:.2f} MiB dirty, sent {r['sent'] / mib:.2f} MiB "
              f"in {r['seconds']:.2f}s")
    if s["dirty_rate_bytes_per_s"] is not None:
        print(f"  dirty rate {s['dirty_rate_bytes_per_s'] / mib:.2f} MiB/s")
    return 0


def cmd_cutover(a: argparse.Namespace) -> int:
    from dmmig.flows import cutover
    from dmmig.progress import Progress
    s = cutover.cutover(make_stack(a), a.name, cutover.CutoverOptions(nbd_timeout=a.nbd_timeout,
                                                                             resync_parts=a.resync_parts),
                        Progress(a.json))
    if a.json:
        print(json.dumps({"event": "summary", **s}))
        return 0
    print(f"{a.name}: mirroring to the destination over {s['nbd']}; every write now reaches both hosts")
    print(f"  top device suspended for {' + '.join(f'{p * 1000:.0f}' for p in s['pauses'])} ms; the kernel "
          f"resynced {s['resync_regions']} of {s['regions']} regions of {s['region_bytes'] >> 10} KiB "
          f"({s['resync_bytes'] / (1 << 20):.2f} MiB) in {s['resync_seconds']:.2f}s, {s['parts']} at a time "
          f"(at most {s['resync_regions_most_in_a_part']} in one)")
    return 0


def cmd_handover(a: argparse.Namespace) -> int:
    from dmmig.flows import handover
    r = handover.handover(make_stack(a), a.name, timeout=a.timeout)
    if a.json:
        print(json.dumps({"event": "summary", **r}))
    else:
        print(f"{a.name}: handed over ({r['why']}) in {r['seconds']:.2f}s")
    return 0


def cmd_finish(a: argparse.Namespace) -> int:
    from dmmig.flows import finish
    stack = make_stack(a)
    done, left = finish.finish(stack, a.name, force=a.force, remove=a.remove)
    for step in done:
        print(f"done: {step}")
    print(f"{a.name}: finished" + ("" if a.remove else f"; {_released(stack, a.name)}"))
    for x in left:
        print(f"left behind: {x}", file=sys.stderr)
    return int(Exit.REMOTE) if left else 0


def cmd_verify(a: argparse.Namespace) -> int:
    from dmmig.flows import verify
    from dmmig.progress import Progress
    r = verify.verify(make_stack(a), a.name, chunk=parse_size(a.chunk), progress=Progress(a.json),
                       offset=parse_size(a.offset), length=parse_size(a.length) if a.length else None)
    if a.json:
        print(json.dumps({"event": "summary", **r}))
    else:
        for m in r["mismatches"]:
            print(f"MISMATCH bytes {m['offset']}-{m['offset'] + m['length']} ({m['length']} bytes)")
        verdict = "identical" if not r["mismatches"] else f"{len(r['mismatches'])} mismatched range(s)"
        where = f" from byte {r['offset']}" if r["offset"] else ""
        print(f"{a.name}: {r['source']} vs {r['destination']}: {verdict} "
              f"({r['bytes']} bytes{where} in {r['chunk']}-byte chunks, {r['seconds']:.1f}s)")
    return int(Exit.MISMATCH) if r["mismatches"] else 0


def cmd_migrate(a: argparse.Namespace) -> int:
    from dmmig.adapters.xenstore import PyxsXenStore
    from dmmig.adapters.xl import Xl, check_migrate_args, check_xl_timeout
    from dmmig.flows import cutover, migrate_domain
    from dmmig.progress import Progress
    _check_destination(a)  # before anything: xl hands HOST to `sh -c` on its way to ssh
    opts = migrate_domain.MigrateOptions(copy=_copy_opts(a), cutover=cutover.CutoverOptions(nbd_timeout=a.nbd_timeout),
                             xl_args=check_migrate_args(a.xl_args), xl_timeout=a.xl_timeout, shared_ok=a.shared,
                             block_bytes=parse_size(a.block_size) if a.block_size else None, rate=_rate(a),
                             config=a.config)
    # bad values are refused before anything, xenstored included
    if opts.block_bytes is not None:
        era_block_size(opts.block_bytes)
    nbd_timeout(opts.cutover.nbd_timeout)
    check_xl_timeout(opts.xl_timeout)
    stack = make_stack(a)
    xl = Xl(stack.runner)
    t = time.monotonic()
    with PyxsXenStore() as xs:
        plan = migrate_domain.plan(stack, xs, xl, a.domain, a.host, _ssh_opts(a), opts)
    plan_s = round(time.monotonic() - t, 3)
    if a.dry_run:
        print(json.dumps({"event": "plan", **_plan_dict(plan)}) if a.json else plan.render())
        return 0

    def say(line: str) -> None:
        print(json.dumps({"event": "step", "message": line}) if a.json else line, flush=True)
    if not a.json:
        print(plan.render(), flush=True)
    s = migrate_domain.migrate(stack, xl, plan, _ssh_opts(a), opts,
                               lambda d, i: Progress(a.json, label=d.name, position=i), say)
    s["plan_seconds"] = plan_s
    if a.json:
        print(json.dumps({"event": "summary", **s}))
    else:
        print(f"{plan.domain.name}: migrated to {a.host} in {s['seconds']:.1f}s "
              f"(xl migrate {s['xl']['seconds']:.1f}s); every disk verified by the handover gate")
        for n, d in s["disks"].items():
            h = d.get("handover", {})
            print(f"  {n}: handover suspended I/O for {h.get('seconds', 0) * 1000:.0f} ms ({h.get('why')})")
    return 0


def _plan_dict(p: Any) -> dict[str, Any]:
    return {"domain": p.domain.name, "domid": p.domain.domid, "host": p.host, "transport": p.transport,
            "tunnel": p.tunnel, "tunnel_why": p.tunnel_why,
            "disks": [{"vdev": d.vbd.vdev, "params": d.vbd.params, "name": d.name, "size": d.size, "phase": d.phase,
                       "destination": d.dest_disk, "destination_exists": d.dest_exists, "tables": d.tables,
                       "estimate": d.estimate, "adopt": d.adopt.render() if d.adopt else None}
                      for d in p.disks],
            "xl_config": ({"source": p.xl_config.source, "adopted": p.xl_config.adopted, "text": p.xl_config.text}
                          if p.xl_config else None),
            "not_moved": [{"vdev": v.vdev, "params": v.params, "script": v.script, "mode": v.mode} for v in p.others]}


def cmd_watch(a: argparse.Namespace) -> int:
    from dmmig.core.watch import watch
    from dmmig.names import top_name
    stack = make_stack(a)
    return watch(stack.dm, stack.journal.dir, a.name, top_name(a.name))


def cmd_hotplug(a: argparse.Namespace) -> int:
    from dmmig.entry import hotplug
    return hotplug.main(a.action, state_dir=a.state_dir)


def cmd_agent(a: argparse.Namespace) -> int:
    from dmmig.core import confine
    from dmmig.entry import agent
    # flags replace the configuration file's settings: in an authorized_keys command= they
    # are the operator's; never take them from what the connecting source asks for
    policy = confine.load(a.config, file_roots=tuple(a.file_root) if a.file_root else None,
                          devices=tuple(a.device) if a.device else None,
                          max_create=parse_size(a.max_create) if a.max_create else None,
                          create=False if a.no_create else None)
    return agent.main(a.state_dir, a.mode, a.arg, forced=a.forced_command, policy=policy)


def _check_destination(a: argparse.Namespace) -> None:
    """[USER@]HOST and the options that reach OpenSSH's command line, refused before anything."""
    from dmmig.adapters.ssh import Endpoint
    from dmmig.flows import session
    if a.host is not None:
        Endpoint.parse(a.host, _ssh_opts(a))
    session.check_transport(_copy_opts(a))


def _copy_options(sp: argparse.ArgumentParser) -> None:
    """Destination, transport and copy options: the same for `copy` and `migrate`."""
    sp.add_argument("--create", action="store_true", help="create the destination disk (sparse file or LV)")
    sp.add_argument("--transport", choices=["ssh", "nbd"], default="ssh",
                    help="ssh (default): NBD through SSH to an export on a unix socket only root can reach "
                         "on the destination; nbd: direct NBD over TCP to --nbd-address, encrypted and "
                         "authenticated with TLS certificates dmmig makes for this migration (or, with "
                         "--insecure, neither)")
    sp.add_argument("--nbd-address", metavar="ADDR", help="destination address for --transport nbd")
    sp.add_argument("--insecure", action="store_true",
                    help="--transport nbd WITHOUT TLS: anyone who can reach ADDR on the network can read and "
                         "overwrite the disk while it is exported; only on a network you trust completely")
    sp.add_argument("--tunnel", choices=["auto", "forward", "relay"], default="auto",
                    help="--transport ssh: how the mirror's NBD leg crosses SSH. auto (default): forward a unix "
                         "socket if the destination allows it (probed at plan time), else relay through "
                         "`dmmig agent relay` (slower)")
    sp.add_argument("--port", type=int, default=22, help="SSH port")
    sp.add_argument("--known-hosts", metavar="FILE", help="default ~/.ssh/known_hosts; unknown keys are refused")
    sp.add_argument("--identity", metavar="FILE", help="SSH private key")
    sp.add_argument("--remote-dmmig", default="dmmig", metavar="PATH", help="dmmig on the destination")
    sp.add_argument("--remote-state-dir", metavar="DIR", help="state dir on the destination")
    sp.add_argument("--converge", default="64M", metavar="SIZE", help="stop when a round's delta is below")
    sp.add_argument("--max-rounds", type=int, default=10, metavar="N")
    sp.add_argument("--bwlimit", metavar="RATE", help="payload bytes per second, e.g. 50M")


def _block_size_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--block-size", metavar="SIZE",
                    help="era block = mirror region size; power of two, multiple of 4K. Default: chosen from "
                         "the disk size, 64K up to 256 GiB and larger beyond (at most 4 Mi era blocks: 512K at "
                         "2 TiB), which bounds the era metadata and each round's query. Larger: coarser rounds, "
                         "faster resync over a long round trip")


def _rate_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--rate", metavar="RATE",
                    help="--dry-run: the copy rate to estimate the time with, bytes/s, e.g. 50M (default: the "
                         "rate this migration's copy reached, else 100M, about a 1 Gbit/s link)")


def _rate(a: argparse.Namespace) -> float | None:
    if not a.rate:
        return None
    rate = parse_size(a.rate)
    if rate <= 0:
        raise BadInput(f"--rate must be positive, got {a.rate!r}")
    return float(rate)


def _copy_opts(a: argparse.Namespace, dest_disk: str | None = None) -> Any:
    from dmmig.flows import session
    return session.CopyOptions(dest_disk=dest_disk, create=a.create, transport=a.transport,
                               nbd_address=a.nbd_address, insecure=a.insecure,
                               tunnel=None if a.tunnel == "auto" else a.tunnel, remote_dmmig=a.remote_dmmig,
                               remote_state_dir=a.remote_state_dir, converge=parse_size(a.converge),
                               max_rounds=a.max_rounds, bwlimit=parse_size(a.bwlimit) if a.bwlimit else None)


def _ssh_opts(a: argparse.Namespace) -> SshOptions:
    from dmmig.adapters.ssh import SshOptions  # paramiko: only for verbs that reach a host
    return SshOptions(a.port, a.known_hosts, a.identity)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmig", description=__doc__ and "Live-migrate local Xen blkback "
                                "disks with device-mapper (dm-era + dm-mirror over NBD).")
    p.add_argument("--version", action="version", version=f"dmmig {__version__}")
    p.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    p.add_argument("--state-dir", help=f"journal directory (default $DMMIG_STATE_DIR or {DEFAULT_STATE_DIR})")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("wrap", cmd_wrap, "create /dev/mapper/dmmig-NAME as linear over ORIGIN (idempotent)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("origin", metavar="ORIGIN", help="block device: LV, partition or loop device")

    sp = verb("adopt", cmd_adopt, "put /dev/mapper/dmmig-NAME under a running LV (a `phy:` disk blkback holds "
              "open): its table moves to dmmig-NAME-lv, the LV becomes linear over dmmig-NAME, live; then prepare, "
              "copy, cutover... as for a wrapped disk. finish and abort give the LV its own table back. Hold LVM "
              "changes to its VG meanwhile")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("lv", metavar="LV", help="the logical volume, e.g. /dev/vg0/vm1 (linear or striped)")
    sp.add_argument("--dry-run", action="store_true", help="print the tables it would load; change nothing")

    sp = verb("forget", cmd_forget, "drop NAME's warm state here: the generation a finished migration recorded "
              "and the era tracking it started (a copy back is then a full one)")
    sp.add_argument("name", metavar="NAME")

    sp = verb("unwrap", cmd_unwrap, "remove /dev/mapper/dmmig-NAME (an adopted LV gets its own table back)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--force", action="store_true", help="also while open or while a migration is in progress")

    sp = verb("prepare", cmd_prepare, "insert dm-era under the top device, live")
    sp.add_argument("name", metavar="NAME")
    _block_size_option(sp)
    sp.add_argument("--metadata", metavar="DEV", help="era metadata device (default: a file in the state dir)")

    sp = verb("checkpoint", cmd_checkpoint, "start a new era; print its number")
    sp.add_argument("name", metavar="NAME")

    sp = verb("dirty", cmd_dirty, "print the extents written since an era")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--since", type=int, default=1, metavar="ERA", help="default 1: everything since prepare")
    sp.add_argument("--json", action="store_true")

    sp = verb("status", cmd_status, "every disk at a glance; with NAME, its device stack, era, mirror and problems")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("--tables", action="store_true", help="with NAME: every line of a mirror set's table and status")
    sp.add_argument("--json", action="store_true")

    sp = verb("copy", cmd_copy, "copy the disk to the destination: base copy, then era rounds")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("host", nargs="?", metavar="[USER@]HOST", help="destination (remembered in the journal)")
    sp.add_argument("--dest-disk", metavar="PATH", help="destination disk (default: the origin's path)")
    _copy_options(sp)
    sp.add_argument("--dry-run", action="store_true",
                    help="print the era block and metadata size, the bytes the base copy sends and the time it "
                         "takes at --rate; change nothing, contact nobody")
    _rate_option(sp)
    sp.add_argument("--json", action="store_true", help="JSON lines: progress events and a summary")

    sp = verb("cutover", cmd_cutover, "switch to a synchronous mirror: every write reaches both hosts; "
              "the kernel resyncs what changed since the last copy round")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--nbd-timeout", type=int, default=10, metavar="SECONDS",
                    help="a request to a dead destination fails the leg after this (1..600, default 10)")
    sp.add_argument("--resync-parts", type=int, metavar="N",
                    help="mirror targets side by side, cut where the last delta lies, each recovering one region "
                         "at a time: more put more bytes in flight on the leg, which the guest's writes wait "
                         "behind; fewer are gentler on them, and past 16 the rig's tail was no faster (1..64; "
                         "default 16)")
    sp.add_argument("--json", action="store_true")

    sp = verb("handover", cmd_handover, "the source's side of the handover gate: wait for the destination's "
              "block script to ask, vouch for the mirror (or catch up first), answer")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--timeout", type=float, default=300, metavar="SECONDS", help="wait this long for the ask")
    sp.add_argument("--json", action="store_true")

    sp = verb("finish", cmd_finish, "after the new owner took over: tear down both sides, keep the data")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--remove", action="store_true", help="also remove /dev/mapper/dmmig-NAME (must be closed)")
    sp.add_argument("--force", action="store_true", help="even if the mirror is not in sync and healthy")

    sp = verb("verify", cmd_verify, "compare source and destination by digests computed on each side")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--chunk", default="1M", metavar="SIZE", help="digest granularity (default 1M)")
    sp.add_argument("--offset", default="0", metavar="SIZE",
                    help="start there (a multiple of --chunk; default 0)")
    sp.add_argument("--length", metavar="SIZE",
                    help="compare only this many bytes (default: to the end). A whole multi-TiB disk takes hours "
                         "on both hosts; check the ranges that matter")
    sp.add_argument("--json", action="store_true")

    sp = verb("migrate", cmd_migrate, "live-migrate a running domain and its block-dmmig disks: copy, mirror, "
              "xl migrate with the handover gate, finish both hosts. Options for xl migrate go after `--` "
              "(-s SSHCMD, -C CONFIG, -e, -p, -D, -F, --debug)")
    sp.add_argument("domain", metavar="DOMAIN", help="domain name or domid")
    sp.add_argument("host", metavar="[USER@]HOST", help="destination, as for xl migrate (same SSH login)")
    sp.set_defaults(xl_args=[])  # what follows `--`: options for xl migrate (see main)
    sp.add_argument("--dry-run", action="store_true",
                    help="print the plan (disks, sizes, destination paths, dm tables, era block and metadata "
                         "size, bytes to send and the time at --rate) and change nothing")
    _rate_option(sp)
    _copy_options(sp)
    sp.add_argument("--nbd-timeout", type=int, default=10, metavar="SECONDS",
                    help="a request to a dead destination fails the mirror leg after this (1..600, default 10)")
    sp.add_argument("--shared", action="store_true",
                    help="the domain's writable disks that do not use block-dmmig are on shared storage")
    sp.add_argument("--config", metavar="FILE",
                    help="the domain's xl config file (default /etc/xen/DOMAIN.cfg): when dmmig adopts a `phy:` LV, "
                         "xl migrate starts the guest on HOST with this file (-C), that disk on block-dmmig")
    sp.add_argument("--xl-timeout", type=float, default=3600, metavar="SECONDS",
                    help="wait this long for xl migrate (60..604800, default 3600). xl is never killed (a killed "
                         "xl leaves the guest suspended): past it dmmig stops waiting and says what to do")
    _block_size_option(sp)
    sp.add_argument("--json", action="store_true")

    # cutover starts the watcher through its lean entry (dmmig/entry/watch.py); this is for one
    # started by hand
    sp = verb("watch", cmd_watch, "leg watcher daemon, started by cutover (records when a leg fails)")
    sp.add_argument("name", metavar="NAME")

    sp = verb("agent", cmd_agent, "destination side, run over SSH: speak the agent protocol on stdin/stdout; "
              "`relay NAME`: relay stdin/stdout to NAME's NBD export; `hold NAME`: keep a tunnel's session open; "
              "`probe TOKEN`: answer the source's forwarding probe. It touches only block devices matching its "
              "device patterns and files under its file roots (/etc/dmmig/agent.conf; these flags replace the "
              "file's settings)")
    sp.add_argument("mode", nargs="?", choices=["relay", "hold", "probe"], help=argparse.SUPPRESS)
    sp.add_argument("arg", nargs="?", help=argparse.SUPPRESS)
    sp.add_argument("--forced-command", action="store_true",
                    help="run as an authorized_keys command=: do only what SSH_ORIGINAL_COMMAND asks if it is "
                         "one of dmmig's own agent invocations; refuse anything else")
    sp.add_argument("--config", metavar="FILE",
                    help="confinement settings (default $DMMIG_AGENT_CONF, else /etc/dmmig/agent.conf if it exists)")
    sp.add_argument("--file-root", action="append", metavar="DIR",
                    help="disk image files only under DIR (repeatable; default /var/lib/xen/images /srv/xen)")
    sp.add_argument("--device", action="append", metavar="GLOB",
                    help="block devices only with a path matching GLOB (repeatable; default /dev/*)")
    sp.add_argument("--max-create", metavar="SIZE", help="create no disk larger than SIZE (default: the free space)")
    sp.add_argument("--no-create", action="store_true", help="create no disks at all")

    sp = verb("hotplug", cmd_hotplug, "the Xen block script block-dmmig (run by libxl with XENBUS_PATH set): "
              "add wraps the disk's target and hands it to blkback, remove unwraps it")
    sp.add_argument("action", choices=["add", "remove"])

    sp = verb("abort", cmd_abort, "return to linear over the origin and remove everything else (any phase)")
    sp.add_argument("name", metavar="NAME")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `dmmig migrate DOMAIN HOST [OPTIONS] -- XL-OPTIONS`: what follows `--` is xl's, verbatim
    tail: list[str] | None = None
    if "migrate" in argv and "--" in argv[argv.index("migrate"):]:
        cut = argv.index("--", argv.index("migrate"))
        argv, tail = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if tail is not None:
        args.xl_args = tail
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    fn: Callable[[Any], int] = args.fn
    try:
        return fn(args)
    except DmmigError as e:
        if args.debug:
            _print_trace(e)
        print(f"dmmig {args.verb}: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  what to do: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print(f"dmmig {args.verb}: interrupted; `dmmig status` shows what is left", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the boundary: report, never a bare traceback
        if args.debug:
            raise
        print(f"dmmig {args.verb}: internal error: {type(e).__name__}: {e}\n"
              "  what to do: rerun with --debug and report the traceback", file=sys.stderr)
        return int(Exit.FAILED)


def _print_trace(e: DmmigError) -> None:
    """--debug: the error's traceback with its causes (`raise ... from`), each teardown step's,
    and a bug's on the destination as the agent sent it."""
    traceback.print_exception(e, file=sys.stderr)
    for i, sub in enumerate(getattr(e, "errors", None) or [], 1):
        print(f"--- step {i} of the teardown:", file=sys.stderr)
        traceback.print_exception(sub, file=sys.stderr)
    if e.remote_trace:
        print(f"--- on the destination:\n{e.remote_trace.rstrip()}", file=sys.stderr)
