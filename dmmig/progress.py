"""Progress: one model per disk, shown as a bar on a terminal and as JSON lines otherwise."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Phase:
    """The one progress model: what a disk is doing and how far it is. A bar and JSON lines are
    two views of it."""
    name: str = ""
    total: int = 0
    done: int = 0
    unit: str = "bytes"
    started: float = field(default_factory=lambda: time.monotonic())

    def rate(self, now: float) -> float | None:
        """Units per second since the phase started (None in its first half second: too noisy)."""
        secs = now - self.started
        return self.done / secs if secs >= 0.5 and self.done else None

    def eta(self, now: float) -> float | None:
        r = self.rate(now)
        return max(0.0, (self.total - self.done) / r) if r else None

    def as_dict(self, now: float) -> dict[str, Any]:
        rate, eta = self.rate(now), self.eta(now)
        u = self.unit
        return {"phase": self.name, f"done_{u}": self.done, f"total_{u}": self.total,
                f"rate_{u}_per_s": None if rate is None else int(rate),
                "eta_s": None if eta is None else round(eta, 1)}


class Progress:
    """A disk's progress: a bar on a terminal; otherwise JSON lines, on stdout with --json (with
    every event, for programs), else on stderr at most every LOG_INTERVAL seconds (for logs:
    a migration run from cron, systemd or the hotplug script still says how far it got)."""

    INTERVAL = 1.0       # --json: seconds between two progress events of a phase
    LOG_INTERVAL = 10.0  # stderr that is not a terminal

    def __init__(self, json_lines: bool = False, *, label: str = "", position: int = 0,
                 tty: bool | None = None, stream: TextIO | None = None) -> None:
        """LABEL and POSITION: one of several disks moving at once (dmmig migrate): each
        has its own bar line, and its JSON events carry "disk"."""
        self.json = json_lines
        self.label = label
        self.position = position
        self.tty = (sys.stderr.isatty() if tty is None else tty) and not json_lines
        self.stream = stream
        self.phase = Phase()
        self._bar: Any = None
        self._last = 0.0

    def _out(self) -> TextIO:
        return self.stream or (sys.stdout if self.json else sys.stderr)

    def event(self, kind: str, **kw: Any) -> None:
        """A JSON line (not on a terminal: the bar shows it)."""
        if self.tty:
            return
        if not self.json and kind not in ("start", "progress", "end"):
            return  # a log gets progress only; the programs' events go with --json
        disk = {"disk": self.label} if self.label else {}
        print(json.dumps({"event": kind, "time": round(time.time(), 3), **disk, **kw}), file=self._out(),
              flush=True)

    def start(self, what: str, total: int, *, unit: str = "bytes") -> None:
        self.phase = Phase(what, total, unit=unit)
        self._last = time.monotonic()
        if self.tty:
            from tqdm import tqdm
            b = unit == "bytes"
            self._bar = tqdm(total=total, desc=f"{self.label}: {what}" if self.label else what,
                             unit="B" if b else f" {unit}", unit_scale=b, unit_divisor=1024, file=sys.stderr,
                             leave=False, position=self.position, dynamic_ncols=True)
        self.event("start", **self.phase.as_dict(time.monotonic()))

    def advance(self, n: int) -> None:
        self.phase.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= (self.INTERVAL if self.json else self.LOG_INTERVAL):
            self._last = now
            self.event("progress", **self.phase.as_dict(now))

    def end(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        now = time.monotonic()
        self.event("end", **{**self.phase.as_dict(now), "seconds": round(now - self.phase.started, 3), **kw})


class Stopwatch:
    """Wall time by phase, for --json summaries: `with sw("leg"): ...`; a phase entered
    twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - t0

    def add(self, phase: str, secs: float) -> None:
        """SECS of PHASE measured otherwise (by a copier, or before the watch existed)."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + secs

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def since_exec() -> float | None:
    """Seconds since this process was exec'd (the kernel's start time of it, 10 ms ticks):
    what Python's start and the imports cost before any of dmmig's code ran."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))
