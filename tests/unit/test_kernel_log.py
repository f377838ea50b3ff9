"""The rig's scan of a guest kernel's log (tests/rig/kernel_log.py): a BUG, a WARNING or an
Oops is found with its call trace; what dmmig's tests make a kernel say on purpose (I/O
errors of a failed leg, an NBD timeout) is not."""
from __future__ import annotations

from tests.rig.kernel_log import CONTEXT_LINES, problems

# WARN_ON() in Linux 6.1 (kernel/panic.c __warn), as it reaches /dev/kmsg: one record a line
WARN = [
    "------------[ cut here ]------------",
    "WARNING: CPU: 0 PID: 812 at drivers/md/dm-raid1.c:1273 mirror_end_io+0x1c6/0x1e0 [dm_mirror]",
    "Modules linked in: nbd dm_dust dm_delay dm_flakey dm_mirror dm_region_hash dm_log dm_era loop",
    "CPU: 0 PID: 812 Comm: kworker/0:2 Not tainted 6.1.0-28-amd64 #1  Debian 6.1.119-1",
    "Call Trace:",
    " <TASK>",
    " dm_io_dec_pending+0x8f/0x3a0 [dm_mod]",
    " </TASK>",
    "---[ end trace 0000000000000000 ]---",
]
BUG = ["BUG: kernel NULL pointer dereference, address: 0000000000000008",
       "#PF: supervisor read access in kernel mode", "Oops: 0000 [#1] PREEMPT SMP NOPTI"]
ON_PURPOSE = [
    "I/O error, dev nbd0, sector 2048 op 0x1:(WRITE) flags 0x8800 phys_seg 1 prio class 2",
    "block nbd0: Connection timed out",
    "block nbd0: shutting down sockets",
    "device-mapper: raid1: Write error during recovery (error = 0x1)",
    "device-mapper: raid1: Primary mirror (253:3) failed while out-of-sync: Reads may fail.",
    "Buffer I/O error on dev dm-4, logical block 0, async page read",
    "device-mapper: era: era_ctr: Error opening metadata device",
    "loop0: detected capacity change from 0 to 32768",
    "nbd: registered device at major 43",
]


def test_a_warning_is_found_with_its_call_trace() -> None:
    assert problems(ON_PURPOSE + WARN + ON_PURPOSE) == (WARN + ON_PURPOSE)[:CONTEXT_LINES]


def test_a_bug_and_an_oops_are_found() -> None:
    assert problems(BUG)[0].startswith("BUG: kernel NULL pointer") and len(problems(BUG)) == 3
    assert problems(["kernel BUG at drivers/md/dm-bufio.c:1480!"])
    assert problems(["UBSAN: shift-out-of-bounds in drivers/md/dm-era-target.c:99:20"])


def test_what_tests_make_a_kernel_say_on_purpose_is_no_complaint() -> None:
    assert problems(ON_PURPOSE) == []
    # the words inside a line are no complaint: only a record that starts like one
    assert problems(["device-mapper: ioctl: WARNING: something a target printed"]) == []
