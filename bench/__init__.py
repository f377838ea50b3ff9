"""Benchmarks (not tests): each prints ratios against anchors measured in the same run."""
from __future__ import annotations

import importlib


def libraries() -> str:
    """The Python libraries the rig's dmmig runs on, and whose they are: a number measured on
    PyPI's paramiko says little about a host with Debian's (docs/benchmarks.md, stop 24)."""
    out = []
    for name in ("paramiko", "cryptography", "pyudev"):
        try:
            m = importlib.import_module(name)
        except ImportError:
            continue
        where = "Debian" if (m.__file__ or "").startswith("/usr/lib/python3/") else "PyPI"
        out.append(f"{name} {getattr(m, '__version__', '?')} ({where})")
    return ", ".join(out)
