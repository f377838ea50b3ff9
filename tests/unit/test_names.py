"""names.Files: every file of a disk in one scheme; the mirror's logs on memory."""
from __future__ import annotations

import pytest

from dmmig.errors import BadInput
from dmmig.names import RUN_DIR, Files, incoming_names


def test_the_mirror_logs_are_on_memory_whatever_the_state_directory() -> None:
    # they are rewritten after every region the resync recovers: never on the state disk
    assert Files("/var/lib/dmmig", "vg0-vm1").mirror_log == f"{RUN_DIR}/vg0-vm1.mirror-log"
    assert RUN_DIR.startswith("/run/")


def test_one_name_one_set_of_files() -> None:
    f = Files("/s", "vm1")
    assert (f.journal, f.lock, f.incoming, f.gate_socket, f.export_socket) == (
        "/s/vm1.json", "/s/vm1.lock", "/s/vm1.dest.json", "/s/vm1.gate.sock", "/s/nbd/vm1.sock")
    assert incoming_names(["vm1.dest.json", "vm1.json", "x.gate.sock"]) == ["vm1"]


@pytest.mark.parametrize("bad", ["../etc", "a/b", "x.dest", ""])
def test_a_name_is_checked_before_it_becomes_a_path(bad: str) -> None:
    with pytest.raises(BadInput):
        Files("/s", bad)
