"""`python -m dmmig.adapters.listen ADDR CMD...`: exec CMD as a socket-activated server (systemd's
LISTEN_PID/LISTEN_FDS protocol, fd 3) on a TCP socket listening on ADDR, a free port, with
Nagle's algorithm off; prints the port on stdout first.

Why: qemu-nbd before 8.0 (Debian 12 ships 7.2) leaves Nagle on for its clients' sockets
(QEMU commit "nbd/server: Request TCP_NODELAY", 8.0). When two requests are in flight on one
connection - a guest write next to dm-mirror's log flush (with several mirror targets side by
side), or two writes of a guest with a queue - the second 16-byte reply waits until the client
ACKs the first, and the client, with nothing to send, delays that ACK by 40 ms. On Linux an
accepted socket inherits TCP_NODELAY from its listening socket, so a listener made here gives
every connection qemu-nbd accepts NODELAY. The port is bound here too: no window in which
another process could take a port probed as free.
"""
from __future__ import annotations

import os
import socket
import sys

LISTEN_FD = 3  # systemd's SD_LISTEN_FDS_START


def listener(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((addr, 0))
    s.listen(16)
    return s


NOT_FOUND = 127


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m dmmig.adapters.listen ADDR CMD [ARG...]")
    addr, cmd = argv[0], argv[1:]
    try:
        s = listener(addr)
    except OSError as e:
        sys.exit(f"cannot listen on {addr}: {e.strerror}")
    print(s.getsockname()[1], flush=True)
    if s.fileno() != LISTEN_FD:
        os.dup2(s.fileno(), LISTEN_FD)  # dup2's copy is inheritable
        s.close()
    else:
        os.set_inheritable(LISTEN_FD, True)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
    os.environ.pop("LISTEN_FDNAMES", None)
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:  # the caller tells a missing tool (127, as a shell does) from a failed one
        print(f"command not found: {cmd[0]}", file=sys.stderr)
        sys.exit(NOT_FOUND)


if __name__ == "__main__":
    main(sys.argv[1:])
