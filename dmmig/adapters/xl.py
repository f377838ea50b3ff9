"""xl adapter: the toolstack commands dmmig migrate needs (name <-> domid, migrate).

`xl migrate` is run, never reimplemented: libxl streams the memory, runs the block scripts on
both hosts and decides whether the guest resumes on the source (Xen tools/xl/xl_migrate.c,
tools/libs/light/libxl_create.c).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from dmmig.adapters.runner import Runner
from dmmig.errors import BadInput

# xl migrate's own flags that take no argument, and those that take one (xl_migrate.c,
# xl.1.pod): anything else after `--` is refused before anything changes
_FLAGS = {"-e", "-p", "-D", "-F", "--debug", "--live"}
_WITH_ARG = {"-s", "-C"}


# dmmig never kills xl migrate (see Xl.migrate): --xl-timeout only says how long dmmig waits.
# Shorter than this it would give up on a guest whose memory is still being sent.
XL_TIMEOUT_RANGE = (60.0, 7 * 86400.0)


def check_xl_timeout(seconds: float) -> float:
    lo, hi = XL_TIMEOUT_RANGE
    if not lo <= seconds <= hi:
        raise BadInput(f"--xl-timeout must be {lo:.0f}..{hi:.0f} seconds, got {seconds:g}",
                       hint="it is how long dmmig waits for xl migrate (which it never kills), not a limit "
                            "on the guest's downtime")
    return seconds


@dataclass(frozen=True)
class XlRun:
    returncode: int | None  # None: xl was still running when dmmig stopped waiting
    output: str       # xl's stderr and stdout
    seconds: float
    pid: int | None = None
    log: str | None = None  # where xl's output goes while it runs on

    @property
    def overran(self) -> bool:
        return self.returncode is None


@dataclass(frozen=True)
class Domain:
    domid: int
    name: str


@dataclass(frozen=True)
class ConfigDisk:
    """A disk of a domain config file, as libxl itself parsed it (`xl -N create`)."""
    vdev: str
    target: str       # pdev_path: the disk spec's target=
    script: str       # "" for none
    writable: bool


class Xl:
    def __init__(self, runner: Runner, xl: str = "xl") -> None:
        self.r = runner
        self.xl = xl

    def find(self, domain: str) -> Domain | None:
        """DOMAIN is a name or a domid; None if no such domain runs here."""
        if re.fullmatch(r"\d+", domain):
            res = self.r.run([self.xl, "domname", domain], check=False, timeout=30)
            name = res.stdout.strip()
            return Domain(int(domain), name) if res.returncode == 0 and name else None
        res = self.r.run([self.xl, "domid", domain], check=False, timeout=30)
        out = res.stdout.strip()
        return Domain(int(out), domain) if res.returncode == 0 and out.isdigit() else None

    def migrate(self, domid: int, host: str, extra: list[str], timeout: float, log: str) -> XlRun:
        """`xl migrate [EXTRA] DOMID HOST`, whatever its exit status, its output in LOG (removed
        once read). Never killed: while the guest is suspended only xl can resume it (on the
        destination, or here when the destination fails), and a killed xl leaves it suspended
        for good. After TIMEOUT seconds dmmig stops waiting and returns an overran XlRun; xl
        runs on in its own session (a ^C to dmmig does not reach it either), writing to LOG."""
        if os.path.exists(log):
            os.unlink(log)
        t = time.monotonic()
        p = self.r.start([self.xl, "migrate", *extra, str(domid), host], logfile=log)
        while (rc := p.poll()) is None:
            if time.monotonic() - t > timeout:
                return XlRun(None, _tail(log), round(time.monotonic() - t, 3), p.pid, log)
            time.sleep(0.2)
        out = _tail(log, 1 << 20)
        os.unlink(log)
        return XlRun(rc, out, round(time.monotonic() - t, 3))

    def parsed_config(self, config: str) -> dict[str, Any]:
        """Domain config file CONFIG as libxl itself parses it: `xl -N create` (dry run) prints
        the domain config as JSON and creates nothing."""
        if not config or config.startswith("-"):  # xl's getopt would take it for an option
            raise BadInput(f"config file {config!r}: give it as a path (./{config}), not starting with '-'")
        res = self.r.run([self.xl, "-N", "create", config], check=False, timeout=60)
        if res.returncode != 0:
            raise BadInput(f"xl cannot parse the config {config}: {(res.stderr or res.stdout).strip()[-500:]}")
        try:
            data = json.loads(res.stdout)
        except ValueError:
            raise BadInput(f"`xl -N create {config}` did not print JSON (output_format in xl.conf?): "
                           f"{res.stdout.strip()[:200]!r}") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):  # {"domid": null, "config": ...}
            data = data["config"]
        if not isinstance(data, dict):
            raise BadInput(f"`xl -N create {config}` printed no domain config")
        return data

    def running_config(self, domid: int) -> dict[str, Any]:
        """The running domain's config as libxl keeps it (`xl list -l DOMID`: what xl migrate
        sends without -C)."""
        res = self.r.run([self.xl, "list", "-l", str(domid)], check=False, timeout=60)
        try:
            data = json.loads(res.stdout) if res.returncode == 0 else None
        except ValueError:
            data = None
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
            data = data[0]
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise BadInput(f"`xl list -l {domid}` gave no JSON config: {(res.stderr or res.stdout).strip()[-300:]!r}",
                           hint="output_format=json in /etc/xen/xl.conf")
        return dict(data["config"])

    def config_disks(self, config: str) -> list[ConfigDisk]:
        """The disks of domain config file CONFIG, parsed by libxl's own parser."""
        return disks_of(self.parsed_config(config))


def disks_of(cfg: dict[str, Any]) -> list[ConfigDisk]:
    return [ConfigDisk(vdev=str(d.get("vdev", "")), target=str(d.get("pdev_path", "")),
                       script=str(d.get("script", "")), writable=bool(d.get("readwrite", 0)))
            for d in cfg.get("disks") or []]


def config_option(extra: list[str]) -> str | None:
    """The -C CONFIG among xl migrate's options (check_migrate_args' output), if any."""
    return next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "-C"), None)


def _tail(path: str, limit: int = 8000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def check_migrate_args(extra: list[str]) -> list[str]:
    """The `-- XL-OPTIONS` of dmmig migrate: only xl migrate's own options, so a typo fails
    here and not halfway through a migration."""
    out: list[str] = []
    it = iter(extra)
    for a in it:
        if a in _FLAGS:
            out.append(a)
        elif a in _WITH_ARG:
            v = next(it, None)
            if v is None:
                raise BadInput(f"xl migrate option {a} needs a value")
            out += [a, v]
        elif a[:2] in _WITH_ARG:  # getopt's joined form: -sCMD
            out += [a[:2], a[2:]]
        else:
            raise BadInput(f"{a!r} is not an xl migrate option dmmig passes on "
                           f"(allowed: {' '.join(sorted(_FLAGS | _WITH_ARG))})")
    return out
