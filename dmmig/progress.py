"""Progress: a bar on a terminal, JSON lines with --json, nothing otherwise."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    def __init__(self, json_lines: bool = False, *, label: str = "", position: int = 0) -> None:
        """LABEL and POSITION: one of several disks moving at once (dmmig migrate): each
        has its own bar line, and its JSON events carry "disk"."""
        self.json = json_lines
        self.label = label
        self.position = position
        self.tty = sys.stderr.isatty() and not json_lines
        self._bar: Any = None
        self._last = 0.0
        self._done = 0
        self._total = 0
        self._what = ""

    def event(self, kind: str, **kw: Any) -> None:
        if self.json:
            disk = {"disk": self.label} if self.label else {}
            print(json.dumps({"event": kind, "time": round(time.time(), 3), **disk, **kw}), flush=True)

    def start(self, what: str, total: int) -> None:
        self._what, self._total, self._done = what, total, 0
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=f"{self.label}: {what}" if self.label else what, unit="B",
                             unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False,
                             position=self.position)
        self.event("start", phase=what, total_bytes=total)

    def advance(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.json and time.monotonic() - self._last > 1:
            self._last = time.monotonic()
            self.event("progress", phase=self._what, done_bytes=self._done, total_bytes=self._total)

    def end(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.event("end", phase=self._what, **kw)


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
