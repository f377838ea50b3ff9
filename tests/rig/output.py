"""dmmig's --json output as the kernel tests and the benchmarks read it (harness code, like
the rest of tests/rig: the benchmarks may import it, never a test module)."""
from __future__ import annotations

import json
from typing import Any


def summary(out: str) -> dict[str, Any]:
    """The last {"event": "summary", ...} line of a dmmig --json run's stdout."""
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return dict([x for x in lines if x.get("event") == "summary"][-1])
