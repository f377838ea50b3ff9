"""xl adapter: the toolstack commands dmmig migrate needs (name <-> domid, migrate).

`xl migrate` is run, never reimplemented: libxl streams the memory, runs the block scripts on
both hosts and decides whether the guest resumes on the source (facts, section D).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from dmmig.errors import BadInput, CommandError
from dmmig.runner import Runner

# xl migrate's own flags that take no argument, and those that take one (xl_migrate.c,
# xl.1.pod): anything else after `--` is refused before anything changes
_FLAGS = {"-e", "-p", "-D", "-F", "--debug", "--live"}
_WITH_ARG = {"-s", "-C"}


@dataclass(frozen=True)
class XlRun:
    returncode: int
    output: str       # xl's stderr and stdout
    seconds: float


@dataclass(frozen=True)
class Domain:
    domid: int
    name: str


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

    def migrate(self, domid: int, host: str, extra: list[str], timeout: float) -> XlRun:
        """`xl migrate [EXTRA] DOMID HOST`, whatever its exit status."""
        t = time.monotonic()
        try:
            r = self.r.run([self.xl, "migrate", *extra, str(domid), host], check=False, timeout=timeout)
            rc, out = r.returncode, (r.stderr + r.stdout)
        except CommandError as e:  # timed out and killed: libxl on the source resumes the guest
            rc, out = -1, e.stderr + e.stdout + f"\n(dmmig: xl migrate killed after {timeout:.0f}s)"
        return XlRun(rc, out, round(time.monotonic() - t, 3))


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
