"""The fault matrix's kernel rows that no other file covers: dmmig SIGKILLed at each phase
boundary, a source that fails reads during the copy, two dmmig on one disk. For each: every
write the guest's writer saw acknowledged is on the disk that owns the guest (the source; the
destination is checked where the migration went on to completion), `status` explains what is
left, `abort` cleans it up, and the leak fixture finds nothing on either host."""
from __future__ import annotations

import json
import time

import pytest

from tests.kernel.steps import DMMIG, check, cleanup, copy_args, digest, retarget, start_writer, stop_writer
from tests.rig.uml import UmlHost

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]

# SIGKILL ARGV's process as soon as the journal of NAME shows PHASE (polled every 5 ms)
KILL_AT_PHASE = r"""
import json, os, signal, subprocess, sys, time
state, name, phase, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
path = os.path.join(state, name + ".json")
while p.poll() is None:
    try:
        seen = json.load(open(path)).get("phase")
    except (OSError, ValueError):
        seen = None
    if seen == phase:
        p.send_signal(signal.SIGKILL)
        p.wait()
        print("killed at " + phase)
        break
    time.sleep(0.005)
print("rc", p.wait(), p.stderr.read().decode()[-2000:])
"""


def status(h: UmlHost, name: str) -> dict:
    return json.loads(h.dmmig("status", name, "--json").out)


def run_killed_at(a: UmlHost, name: str, phase: str, *argv: str) -> None:
    r = a.py(KILL_AT_PHASE, "/run/dmmig", name, phase, DMMIG, *argv)
    assert f"killed at {phase}" in r.out, r.out


# (phase to kill in, the steps before it, the verb that goes through it)
PHASES = {
    "preparing": ([], ["prepare", "{name}"]),
    "copying": ([["prepare", "{name}"]], copy_args("{name}", "{dest}", "--bwlimit", "4M")),
    "cutting-over": ([["prepare", "{name}"], copy_args("{name}", "{dest}")], ["cutover", "{name}"]),
    "finishing": ([["prepare", "{name}"], copy_args("{name}", "{dest}"), ["cutover", "{name}"]], ["finish", "{name}"]),
    "aborting": ([["prepare", "{name}"], copy_args("{name}", "{dest}"), ["cutover", "{name}"]], ["abort", "{name}"]),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_at_each_phase_boundary_then_status_and_abort(pair, pdisks, name: str, phase: str) -> None:
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=71), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    w = start_writer(a, top, rec, seed=71, rate="300", blocks="0:4096")
    before, verb = PHASES[phase]

    def fmt(argv: list[str]) -> list[str]:
        return [x.format(name=name, dest=dest) for x in argv]
    for step in before:
        a.dmmig(*fmt(step))
    run_killed_at(a, name, phase, *fmt(verb))
    st = status(a, name)
    assert st["journal"]["phase"] == phase, st["journal"]
    # the interrupted step is named, with what to do
    assert any(f"`{phase}` step did not complete" in p and "dmmig abort" in p for p in st["problems"]), st["problems"]
    a.dmmig("abort", name)
    slow = stop_writer(a, w)
    st = status(a, name)
    assert st["journal"]["phase"] == "wrapped" and list(st["devices"]) == [f"dmmig-{name}"], st
    assert st["problems"] == [], st["problems"]
    check(a, origin, 71, rec)        # the source owns the guest: every acknowledged write is there
    assert slow["max_latency_ms"] < 15000, slow   # never frozen for long, even killed mid-window
    cleanup(a, b, name, rec)


def test_a_source_that_fails_reads_during_the_copy(pair, pdisks, name: str) -> None:
    """The origin starts failing I/O (dm-flakey under it: kernel 6.1's flakey fails reads and
    writes alike) while the base copy runs: the copy stops with a plain error naming the source
    and the offset, the guest's own writes fail too (none is acknowledged and lost), status
    explains, and once the source works again a rerun completes the migration."""
    a, b = pair
    da, db = pdisks
    loop, dest = da(32, fill_seed=72), db(32)
    fl = f"fl-{name}"
    a.run(["dmsetup", "create", fl, "--table", f"0 {32 * 2048} linear {loop} 0"])
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    try:
        a.dmmig("wrap", name, f"/dev/mapper/{fl}")
        a.dmmig("prepare", name)
        w = start_writer(a, top, rec, seed=72, rate="300", blocks="0:2048")
        job = a.spawn([DMMIG, *copy_args(name, dest, "--bwlimit", "4M")])
        for _ in range(200):
            if status(a, name)["journal"]["copy"].get("base_offset", 0) > 0:
                break
            time.sleep(0.1)
        retarget(a, fl, "flakey {under} 0 0 30")  # every I/O to the origin fails with EIO
        r = job.wait(180)
        w.signal(15)
        wr = w.wait(120)   # the writer stops at its first failed write; its record holds the acknowledged
        retarget(a, fl, "linear {under} 0")
        assert r.rc == 10, (r.rc, r.err)
        assert "internal error" not in r.err and "reading the source" in r.err, r.err
        assert wr.rc in (0, 1), wr
        st = status(a, name)
        assert st["journal"]["phase"] == "copying", st["journal"]
        assert any("`dmmig copy " in p and "resumes it" in p for p in st["problems"]), st["problems"]
        check(a, loop, 72, rec)
        a.dmmig(*copy_args(name, dest))          # the source works again: the copy resumes
        w = start_writer(a, top, rec, seed=72, rate="300", blocks="0:2048", resume="")
        a.dmmig("cutover", name)
        stop_writer(a, w)
        check(a, loop, 72, rec)
        check(b, dest, 72, rec)
        assert digest(a, loop) == digest(b, dest)
        a.dmmig("finish", name)
        cleanup(a, b, name, rec)
    finally:
        a.run(["dmsetup", "remove", fl], check=False)


def test_two_dmmig_on_one_disk(pair, pdisks, name: str) -> None:
    """While one dmmig copies a disk, a second one on the same disk is refused (exit 7,
    naming the disk) whatever it tries, and changes nothing; the first completes."""
    a, b = pair
    da, db = pdisks
    origin, dest = da(32, fill_seed=73), db(32)
    top = f"/dev/mapper/dmmig-{name}"
    rec = f"{a.shared}/{name}.rec"
    a.dmmig("wrap", name, origin)
    a.dmmig("prepare", name)
    w = start_writer(a, top, rec, seed=73, rate="300", blocks="0:2048")
    job = a.spawn([DMMIG, *copy_args(name, dest, "--bwlimit", "2M")])
    for _ in range(200):
        if status(a, name)["journal"]["phase"] == "copying":
            break
        time.sleep(0.1)
    tables = a.run(["dmsetup", "table"]).out
    for verb in (copy_args(name, dest), ["cutover", name], ["abort", name], ["finish", name], ["unwrap", name]):
        r = a.dmmig(*verb, check=False)
        assert r.rc in (6, 7), (verb, r.rc, r.err)
        assert r.rc == 6 or "another dmmig is working on" in r.err, (verb, r.err)
    assert a.run(["dmsetup", "table"]).out == tables
    assert not job.done()
    assert job.wait(300).rc == 0
    a.dmmig("cutover", name)
    stop_writer(a, w)
    check(b, dest, 73, rec)
    a.dmmig("finish", name)
    cleanup(a, b, name, rec)
