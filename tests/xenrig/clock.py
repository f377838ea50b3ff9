"""Clock offset between two dom0s over their network, NTP style (runs in dom0):

    python -m tests.xenrig.clock serve PORT IDLE_S    answer probes with this clock until idle
    python -m tests.xenrig.clock measure HOST PORT N  print {"offset_ns", "rtt_ns"} of the
                                                      probe with the smallest round trip

Why: a guest's CLOCK_REALTIME after migration comes from the destination's Xen wall clock,
which each Xen reads from its emulated RTC at boot (1 s resolution). To see the real
downtime in the guest's own timestamps, the destination dom0's clock is set to the
source's (dom0 setting its clock also sets Xen's wall clock)."""
from __future__ import annotations

import json
import socket
import struct
import sys
import time


def serve(port: int, idle_s: float) -> None:
    """Answer probes until none came for idle_s seconds (60 s for the first)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(60)
    while True:
        try:
            data, peer = s.recvfrom(64)
        except TimeoutError:
            return
        s.sendto(data[:8] + struct.pack("<q", time.clock_gettime_ns(time.CLOCK_REALTIME)), peer)
        s.settimeout(idle_s)


def measure(host: str, port: int, n: int, deadline_s: float = 60) -> dict[str, int]:
    """Probes until n answered (the server may still be starting: lost probes are retried)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    best: tuple[int, int] | None = None
    answered, i = 0, 0
    end = time.monotonic() + deadline_s
    while answered < n and time.monotonic() < end:
        i += 1
        t1 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        try:
            s.sendto(struct.pack("<q", i), (host, port))
            data, _ = s.recvfrom(64)
        except OSError:  # timeout or refused: not listening yet
            continue
        t3 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        if struct.unpack("<q", data[:8])[0] != i:
            continue  # a late answer to an earlier probe
        answered += 1
        t2 = struct.unpack("<q", data[8:16])[0]
        sample = (t3 - t1, t2 - (t1 + t3) // 2)
        if best is None or sample[0] < best[0]:
            best = sample
        time.sleep(0.01)
    if best is None or answered < n:
        raise RuntimeError(f"only {answered} of {n} probes answered")
    return {"rtt_ns": best[0], "offset_ns": best[1]}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(int(argv[1]), float(argv[2]))
    elif len(argv) == 4 and argv[0] == "measure":
        print(json.dumps(measure(argv[1], int(argv[2]), int(argv[3]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
