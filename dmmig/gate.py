"""The handover gate: a destination never connects a disk the source has not vouched for.

`xl migrate` runs the destination's block script `add` after the last memory page arrived,
while the source guest is suspended (facts, section D). The script asks the gate:

    destination add --(unix socket STATE/gate.sock)--> dmmig agent --(SSH channel)--> source
    dmmig (`dmmig handover`): suspend the top device (no write can follow), check the mirror
    (every region in sync, every leg alive, dm event counter unchanged since sync) or first copy
    what era recorded since the cutover; then answer. The agent stops the export on a yes,
    so the disk is free for blkback, and passes the answer back to the waiting `add`.

No answer in time, no source waiting, or a no: `add` fails, `xl migrate` fails, and the guest
resumes on the source, whose disk has every write.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from dmmig.errors import DmmigError, RemoteError


class GateRefused(DmmigError):
    exit_code = RemoteError.exit_code


def socket_path(state: str) -> str:
    return os.path.join(state, "gate.sock")


def incoming(state: str, name: str) -> bool:
    """A dmmig migration of NAME into this host is under way: the agent's record exists and
    the disk was not handed over yet (after that, this host owns it)."""
    try:
        with open(os.path.join(state, f"{name}.dest.json")) as f:
            return not json.load(f).get("handed_over")
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # unreadable: ask, rather than start on a disk that may be stale


def ask(state: str, name: str, timeout: float) -> dict[str, Any]:
    """The destination's question; returns the source's yes, raises GateRefused otherwise."""
    path = socket_path(state)
    deadline = time.monotonic() + timeout
    while True:  # the source's agent may still be starting: keep trying until the deadline
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            break
        except OSError as e:
            s.close()
            if time.monotonic() >= deadline:
                raise GateRefused(f"no dmmig source is waiting to hand over {name} ({path}: {e.strerror}); "
                                  "refusing a disk that may have missed writes") from None
            time.sleep(0.2)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        s.sendall((json.dumps({"name": name}) + "\n").encode())
        try:
            line = s.makefile("r").readline()
        except (TimeoutError, socket.timeout):
            raise GateRefused(f"the source did not confirm {name} within {timeout:.0f}s; "
                              "refusing a disk that may have missed writes") from None
    finally:
        s.close()
    if not line:
        raise GateRefused(f"the source went away before confirming {name}")
    rep = dict(json.loads(line))
    if not rep.get("ok"):
        raise GateRefused(f"the source refused the handover of {name}: {rep.get('why')}")
    return rep


class GateServer:
    """The agent's side: holds the destinations' questions until the source answers them."""

    def __init__(self, state: str) -> None:
        self.path = socket_path(state)
        self._cv = threading.Condition()
        self._asked: dict[str, socket.socket] = {}
        self._sock: socket.socket | None = None

    def start(self) -> None:
        if self._sock is not None:
            return
        if os.path.exists(self.path):
            os.unlink(self.path)  # left by an agent that died
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # root only: whoever connects decides nothing, but may not even ask
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(8)
        self._sock = s
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                name = str(json.loads(conn.makefile("r").readline())["name"])
                conn.settimeout(None)
            except (OSError, ValueError, KeyError):
                conn.close()
                continue
            with self._cv:
                old = self._asked.pop(name, None)
                if old is not None:
                    old.close()
                self._asked[name] = conn
                self._cv.notify_all()

    def wait(self, names: list[str], timeout: float) -> str | None:
        """The first of NAMES a destination asks about, or None after TIMEOUT seconds."""
        with self._cv:
            self._cv.wait_for(lambda: any(n in self._asked for n in names), timeout)
            return next((n for n in names if n in self._asked), None)

    def answer(self, name: str, ok: bool, why: str) -> bool:
        with self._cv:
            conn = self._asked.pop(name, None)
        if conn is None:
            return False
        try:
            conn.sendall((json.dumps({"ok": ok, "why": why}) + "\n").encode())
        except OSError:
            return False  # the asking `add` already gave up
        finally:
            conn.close()
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if os.path.exists(self.path):
                os.unlink(self.path)
        with self._cv:
            for c in self._asked.values():
                c.close()
            self._asked.clear()
