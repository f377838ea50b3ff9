"""Runs in dom0 beside the rig's command agent (started by dom0-rc.sh): copies bytes between
the virtio-serial port and the agent's two FIFOs, polling the port instead of waiting for its
interrupt.

Why: under QEMU TCG, with a guest running, dom0 stopped seeing the port's receive interrupt
(seen in dom0: the agent idle in port_fops_read, QEMU's socket drained, the MSI-X vector's
count frozen; requests sent later did not wake it either), so the agent never read the
request and the rig hung. virtio_console's poll() looks at the used ring itself
(port_has_data -> virtqueue_get_buf), so a poll with a timeout finds the data whether or not
the interrupt arrived.

    agent_relay.py PORT TO_AGENT_FIFO FROM_AGENT_FIFO
"""
from __future__ import annotations

import os
import select
import sys

POLL_S = 0.2


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _write_port(port: int, data: bytes) -> None:
    """Non-blocking, polling: a blocking write to a full port waits for the interrupt that
    says the host took the data, the same interrupt that may not come."""
    p = select.poll()
    p.register(port, select.POLLOUT)
    while data:
        try:
            n = os.write(port, data)
        except BlockingIOError:
            p.poll(50)
            continue
        data = data[n:]


def main(port_path: str, to_agent: str, from_agent: str) -> int:
    port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK)
    # open order matches the agent's (it opens TO first for reading, then FROM for writing)
    out = os.open(to_agent, os.O_WRONLY)
    inp = os.open(from_agent, os.O_RDONLY)
    p = select.poll()
    p.register(port, select.POLLIN)
    p.register(inp, select.POLLIN)
    while True:
        for fd, _ev in p.poll(POLL_S * 1000):
            if fd == inp:
                data = os.read(inp, 1 << 16)
                if not data:
                    return 0  # the agent ended
                _write_port(port, data)
        # the port: read whatever is there, event or not (the interrupt may never come)
        while True:
            try:
                data = os.read(port, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break  # host side not connected: nothing to read now
            _write_all(out, data)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
