"""Issue 14 part 3: a 2 TiB disk is first-class. The whole flow (wrap, prepare, copy with
rounds of small deltas, cutover, verify of the written areas, finish) on a sparse 2 TiB disk
in the two-host rig, with the oracle on every written block on both hosts and every dmmig
process's peak RSS (both hosts, the destination's agents included) at most 200 MiB. The flow
itself is tests/tools/big_flow.py (bench/big_disk.py runs it at 128 MiB and 2 TiB)."""
from __future__ import annotations

import json

import pytest

from tests.tools.big_flow import Flow

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]
TiB = 1 << 40


def test_2tib_disk_whole_flow_bounded_memory_and_time(pair, name: str) -> None:
    a, b = pair
    f = Flow(a, b, name, 2 * TiB, copy_timeout=300)
    f.setup()
    try:
        try:
            f.run()
        except BaseException as e:
            raise AssertionError(f"{type(e).__name__}: {e}\nbounds broken before that: {f.problems}\n"
                                 f"steps so far: {json.dumps(f.steps)}") from e
    finally:
        f.teardown()
    print(json.dumps({"steps": f.steps, "facts": f.facts}, indent=1))
    assert not f.problems, f.problems
    # the era block came from the disk size, and its metadata is what sizing's model says
    assert f.facts["era_block"] == 512 << 10, f.facts
    assert abs(f.facts["metadata_used_blocks"] - f.facts["metadata_model_blocks"]) <= 16, f.facts
    # the base copy read the three written areas, not the 2 TiB of holes, and sent no zeros
    assert f.facts["copy"]["read"] <= 256 << 20 and f.facts["copy"]["zeroed"] == 0, f.facts
    assert f.steps["copy"]["seconds"] < 240, f.steps
    # the destination was created sparse and only the written areas take room there
    assert f.facts["dest_allocated_mib"] <= 64, f.facts
