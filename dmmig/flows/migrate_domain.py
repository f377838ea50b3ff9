"""`dmmig migrate DOMAIN HOST`: a running domain and all its block-dmmig disks, top to bottom.

1. plan: find the domain's disks in XenStore; refuse, before anything changes, a disk dmmig
   cannot move (a writable disk neither on block-dmmig nor an LV `dmmig adopt` takes, unless
   the operator says it is shared; a destination disk missing, too small or in use; no
   block-dmmig on the destination). A domain with adopted LVs needs a config for xl migrate -C
   that starts it on the destination with block-dmmig (xlcfg.py): built and checked here;
2. adopt the LVs (each undone by abort), then every disk to a synchronous mirror, in
   parallel: prepare, copy (base + era rounds), cutover; any failure aborts them all and the
   domain never moved;
3. `xl migrate`, while one agent session answers the handover gate for each disk as the
   destination's block script asks (handover.answer_gate);
4. xl succeeded: finish every disk on both sides (the source's stack is removed, the loop
   device block-dmmig attached is detached); xl failed and the guest resumed here: abort
   every disk on both sides. A guest that is neither here nor known to have moved is left
   to the operator, with the state `dmmig status` explains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dmmig import sizing
from dmmig.adapters.blockdev import logical_block_size
from dmmig.adapters.ssh import Endpoint, SshOptions
from dmmig.adapters.xenstore import XenStore
from dmmig.adapters.xl import Domain, Xl, XlRun, check_xl_timeout, config_option
from dmmig.adapters.xlcfg import diff_configs, rewrite
from dmmig.core import journal, mirrorlog
from dmmig.core.records import Destination
from dmmig.core.stack import HOLD_LVM, AdoptPlan, Stack
from dmmig.errors import BadInput, DmmigError, RemoteError, StateError
from dmmig.flows import warm
from dmmig.flows.copying import copy, estimate, render_estimate
from dmmig.flows.cutover import CutoverOptions, cutover, mirror_table
from dmmig.flows.domain import Vbd, vbds
from dmmig.flows.finish import abort, finish_handed_over
from dmmig.flows.handover import answer_gate, mirroring_entry, settle_generation
from dmmig.flows.session import CopyOptions, Remote, check_destination, check_source, destination, stop_remote
from dmmig.names import SCRIPT, disk_name_for, era_name, format_devno, lv_name, top_name
from dmmig.progress import Progress
from dmmig.validate import block_fits, era_block_size, nbd_timeout

log = logging.getLogger("dmmig.migrate")
CLOSE_WAIT_S = 20.0  # blkback lets go of the source's top device from deferred work


@dataclass
class MigrateOptions:
    copy: CopyOptions = field(default_factory=CopyOptions)
    cutover: CutoverOptions = field(default_factory=CutoverOptions)
    xl_args: list[str] = field(default_factory=list)
    xl_timeout: float = 3600
    shared_ok: bool = False         # the domain's writable disks not on block-dmmig are shared storage
    block_script: str = "/etc/xen/scripts/block-dmmig"
    # era block = mirror region, for disks not prepared yet: the kernel resyncs one region at a
    # time, so larger regions resync faster over a long round trip (README, "Resync speed").
    # None: each disk's is chosen from its size (sizing.choose_block)
    block_bytes: int | None = None
    rate: float | None = None       # --dry-run's estimate: the copy rate (bytes/s)
    # the operator's xl config of the domain, the base of xl migrate's -C when dmmig adopts an
    # LV (None: /etc/xen/DOMAIN.cfg)
    config: str | None = None


@dataclass
class XlConfig:
    """The config xl migrate gets with -C (xlcfg.py): SOURCE, the operator's file, with the
    adopted disks on block-dmmig; TEXT None: the operator's own -C, checked, passed as it is."""
    source: str
    text: str | None
    adopted: list[str]     # vdevs


@dataclass
class Disk:
    vbd: Vbd
    name: str
    origin: str            # what dmmig-NAME wraps here (the LV, or block-dmmig's loop device)
    size: int
    phase: str
    dest_disk: str         # params: block-dmmig on the destination wraps the same path
    dest_exists: bool
    tables: list[str]
    block_size: int | None = None   # logical block size blkfront got; the destination must match it
    adopt: AdoptPlan | None = None  # a `phy:` LV dmmig adopts first (phase "adopt": nothing made yet)
    estimate: dict[str, Any] = field(default_factory=dict)  # era block, metadata, bytes and time (copying.estimate)

    @property
    def top(self) -> str:
        return top_name(self.name)


@dataclass
class Plan:
    domain: Domain
    host: str
    disks: list[Disk]
    others: list[Vbd]      # disks xl migrate must find on the destination as they are
    transport: str = "ssh"
    tunnel: str | None = None   # ssh: the mirror leg's tunnel mode, probed on the destination
    tunnel_why: str = ""
    xl_config: XlConfig | None = None

    def render(self) -> str:
        lines = [f"migrate domain {self.domain.name} (domid {self.domain.domid}) to {self.host}:"]
        if self.transport == "ssh":
            lines.append(f"  NBD over SSH to a root-only unix socket; mirror leg tunnel: {self.tunnel}"
                         + (f" ({self.tunnel_why})" if self.tunnel_why else ""))
        else:
            lines.append("  NBD over TCP (--transport nbd)")
        for d in self.disks:
            dest = "exists" if d.dest_exists else "created (--create)"
            if d.adopt is not None:
                lines.append(f"  {d.vbd.vdev}: {d.vbd.params} (script {d.vbd.script or 'none'}): adopted first, "
                             f"live, as dmmig disk {d.name}:")
                lines += [f"    {ln}" for ln in d.adopt.render()[1:]]
            lines.append(f"  {d.vbd.vdev}: {d.vbd.params} as dmmig disk {d.name}, {d.size} bytes "
                         f"({d.size / (1 << 20):.1f} MiB), phase {d.phase}; destination {self.host}:{d.dest_disk} "
                         f"({dest})")
            lines += [f"    {t}" for t in d.tables]
            if d.estimate:
                lines += render_estimate(d.estimate, "    ")
        for v in self.others:
            lines.append(f"  {v.vdev}: {v.params or '(no params)'} (script {v.script or 'none'}, mode {v.mode}): "
                         "not moved by dmmig; xl migrate expects it on the destination as it is")
        c = self.xl_config
        if c is not None and c.text is not None:
            lines.append(f"  xl migrate -C: {c.source} with {', '.join(c.adopted)} on script={SCRIPT} (same target) "
                         "and the running domain's uuid, every other setting as the file has it:")
            lines += [f"    {ln}" for ln in c.text.splitlines()[-3:]]
        elif c is not None:
            lines.append(f"  xl migrate -C {c.source} (yours): {', '.join(c.adopted)} on script={SCRIPT} there")
        return "\n".join(lines)


# ---- 1. plan -----------------------------------------------------------------------------
def plan(stack: Stack, xs: XenStore, xl: Xl, domain: str, host: str, ssh_opts: SshOptions,
         opts: MigrateOptions, remote: Callable[[Destination], Any] = Remote) -> Plan:
    """Everything `dmmig migrate` will do, checked on both hosts; changes nothing. REMOTE
    connects to the destination's agent (injected by the unit tests)."""
    nbd_timeout(opts.cutover.nbd_timeout)
    check_xl_timeout(opts.xl_timeout)
    dom = xl.find(domain)  # no xl here: refused as a missing tool
    if dom is None:
        raise BadInput(f"no domain {domain!r} runs on this host", hint="`xl list` shows the running domains")
    if dom.domid == 0:
        raise BadInput("domain 0 cannot be migrated")
    all_vbds = vbds(xs, dom.domid)
    mine = [v for v in all_vbds if v.managed]
    others = [v for v in all_vbds if not v.managed]
    # a writable disk on the stock script: adopted if it is an LV `dmmig adopt` takes (the
    # reason it is not, otherwise); --shared says they are all on shared storage instead
    adopt: dict[str, AdoptPlan] = {}
    risky = [v for v in others if v.writable]
    if risky and not opts.shared_ok:
        refused = []
        for v in risky:
            if _adopted_before(stack, v):  # an earlier run's (killed, or failed after the adopt): resumed
                continue
            try:
                adopt[v.vdev] = _adoptable(stack, v)
            except BadInput as e:
                refused.append(f"{v.vdev} ({v.params}): {e.message}")
        if refused:
            raise BadInput(f"{dom.name} has writable disks dmmig can neither move nor adopt: " + "; ".join(refused)
                           + "; the destination would run the guest on its own copy of them",
                           hint="use script=block-dmmig for them (a restart), or pass --shared if they are on "
                                "shared storage")
    resumed = [v for v in risky if v.vdev not in adopt and not opts.shared_ok]
    to_adopt = [v for v in others if v.vdev in adopt] + resumed
    others = [v for v in others if v not in to_adopt]
    if not mine and not to_adopt:
        raise BadInput(f"none of {dom.name}'s disks uses block-dmmig or is an LV dmmig can adopt: nothing for "
                       "dmmig to move",
                       hint="give its disks script=block-dmmig (README), or use `xl migrate` for shared storage")
    remote_of = [v for v in mine if not v.local_backend]
    if remote_of:
        raise BadInput(f"{', '.join(v.vdev for v in remote_of)}: served from a driver domain "
                       f"({remote_of[0].backend}); dmmig moves disks served by dom0's blkback only")
    config = config_option(opts.xl_args)
    adopted_vdevs = {v.vdev for v in to_adopt}
    if config is not None:
        _check_config(xl, config, dom, all_vbds, adopted_vdevs)
    xl_config = None
    if to_adopt:
        if opts.config is not None and config is not None:
            raise BadInput("--config and `-- -C` both name xl's config: give one")
        xl_config = (XlConfig(config, None, sorted(adopted_vdevs)) if config is not None else
                     _config_for(stack, xl, opts.config or f"/etc/xen/{dom.name}.cfg", dom, all_vbds, adopted_vdevs))
    elif opts.config is not None:
        raise BadInput("--config: no disk of the domain is adopted, so xl migrate needs no config of dmmig's",
                       hint="pass a config to xl itself with `-- -C FILE`")
    ep = Endpoint.parse(host, ssh_opts)
    if opts.block_bytes is not None:
        era_block_size(opts.block_bytes)
    # the parts cutover will choose (cutover.cutover: --resync-parts, else MAX_PARTS), refused
    # as it would refuse them, so the tables below are the ones it loads
    parts = opts.cutover.resync_parts or mirrorlog.MAX_PARTS
    if not 1 <= parts <= 64:
        raise BadInput(f"--resync-parts {parts}: 1..64")
    disks = [_disk_here(stack, v, ep.host, opts.block_bytes, opts.rate, parts) for v in mine + resumed]
    disks += [_adopted_disk(v, adopt[v.vdev], opts.block_bytes, opts.rate, parts,
                            stack.discard_unit_of(adopt[v.vdev].devno)) for v in to_adopt if v.vdev in adopt]
    for d in disks:
        d.block_size = _sector_size(xs, stack, d)
    # found missing at cutover, it would cost the whole copy
    check_source(stack, opts.copy.transport, [d.name for d in disks])
    tunnel, why = _check_destination(stack, disks, host, ssh_opts, opts, remote)
    return Plan(dom, host, disks, others, opts.copy.transport, tunnel, why, xl_config)


def _adopted_before(stack: Stack, v: Vbd) -> bool:
    """Whether V's LV is adopted already (by a dmmig migrate that was killed or failed after its
    adopt): then its migration resumes as a wrapped disk's does. StateError if LVM reloaded
    the LV since (nothing tracked its writes: abort, then migrate again)."""
    try:
        entry = stack.journal.load(disk_name_for(v.params))
    except BadInput:
        return False
    if entry is None or entry.adopted is None or entry.phase == journal.ADOPTING:
        return False  # an adopt that did not finish: adopt_plan refuses it, `dmmig abort` undoes it
    if entry.adopted.devno != _devno_of(v.physical_device):
        return False
    stack.check_lv(entry)
    return True


def _adoptable(stack: Stack, v: Vbd) -> AdoptPlan:
    """The adopt plan for V, a writable disk on the stock block script, or BadInput: why not."""
    if os.path.basename(v.script) not in ("block", ""):
        raise BadInput(f"its hotplug script is {v.script}, not xl's stock block script")
    if not v.backend.startswith("/local/domain/0/backend/vbd/"):
        raise BadInput(f"its backend is {v.backend}, not dom0's blkback")
    plan = stack.adopt_plan(disk_name_for(v.params), v.params)  # not an LV, or one that cannot be: why
    if plan.devno != _devno_of(v.physical_device):
        raise BadInput(f"blkback serves {v.physical_device or '(nothing)'}, which is not {v.params} ({plan.devno})")
    return plan


def _devno_of(physical_device: str) -> str:
    """physical-device is hex major:minor (the block script's); "" when it is not that."""
    try:
        major, minor = physical_device.split(":")
        return f"{int(major, 16)}:{int(minor, 16)}"
    except ValueError:
        return ""


def _cutover_lines(name: str, length: int, block_sectors: int, resync_parts: int) -> list[str]:
    """The plan's lines for the top's mirror set at cutover (the first and last part)."""
    layout = mirrorlog.Layout.choose(length, block_sectors, max_parts=resync_parts)
    lines = mirror_table(layout, [f"<log {i}>" for i in range(layout.parts)], f"<{era_name(name)}>",
                         "<nbd leg>").render().splitlines()
    return [f"cutover:    {top_name(name)}: {layout.parts} dm-mirror targets side by side, regions of "
            f"{layout.region // 2} KiB, each recovering one at a time (shown of equal length: the cutover "
            f"cuts them where the last delta lies):",
            *(f"            {ln}" for ln in (lines if len(lines) <= 3 else [lines[0], "...", lines[-1]]))]


def _adopted_disk(v: Vbd, a: AdoptPlan, block_bytes: int | None, rate: float | None, resync_parts: int,
                  discard_unit: int) -> Disk:
    """The plan of a disk dmmig adopts first (nothing of it exists yet): its tables to be.
    DISCARD_UNIT: the LV's discard granularity, the smallest era block prepare will choose."""
    rate_given = rate is not None
    length = a.table.length
    choice = sizing.choose_block(length * 512, block_bytes, discard_unit)  # refuses a block dm-era cannot take
    block_sectors = choice.block_bytes // 512
    block_fits(block_sectors, length, f"{v.vdev} ({v.params})")
    name, top = a.name, top_name(a.name)
    tables = [f"prepare:    {era_name(name)}: 0 {length} era <metadata loop> <{lv_name(name)}> {block_sectors}",
              f"            {top}: 0 {length} linear <{era_name(name)}> 0"]
    tables += _cutover_lines(name, length, block_sectors, resync_parts)
    tables.append("  " + HOLD_LVM.format(lv=a.lv))
    rate = float(rate or sizing.DEFAULT_RATE)
    est = {"name": name, "disk_bytes": length * 512, "block_bytes": choice.block_bytes,
           "block": "chosen from the disk size" if choice.chosen else "--block-size", "era_blocks": choice.nr_blocks,
           "metadata_bytes": choice.metadata_bytes, "metadata_file_bytes": choice.metadata_file,
           "warning": choice.warning, "send_bytes": length * 512,
           "send_basis": "the whole LV (zero blocks are found while copying and not sent)", "warm": None,
           "rate_bytes_per_s": int(rate), "rate_basis": "--rate" if rate_given else "assumed; give --rate for yours",
           "seconds": round(length * 512 / rate, 1)}
    return Disk(v, name, v.params, length * 512, "adopt", v.params, True, tables, estimate=est, adopt=a)


def _config_for(stack: Stack, xl: Xl, source: str, dom: Domain, running: list[Vbd], adopted: set[str]) -> XlConfig:
    """The config xl migrate -C starts the domain with on the destination: SOURCE (the
    operator's file for it) checked against the running domain (a stale file is refused),
    rewritten (xlcfg.rewrite), and parsed by libxl again to prove that only the adopted disks'
    scripts and the uuid changed."""
    if not os.path.isfile(source):
        raise BadInput(f"{dom.name} has LVs to adopt, and xl migrate must then start it on the destination with "
                       f"block-dmmig: dmmig needs its config file, and {source} is none",
                       hint="--config FILE (the file it was created from), or `-- -C FILE` with the adopted disks "
                            f"already on script={SCRIPT}")
    _check_config(xl, source, dom, running, set())  # the file describes the running domain, as it is
    before = xl.parsed_config(source)
    live = xl.running_config(dom.domid)
    name = (before.get("c_info") or {}).get("name")
    if name != dom.name:
        raise BadInput(f"{source} is the config of {name!r}, not of {dom.name}")
    _check_nics(source, before, live)
    with open(source, encoding="utf-8", errors="strict") as f:
        text = f.read()
    scripts = {vdev: SCRIPT for vdev in adopted}
    new = rewrite(text, list(before.get("disks") or []), scripts, str((live.get("c_info") or {}).get("uuid", "")))
    path = _config_path(stack, dom)
    try:
        _write_private(path, new)
        diffs = diff_configs(before, xl.parsed_config(path), scripts)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if diffs:
        raise BadInput(f"the config dmmig wrote from {source} for xl migrate -C is not that file with "
                       f"{', '.join(sorted(adopted))} on {SCRIPT}: " + "; ".join(diffs),
                       hint=f"pass your own with `-- -C FILE` (the adopted disks on script={SCRIPT})")
    return XlConfig(source, new, sorted(adopted))


def _check_nics(source: str, cfg: dict[str, Any], live: dict[str, Any]) -> None:
    """xl migrate -C gives the guest the file's vifs: each must keep the MAC it has now (a vif
    without mac= gets a random one on the destination)."""
    have = [str(n.get("mac", "")).lower() for n in live.get("nics") or []]
    got = [str(n.get("mac", "")).lower() for n in cfg.get("nics") or []]
    if len(have) != len(got):
        raise BadInput(f"{source} has {len(got)} vifs, the running domain {len(have)}: a stale config?")
    for i, (h, g) in enumerate(zip(have, got)):
        if g in ("", "00:00:00:00:00:00"):
            raise BadInput(f"vif {i} has no mac= in {source}: xl migrate -C would give the guest a random MAC "
                           f"on the destination instead of {h}", hint=f"add mac={h} to that vif in {source}")
        if g != h:
            raise BadInput(f"vif {i} has mac {g} in {source} but {h} running: a stale config?")


def _config_path(stack: Stack, dom: Domain) -> str:
    return os.path.join(stack.journal.dir, f"xl-migrate-{dom.domid}.cfg")


def _write_private(path: str, text: str) -> None:
    """TEXT to PATH (in the state dir), root-only, replacing a leftover of an earlier run
    (never through a link)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _check_config(xl: Xl, config: str, dom: Domain, running: list[Vbd], adopted: set[str]) -> None:
    """`-- -C CONFIG` makes xl migrate start the guest on the destination with CONFIG's disks:
    they must be the running domain's (same vdevs, targets, scripts, modes), or the guest
    would boot there on disks dmmig did not move (or block-dmmig's gate would not be asked).
    ADOPTED: vdevs dmmig adopts here, which must be on block-dmmig in CONFIG."""
    got = {d.vdev: d for d in xl.config_disks(config)}
    have = {v.vdev: v for v in running}
    diffs = []
    for vdev in sorted(set(got) | set(have)):
        d, v = got.get(vdev), have.get(vdev)
        if v is None:
            assert d is not None
            diffs.append(f"{vdev} ({d.target}) is in {config} but not in the running domain")
        elif d is None:
            diffs.append(f"{vdev} ({v.params}) is in the running domain but not in {config}")
        else:
            want = SCRIPT if vdev in adopted else _script(v.script)
            if _script(d.script) != want:
                diffs.append(f"{vdev}: script {d.script or '(none)'} in {config}, {v.script or '(none)'} running"
                             + (f" (adopted: {SCRIPT} there)" if vdev in adopted else ""))
            # qdisk's params carry the format: "raw:/srv/x.img" for target /srv/x.img
            if d.target != v.params and not v.params.endswith(":" + d.target):
                diffs.append(f"{vdev}: target {d.target} in {config}, {v.params} running")
            if d.writable != v.writable:
                diffs.append(f"{vdev}: {'writable' if d.writable else 'read-only'} in {config}, "
                             f"{'writable' if v.writable else 'read-only'} running")
    if diffs:
        raise BadInput(f"-C {config} does not describe {dom.name}'s disks: " + "; ".join(diffs),
                       hint="xl migrate would start the guest on the destination with those disks: pass the "
                            "domain's own config, or leave -C out (xl then sends the running config)")


def _script(path: str) -> str:
    """A disk's hotplug script by name; none (a config's `phy:` disk) is libxl's default, block
    (libxl_disk.c: a phy disk's script is `block` unless one is given)."""
    return os.path.basename(path) or "block"


def _disk_here(stack: Stack, v: Vbd, dest_host: str, block_bytes: int | None, rate: float | None,
               resync_parts: int) -> Disk:
    """BLOCK_BYTES: the era block (= region) prepare will use if the disk is not prepared yet
    (None: chosen from its size); RATE: the copy rate for the time estimate."""
    name = v.name
    top = top_name(name)
    entry = stack.journal.load(name)
    info = stack.dm.info(top)
    if entry is None or info is None:
        raise StateError(f"{v.vdev} ({v.params}): block-dmmig set it up, but {top} or its journal entry is "
                         "missing here", hint=f"`dmmig status {name}`; the domain may need a restart on this host")
    if entry.adopted is not None:  # blkback holds the LV, linear over the top (_adopted_before)
        if _devno_of(v.physical_device) != entry.adopted.devno:
            raise StateError(f"{v.vdev}: blkback serves {v.physical_device}, which is not the adopted LV "
                             f"{entry.adopted.lv} ({entry.adopted.devno})", hint=f"`dmmig abort {name}`")
    elif format_devno(os.makedev(info.major, info.minor)) != v.physical_device:
        raise StateError(f"{v.vdev}: blkback serves {v.physical_device}, which is not {top}",
                         hint="the disk was re-pointed behind block-dmmig; do not migrate it with dmmig")
    if entry.dest and entry.dest.host != dest_host:
        raise StateError(f"{name} is already being migrated to {entry.dest.host}",
                         hint=f"`dmmig abort {name}` first")
    length = stack.dm.table(top).length
    est = estimate(stack, name, block_bytes=block_bytes, rate=rate)  # refuses a block dm-era cannot take
    block_sectors = int(est["block_bytes"]) // 512
    block_fits(block_sectors if entry.phase == journal.WRAPPED else entry.block_sectors or block_sectors, length,
               f"{v.vdev} ({v.params})")
    tables = [f"now:        {top}: {stack.dm.table_text(top).strip()}"]
    if entry.phase == journal.WRAPPED:
        tables += [f"prepare:    {era_name(name)}: 0 {length} era <metadata loop> {entry.origin_devno} {block_sectors}",
                   f"            {top}: 0 {length} linear <{era_name(name)}> 0"]
    else:  # prepared already: its era block stays
        block_sectors = entry.block_sectors or block_sectors
    tables += _cutover_lines(name, length, block_sectors, resync_parts)
    return Disk(v, name, entry.origin, length * 512, entry.phase, v.params, True, tables, estimate=est)


def _sector_size(xs: XenStore, stack: Stack, d: Disk) -> int | None:
    """The logical block size blkfront got: blkback's sector-size in the backend (it passes on
    the top device's), else the top device's own."""
    v = xs.read(f"{d.vbd.backend}/sector-size")
    if v and v.strip().isdigit():
        return int(v)
    try:
        return logical_block_size(stack.runner, f"/dev/mapper/{d.top}")
    except DmmigError:
        return None


def _check_destination(stack: Stack, disks: list[Disk], host: str, ssh_opts: SshOptions, opts: MigrateOptions,
                       connect: Callable[[Destination], Any]) -> tuple[str | None, str]:
    """Returns the mirror leg's tunnel mode (ssh; the probe's or --tunnel's) and why."""
    c = opts.copy
    # unknown host key, bad credentials, no dmmig there: refused here
    remote = connect(destination(host, ssh_opts, c, ""))
    tunnel, why = c.tunnel, "--tunnel" if c.tunnel else ""
    try:
        probe = remote.agent.call("probe", paths=[d.dest_disk for d in disks], script=opts.block_script,
                                  names={d.dest_disk: d.name for d in disks},
                                  sizes={d.dest_disk: d.size for d in disks}, create=c.create)
        if c.transport == "ssh" and tunnel is None:  # OpenSSH can log in and run the agent, or refused here
            tunnel, why = remote.probe_tunnel(stack.runner, stack.journal.dir)
            why = why or "streamlocal forwarding works"
    finally:
        remote.close()
    if not probe["block_script"]:
        raise BadInput(f"{host} has no executable {probe['script_path']}: its `add` could not take the disks",
                       hint="run the README's install command there")
    check_destination(probe, host)
    refused = probe.get("export_dir_refused")  # None, or no such key from an older agent
    if refused:
        raise StateError(f"on {host}: {refused['message']}", hint=refused.get("hint"))
    if os.path.realpath(probe["state_dir"]) != os.path.realpath(probe["hotplug_state_dir"]):
        raise BadInput(f"on {host}, dmmig's state dir would be {probe['state_dir']} but block-dmmig's is "
                       f"{probe['hotplug_state_dir']}: its add would not ask the handover gate",
                       hint="drop --remote-state-dir, or set DMMIG_STATE_DIR for both there")
    for d in disks:
        p = probe["disks"][d.dest_disk]
        d.dest_exists = bool(p["exists"])
        if p.get("refused"):  # the agent there may not touch it (its confinement), or cannot create it
            raise BadInput(f"{host}:{d.dest_disk}: {p['refused']}")
        if not p["exists"] and not c.create:
            raise BadInput(f"{host}:{d.dest_disk} does not exist", hint="create it, or pass --create")
        if p["exists"] and p["size"] < d.size:
            raise BadInput(f"{host}:{d.dest_disk} is smaller than {d.vbd.params}: {p['size']} < {d.size} bytes")
        # in use by anything but this migration's own export (a resumed one's): a local domain,
        # a process, another disk of dmmig's
        if p["exists"] and p.get("in_use"):
            raise BadInput(f"{host}:{d.dest_disk}: {p['in_use']}")
        have = p.get("block_size")
        if have and d.block_size and have != d.block_size:
            raise BadInput(f"{host}:{d.dest_disk} has a logical block size of {have} bytes, {d.vbd.params} "
                           f"{d.block_size}: blkfront keeps the sector size it started with, so {d.vbd.vdev} "
                           "would be unusable after the move",
                           hint="use a destination disk with the same logical block size (a file becomes a "
                                "loop device of 512-byte sectors)")
    return tunnel, why


# ---- 2.-4. the migration -----------------------------------------------------------------
def migrate(stack: Stack, xl: Xl, p: Plan, ssh_opts: SshOptions, opts: MigrateOptions,
            progress: Callable[[Disk, int], Progress], say: Callable[[str], None],
            ops: Ops | None = None) -> dict[str, Any]:
    """Steps 2-4 of P. XL runs xl migrate; OPS are the destination's agent and the per-disk
    steps (the real ones unless a test injects its own). Every failure raises its own kind."""
    ops = ops or Ops()
    t0 = time.monotonic()
    summary: dict[str, Any] = {"domain": p.domain.name, "host": p.host, "disks": {}}
    # 2. the LVs adopted (each journaled; abort gives an LV its own table back), then every disk
    # to a synchronous mirror
    adopted: list[Disk] = []
    pauses: dict[str, float] = {}
    for d in p.disks:
        if d.adopt is None:
            continue
        try:
            _, pause = ops.adopt(stack, d.name, d.vbd.params)
        except BaseException as e:
            _abort_all(stack, adopted, say, ops)
            if not isinstance(e, DmmigError):
                raise
            raise e.with_context(f"adopting {d.vbd.params} failed, so every LV adopted before got its own table "
                                 f"back and {p.domain.name} did not move") from e
        adopted.append(d)
        pauses[d.name] = pause
        say(f"{d.name}: adopted {d.vbd.params} (its table swap paused I/O {pause * 1000:.0f} ms); "
            + HOLD_LVM.format(lv=d.adopt.lv))
    # the tunnel's mode as the plan probed it: one probe for every disk
    opts = dataclasses.replace(opts, copy=dataclasses.replace(opts.copy, tunnel=p.tunnel))
    results = ops.to_mirror(stack, [(d.name, d.dest_disk) for d in p.disks], p.host, ssh_opts, opts,
                            lambda i: progress(p.disks[i], i))
    mirrored = list(zip(p.disks, results))
    failed = {d.name: r for d, r in mirrored if isinstance(r, BaseException)}
    if failed:
        _abort_all(stack, p.disks, say, ops)
        first = next(iter(failed.values()))
        if not isinstance(first, DmmigError):
            raise first  # a bug: the CLI shows it as one
        raise first.with_context(f"{', '.join(failed)}: could not reach a synchronous mirror, so every "
                                 f"disk was aborted and {p.domain.name} did not move") from first
    for d, r in mirrored:
        summary["disks"][d.name] = r
        if d.name in pauses:  # the LV's table swap: its I/O paused at most this long
            r["adopt_swap_seconds"] = round(pauses[d.name], 4)
        say(f"{d.name}: mirroring; copied {r['copy']['read'] / (1 << 20):.1f} MiB, cutover suspended I/O for "
            f"{r['cutover']['suspended_seconds'] * 1000:.0f} ms, resynced {r['cutover']['resync_regions']} regions")
    summary["to_mirror_seconds"] = round(time.monotonic() - t0, 3)

    # 3. xl migrate, answering the gate
    say(f"xl migrate {p.domain.name} {p.host}")
    dests = {d.name: mirroring_entry(stack, d.name).destination() for d in p.disks}
    t_xl = time.monotonic()
    try:
        xl_res, gates = _xl_migrate_with_gate(stack, xl, p, opts, ops)
    except BaseException:  # the gate could not be set up, or xl could not start: the guest is here
        _abort_all(stack, p.disks, say, ops)
        raise
    for name, g in gates.items():
        summary["disks"][name]["handover"] = g
    if xl_res.overran:
        raise _overran(p, xl_res, opts.xl_timeout)
    # wall_seconds adds what the gate costs around xl: its own SSH session and agent, the join
    summary["xl"] = {"returncode": xl_res.returncode, "seconds": xl_res.seconds,
                     "wall_seconds": round(time.monotonic() - t_xl, 3)}

    # 4. finish or abort
    if xl_res.returncode == 0:
        t_fin = time.monotonic()
        unfinished: dict[str, DmmigError] = {}
        for d in p.disks:  # every disk, whatever another's finish says: the guest is there now
            try:
                summary["disks"][d.name]["finish"] = ops.finish(stack, d, dests[d.name])
            except DmmigError as e:
                unfinished[d.name] = e
        if unfinished:
            first = next(iter(unfinished.values()))
            raise first.with_context(f"{p.domain.name} runs on {p.host} now, but finishing "
                                     f"{', '.join(unfinished)} failed") from first
        summary["finish_seconds"] = round(time.monotonic() - t_fin, 3)
        summary["seconds"] = round(time.monotonic() - t0, 3)
        return summary
    here = xl.find(p.domain.name)
    xl_err = xl_res.output.strip()[-3000:]
    refused = {n: g["why"] for n, g in gates.items() if not g["ok"]}
    why = f"xl migrate failed (status {xl_res.returncode}): {xl_err}"
    if refused:
        why += "; the handover gate refused " + "; ".join(f"{n}: {w}" for n, w in refused.items())
    if here is not None and here.domid == p.domain.domid:
        _abort_all(stack, p.disks, say, ops)
        raise RemoteError(why + f"\n{p.domain.name} resumed on this host with every write on its disks; "
                          "dmmig aborted the disks' migration on both hosts",
                          hint="fix the cause, then run `dmmig migrate` again")
    raise StateError(why + f"\n{p.domain.name} (domid {p.domain.domid}) no longer runs here under its name; "
                     "dmmig left every disk as it is (mirroring)",
                     hint=f"find where the guest runs (`xl list` on both hosts). If on {p.host}: "
                          f"`dmmig finish --force --remove NAME` here for each disk; if here: `dmmig abort NAME`")


def mirror_disks(stack: Stack, disks: list[tuple[str, str]], host: str, ssh_opts: SshOptions,
                 opts: MigrateOptions, progress: Callable[[int], Progress]) -> list[Any]:
    """Every (NAME, destination path) to a synchronous mirror, each in its own thread: prepare
    (if not prepared yet), copy, cutover. Returns, for each disk, its summary or the exception
    it raised; the caller decides (migrate aborts them all if any failed)."""
    results: list[Any] = [None] * len(disks)

    def run(i: int) -> None:
        name, dest_disk = disks[i]
        try:
            pg = progress(i)
            entry = stack.journal.load(name)
            if entry is not None and entry.phase == journal.WRAPPED:
                stack.prepare(name, block_bytes=opts.block_bytes)
            copied = copy(stack, name, host, ssh_opts, dataclasses.replace(opts.copy, dest_disk=dest_disk), pg)
            results[i] = {"copy": copied, "cutover": cutover(stack, name, opts.cutover, pg)}
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,), name=f"dmmig-{n}") for i, (n, _) in enumerate(disks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _xl_migrate_with_gate(stack: Stack, xl: Xl, p: Plan, opts: MigrateOptions,
                          ops: Ops) -> tuple[XlRun, dict[str, Any]]:
    """Run xl migrate in a thread; meanwhile wait for the destination's block script to ask
    about each disk, and answer (suspend, vouch or catch up, answer, resume). The disks' locks
    are held until the last answer, so no other dmmig touches them meanwhile."""
    entries = {d.name: mirroring_entry(stack, d.name) for d in p.disks}
    gates: dict[str, Any] = {}
    box: list[XlRun] = []
    xl_failed: list[BaseException] = []
    xl_log = os.path.join(stack.journal.dir, f"xl-migrate-{p.domain.domid}.log")
    xl_args = list(opts.xl_args)
    cfg = None
    if p.xl_config is not None and p.xl_config.text is not None:  # dmmig's -C (see XlConfig): root-only
        cfg = _config_path(stack, p.domain)
        xl_args += ["-C", cfg]

    def run_xl() -> None:
        try:
            if cfg is not None:
                assert p.xl_config is not None and p.xl_config.text is not None
                _write_private(cfg, p.xl_config.text)
            box.append(xl.migrate(p.domain.domid, p.host, xl_args, opts.xl_timeout, xl_log))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread, as it is
            xl_failed.append(e)
        finally:
            if cfg is not None:  # xl read it before its migration child started (save_domain_core_begin)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg)
    th = threading.Thread(target=run_xl, name="xl-migrate", daemon=True)
    with contextlib.ExitStack() as locks:
        for name in entries:
            locks.enter_context(stack.journal.lock(name))
        remote = ops.remote(next(iter(entries.values())).destination())
        try:
            # every disk's gate listens before xl starts; another agent there already waiting for
            # one of them (a second migration of the same disk) is refused here, before xl runs
            remote.agent.call("await_gate", names=list(entries), timeout=0)

            th.start()
            pending = list(entries)
            try:
                while pending and th.is_alive():
                    asked = remote.agent.call("await_gate", names=pending, timeout=1.0)["asked"]
                    if asked is not None:
                        gates[asked] = ops.answer_gate(stack, entries[asked], remote)
                        pending.remove(asked)
            except Exception as e:  # noqa: BLE001 - xl runs on; it decides where the guest runs
                # the gate is lost (the agent or its connection died): a destination that asks
                # now gets no yes in time and refuses
                msg = e.message if isinstance(e, DmmigError) else f"{type(e).__name__}: {e}"
                log.warning("handover gate lost during xl migrate: %s", msg)
                for n in pending:
                    gates[n] = {"ok": False, "why": f"the gate was lost: {msg}", "delivered": False}
        finally:
            remote.close()
        _settle_all(stack, entries, gates)  # every gate answered (or lost): the locks still held
    # the locks are free again: after the last yes, libxl destroys the guest here and the
    # block script's remove finishes each handed-over disk (it takes the disk's lock)
    th.join()
    if xl_failed:  # xl did not start (missing, say): the guest never left; its own kind and traceback
        raise xl_failed[0]
    return box[0], gates


def _settle_all(stack: Stack, entries: dict[str, journal.Entry], gates: dict[str, dict[str, Any]]) -> None:
    """Once every disk's gate is answered (each answered without waiting for a file's ctime):
    settle each yes's generation, its disk's lock still held, so the block script's remove
    (finish_handed_over, warm.kept_file) comes after it."""
    for n, g in gates.items():
        if not g.get("generation"):
            continue
        try:
            settle_generation(stack, entries[n])
        except (DmmigError, OSError) as e:  # the migration goes on; the way back is a full copy
            msg = e.message if isinstance(e, DmmigError) else str(e)
            log.warning("%s: the generation of the handover could not be settled: %s", n, msg)
            warm.drop(stack.journal.dir, n)
        h = entries[n].mirror.handover
        g["generation"] = h.generation if h is not None and warm.load(stack.journal.dir, n) else None


def _overran(p: Plan, run: XlRun, timeout: float) -> StateError:
    names = " ".join(d.name for d in p.disks)
    return StateError(
        f"xl migrate of {p.domain.name} (pid {run.pid}) still runs after {timeout:.0f}s (--xl-timeout). dmmig did "
        "not stop it: a killed xl leaves a suspended guest that nothing resumes. dmmig no longer answers the "
        "handover gate, so a disk whose `add` has not had its yes is refused and xl resumes the guest here. "
        f"xl's output goes to {run.log}",
        hint=f"wait until xl ends (`ps -p {run.pid}`; its last words are in {run.log}), then look where "
             f"{p.domain.name} runs (`xl list` here and on {p.host}). On {p.host}: here, for each of {names}: "
             "`dmmig finish --force --remove NAME` (block-dmmig's remove may have done it: `dmmig status`). "
             f"Here: `dmmig abort NAME` for each of {names}. Then `rm {run.log}`")


def _finish_source(stack: Stack, d: Disk, dest: Destination) -> dict[str, Any]:
    """The guest runs on the destination. The block script's remove, run by libxl as it
    destroyed the guest here, normally finished this host's side already; whatever it left
    (blkback slow to let go, an error) is finished here. Then the destination's agent forgets
    the disk."""
    t = time.monotonic()
    journaled = stack.journal.load(d.name) is not None
    done = finish_handed_over(stack, d.name if journaled else None, node=d.vbd.node, params=d.vbd.params,
                                close_wait_s=CLOSE_WAIT_S)
    if not journaled:
        done.insert(0, "finished here by block-dmmig remove")
    left = stop_remote(d.name, dest, remove_created=False, done=done)
    if left:
        raise RemoteError(f"{d.name}: finished here, but on the destination: {'; '.join(left)}")
    return {"done": done, "seconds": round(time.monotonic() - t, 3)}


def _abort_all(stack: Stack, disks: list[Disk], say: Callable[[str], None], ops: Ops) -> None:
    for d in disks:
        try:
            done, left = ops.abort(stack, d.name)
            say(f"{d.name}: aborted ({len(done)} steps)")
            for x in left:
                say(f"{d.name}: left behind: {x}")
        except DmmigError as e:
            say(f"{d.name}: abort failed: {e.message}; `dmmig status {d.name}`, then `dmmig abort {d.name}`")


@dataclass(frozen=True)
class Ops:
    """What migrate() calls below it: the destination's agent (REMOTE: a dest record -> a
    connection with .agent and .close) and the per-disk steps. The real ones by default; the
    unit tests inject theirs to reach every failure branch."""
    remote: Callable[[Destination], Any] = Remote
    to_mirror: Callable[..., list[Any]] = mirror_disks  # step 2: each disk's summary or exception
    # each disk's generation settled once all are answered (_settle_all)
    answer_gate: Callable[[Stack, journal.Entry, Any], dict[str, Any]] = partial(answer_gate, settle=False)
    finish: Callable[[Stack, Disk, Destination], dict[str, Any]] = _finish_source
    abort: Callable[[Stack, str], tuple[list[str], list[str]]] = abort
    adopt: Callable[[Stack, str, str], tuple[str, float]] = Stack.adopt  # (stack, NAME, LV) -> (top, pause)
