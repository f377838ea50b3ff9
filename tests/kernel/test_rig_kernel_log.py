"""The rig fails a test after which a rig kernel logged a BUG, a WARNING or an Oops
(tests/conftest.py `_no_leaks`, tests/rig/kernel_log.py): checked on a real rig kernel's log."""
from __future__ import annotations

import pytest

from tests.conftest import kernel_complaints
from tests.rig import kernel_log, leaks
from tests.rig.uml import UmlHost

pytestmark = pytest.mark.kernel

# WARN_ON()'s first two lines in Linux 6.1 (kernel/panic.c __warn). No stock target warns on
# request, so root writes them into this kernel's log, where a real warning would be
WARN = ["------------[ cut here ]------------",
        "WARNING: CPU: 0 PID: 1 at drivers/md/dm-era-target.c:1 era_map+0x0/0x10 [dm_era]"]


def test_a_kernel_warning_during_a_test_fails_it_with_the_log_lines(rig: UmlHost) -> None:
    assert kernel_complaints([rig]) == []  # what the fixture checks after each test: nothing yet
    rig.sh("for l in " + " ".join(f"'<4>{ln}'" for ln in WARN)
           + " '<6>dmmig test: the lines after a warning are its context'; do echo \"$l\" > /dev/kmsg; done")
    got = kernel_complaints([rig])
    assert len(got) == 1 and got[0].splitlines() == [f"--- kernel {rig.name} logged:", *WARN,
                                                     "dmmig test: the lines after a warning are its context"]
    assert "WARNING: CPU: 0" in "\n".join(kernel_log.since(rig, rig.kmsg_seen))
    # seen here: this test's own lines, not a failure of it (the fixture looks after the new mark)
    rig.kmsg_seen = leaks.snapshot(rig).kmsg_last
    assert kernel_complaints([rig]) == []
