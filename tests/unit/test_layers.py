"""The package's layers call only down: basics (dmmig/*.py) < adapters < core < flows < entry.

Every import of a dmmig module anywhere in a file counts, also one inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "dmmig"
RANK = {"basics": 0, "adapters": 1, "core": 2, "flows": 3, "entry": 4}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else "basics"


def imports() -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if node.module in ("dmmig", *(f"dmmig.{k}" for k in RANK))
                         else node.module for a in node.names]
            out += [(mod, n, node.lineno) for n in names if n.startswith("dmmig.") and n != "dmmig.__version__"]
    return out


def test_no_module_imports_a_higher_layer() -> None:
    up = [f"{m}:{line} imports {n} ({layer(m)} -> {layer(n)})" for m, n, line in imports()
          if m != "dmmig.__main__" and RANK[layer(n)] > RANK[layer(m)]]
    assert up == [], "\n".join(up)


def test_every_module_sits_in_a_layer_folder_or_is_a_basic() -> None:
    basics = sorted(p.stem for p in ROOT.glob("*.py"))
    assert basics == ["__init__", "__main__", "errors", "names", "progress", "sizing", "validate"], basics
