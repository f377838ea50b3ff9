"""Several disks of one domain move together: `dmmig migrate` takes them to a synchronous
mirror in parallel threads of one process (migrate_domain.mirror_disks), which share the
runner, the device-mapper adapter and its suspend guard, the state directory, the host's nbd
devices and loop devices, udev, and the destination's agents. Here that very function runs
in rig host a for two and four disks, each under its own writer; the oracle then reads every
disk back on b."""
from __future__ import annotations

import json
import time

import pytest

from tests.kernel.steps import DMMIG, check, digest, start_writer, statuses, stop_writer
from tests.rig.pair import B_IP, SSH_OPTS

pytestmark = [pytest.mark.kernel, pytest.mark.twohost]

MIRROR_DISKS = r"""
import json, sys
from dmmig.flows import migrate_domain
from dmmig.adapters.dm.dmsetup import DmSetup
from dmmig.adapters.dm.guard import SuspendGuard
from dmmig.progress import Progress
from dmmig.adapters.runner import SubprocessRunner
from dmmig.core.journal import Journal, state_dir
from dmmig.core.stack import Stack
from dmmig.adapters.udev import wait_dm_node
from dmmig.adapters.ssh import SshOptions
host, dmmig, known_hosts, identity, pairs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
runner = SubprocessRunner()
journal = Journal(state_dir(None))
stack = Stack(runner, DmSetup(runner, wait_node=wait_dm_node, guard=SuspendGuard(runner, journal.dir)), journal)
opts = migrate_domain.MigrateOptions()
opts.copy.remote_dmmig = dmmig
opts.copy.converge = 1 << 20
opts.copy.max_rounds = 4
disks = [tuple(p.split("=", 1)) for p in pairs]
res = migrate_domain.mirror_disks(stack, disks, host, SshOptions(known_hosts=known_hosts, identity=identity), opts,
                      lambda i: Progress(False))
out = {n: (r if not isinstance(r, BaseException) else {"error": f"{type(r).__name__}: {r}"})
       for (n, _), r in zip(disks, res)}
print(json.dumps(out))
sys.exit(1 if any("error" in v for v in out.values()) else 0)
"""


# four disks share every resource two would (nbd devices, the host-wide lock, the tunnels), and
# more of them at once; the two-disk case cost 60 s of a main suite that must stay under 30 min
@pytest.mark.parametrize("n", [4])
def test_disks_reach_the_mirror_together_under_writers(pair, pdisks, name: str, n: int) -> None:
    a, b = pair
    da, db = pdisks
    names = [f"{name}-{i}" for i in range(n)]
    origins = [da(24, fill_seed=60 + i) for i in range(n)]
    dests = [db(24) for _ in range(n)]
    recs = [f"{a.shared}/{nm}.rec" for nm in names]
    for nm, o in zip(names, origins):
        a.dmmig("wrap", nm, o)
    writers = [start_writer(a, f"/dev/mapper/dmmig-{nm}", rec, seed=60 + i, rate="200", blocks="0:2048")
               for i, (nm, rec) in enumerate(zip(names, recs))]
    t0 = time.monotonic()
    r = a.py(MIRROR_DISKS, f"root@{B_IP}", DMMIG, SSH_OPTS[1], SSH_OPTS[3],
             *(f"{nm}={d}" for nm, d in zip(names, dests)), check=False, timeout=900)
    took = time.monotonic() - t0
    try:
        assert r.rc == 0, (r.out, r.err[-3000:])
        res = json.loads(r.out)
        legs = {res[nm]["cutover"]["nbd"] for nm in names}
        assert len(legs) == n, res   # every disk its own nbd device
        sts = statuses(a)
        for nm in names:
            st = sts[nm]
            m = st["devices"][f"dmmig-{nm}"]["mirror"]
            assert st["journal"]["phase"] == "mirroring" and m["healthy"] and m["in_sync"] == m["regions"], st
    finally:
        for w in writers:
            stop_writer(a, w)
    for i, (nm, o, d, rec) in enumerate(zip(names, origins, dests, recs)):
        check(b, d, 60 + i, rec)
        assert digest(a, o) == digest(b, d), nm
    # the finishes at once (each stops its own export on b): dmmig runs on distinct disks may overlap
    fins = [a.spawn([DMMIG, "finish", nm]) for nm in names]
    for nm, j in zip(names, fins):
        r = j.wait(300)
        assert r.rc == 0, (nm, r.err[-2000:])
    for nm in names:
        a.dmmig("unwrap", nm)
    a.run(["rm", "-f", *recs, *(r + ".started" for r in recs)])
    assert b.run(["pgrep", "qemu-nbd"], check=False).rc != 0
    print(f"[{n} disks to the mirror in {took:.1f}s]")
