"""The unit tests' shared fixtures (their fakes are in fakes.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.fakes import World, tools_on_path


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    # what block-dmmig would use on the destination: the agent's own state dir
    monkeypatch.setenv("DMMIG_STATE_DIR", str(tmp_path / "dstate"))
    tools_on_path(tmp_path, monkeypatch)
    # where the mirror's logs would go: the plan checks it as private_dir would
    from dmmig import names
    monkeypatch.setattr(names, "RUN_DIR", str(tmp_path / "run-dmmig"))
    return World(tmp_path)
