"""The handover gate: a destination never connects a disk the source has not vouched for.

`xl migrate` runs the destination's block script `add` after the last memory page arrived,
while the source guest is suspended (Xen tools/libs/light/libxl_create.c: `domcreate_rebuild_done`
-> `libxl__add_disks`). The script asks the gate:

    destination add --(unix socket STATE/NAME.gate.sock)--> dmmig agent --(SSH channel)-->
    source dmmig (`dmmig handover`): suspend the top device (no write can follow), check the
    mirror (every region in sync, every leg alive, dm event counter unchanged since sync) or
    first copy what era recorded since the cutover; then answer. The agent stops the export
    on a yes, so the disk is free for blkback, and passes the answer back to the waiting `add`.

One socket per disk, each held by the one agent waiting for that disk (flock on
NAME.gate.lock): two migrations into one host each get their own questions; a second agent
for the same disk is refused; a socket a killed agent left is replaced (or removed by abort).

No answer in time, no source waiting, or a no: `add` fails, `xl migrate` fails, and the guest
resumes on the source, whose disk has every write. The source's window is capped
(SUSPEND_CAP_S): past it, the top device resumes and the answer is no.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmmig.errors import Busy, RemoteError
from dmmig.names import Files
from dmmig.validate import disk_name


class GateRefused(RemoteError):
    """The handover gate said no, or its answer could not be had."""


# The source's top device stays suspended at most this long per answer (handover.answer_gate):
# the guest's disk is never frozen without bound. It must end well inside the destination
# `add`'s own wait (hotplug.GATE_TIMEOUT_S, 20 s), so that a no still reaches the `add`.
SUSPEND_CAP_S = 12.0
NO_DELIVERY_S = 5.0  # after the window: how long the source tries to deliver its no


def socket_path(state: str, name: str) -> str:
    """One gate per disk: the destination's `add` for NAME connects here, and only the agent
    waiting for NAME listens here."""
    return Files(state, name).gate_socket


def lock_path(state: str, name: str) -> str:
    # held (flock) by the agent listening on NAME's socket for as long as it listens: a second
    # agent is refused, and a socket without a holder is one a dead agent left
    return Files(state, name).gate_lock


def incoming(state: str, name: str) -> bool:
    """A dmmig migration of NAME into this host is under way: the agent's record exists and
    the disk was not handed over yet (after that, this host owns it). Only the one key that
    decides is read, not the whole record (records.Incoming): whatever version wrote it."""
    try:
        with open(Files(state, name).incoming) as f:
            return not json.load(f).get("handed_over")
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # unreadable: ask, rather than start on a disk that may be stale


def ask(state: str, name: str, timeout: float) -> dict[str, Any]:
    """The destination's question; returns the source's yes, raises GateRefused otherwise."""
    path = socket_path(state, name)
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
                                  "refusing a disk that may have missed writes") from e
            time.sleep(0.2)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        s.sendall((json.dumps({"name": name}) + "\n").encode())
        try:
            line = s.makefile("r").readline()
        except TimeoutError:
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


def holder(state: str, name: str) -> int | None:
    """The pid of the agent listening for NAME, or None. Read from /proc/locks, so asking
    never takes the lock from under an agent that is about to listen."""
    try:
        st = os.stat(lock_path(state, name))
    except FileNotFoundError:
        return None
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for ln in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (device in hex, inode in decimal)
        w = ln.split()
        if len(w) >= 6 and w[1] == "FLOCK" and w[4].isdigit():
            dev = w[5].split(":")
            if len(dev) == 3 and dev[2] == str(st.st_ino) and \
                    (int(dev[0], 16), int(dev[1], 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                return int(w[4])
    return None


def names(state: str) -> list[str]:
    """The disks with a gate socket here (live or stale)."""
    try:
        return sorted(f[:-len(".gate.sock")] for f in os.listdir(state) if f.endswith(".gate.sock"))
    except FileNotFoundError:
        return []


def stale_socket(state: str, name: str) -> bool:
    """NAME's gate socket exists but no agent holds its lock: a killed agent left it."""
    return os.path.exists(socket_path(state, name)) and holder(state, name) is None


def remove_stale(state: str, name: str) -> list[str]:
    """Remove NAME's gate socket if no agent listens on it (under its lock, so never a live
    one). Returns what was done."""
    path = socket_path(state, name)
    if not os.path.exists(path):
        return []
    fd = os.open(lock_path(state, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # a live agent listens: its own
        try:
            os.unlink(path)
        except FileNotFoundError:
            return []
        return [f"removed the stale gate socket {path}"]
    finally:
        os.close(fd)


@dataclass
class _Listener:
    name: str
    sock: socket.socket
    lock_fd: int


class GateServer:
    """The agent's side: one socket per disk it waits for; holds the destinations' questions
    until the source answers them."""

    def __init__(self, state: str) -> None:
        self.state = state
        self._cv = threading.Condition()
        self._asked: dict[str, socket.socket] = {}
        self._listeners: dict[str, _Listener] = {}

    def listen(self, names: list[str]) -> None:
        """Listen for each of NAMES not listened for yet. Another live agent waiting for one of
        them is refused (Busy), never replaced, and this call then listens for none of them; a
        socket left by a dead agent is replaced."""
        started: list[str] = []
        try:
            for name in names:
                if self._listen(name):
                    started.append(name)
        except BaseException:
            for name in started:
                self._stop(name)
            raise

    def _listen(self, name: str) -> bool:
        """Listen for NAME; False if this server already does."""
        disk_name(name)
        with self._cv:
            if name in self._listeners:
                return False
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        fd = os.open(lock_path(self.state, name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder(self.state, name)
            raise Busy(f"another dmmig agent (pid {pid if pid else 'unknown'}) on this host already waits "
                       f"for the handover of {name}", hint=f"two migrations of {name} into one host? If that "
                       f"agent's source is gone, stop it here (kill {pid if pid else 'PID'})") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path = socket_path(self.state, name)
            if os.path.lexists(path):
                os.unlink(path)  # left by an agent that died: nobody holds its lock
            old = os.umask(0o077)  # root only: whoever connects decides nothing, but may not even ask
            try:
                s.bind(path)
            finally:
                os.umask(old)
            s.listen(4)
        except BaseException:
            s.close()
            os.close(fd)
            raise
        with self._cv:
            self._listeners[name] = _Listener(name, s, fd)
        threading.Thread(target=self._accept, args=(name, s), daemon=True).start()
        return True

    def listening(self) -> list[str]:
        with self._cv:
            return sorted(self._listeners)

    def _accept(self, name: str, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                asked = str(json.loads(conn.makefile("r").readline())["name"])
                conn.settimeout(None)
            except (OSError, ValueError, KeyError, TypeError):
                conn.close()
                continue
            if asked != name:  # a question on another disk's socket: not ours to route
                try:
                    conn.sendall((json.dumps({"ok": False, "why": f"this gate is {name}'s, not {asked}'s"})
                                  + "\n").encode())
                except OSError:
                    pass
                conn.close()
                continue
            with self._cv:
                old = self._asked.pop(name, None)
                if old is not None:
                    old.close()
                self._asked[name] = conn
                self._cv.notify_all()

    def wait(self, names: list[str], timeout: float, gone: Callable[[], bool] | None = None) -> str | None:
        """The first of NAMES a destination asks about, or None after TIMEOUT seconds (or once
        GONE says the source that waits is gone)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                hit = next((n for n in names if n in self._asked), None)
                left = deadline - time.monotonic()
                if hit is not None or left <= 0 or (gone is not None and gone()):
                    return hit
                self._cv.wait(min(left, 0.5))

    def answer(self, name: str, ok: bool, why: str) -> bool:
        """Deliver the answer to NAME's waiting `add`; the gate of NAME closes (one answer per
        handover). False if nobody was waiting any more."""
        with self._cv:
            conn = self._asked.pop(name, None)
        try:
            if conn is None:
                return False
            try:
                conn.sendall((json.dumps({"ok": ok, "why": why}) + "\n").encode())
            except OSError:
                return False  # the asking `add` already gave up
            finally:
                conn.close()
            return True
        finally:
            self._stop(name)

    def _stop(self, name: str) -> None:
        with self._cv:
            lst = self._listeners.pop(name, None)
        if lst is None:
            return
        lst.sock.close()
        try:  # before the lock goes: a new agent's socket is never ours to remove
            os.unlink(socket_path(self.state, name))
        except FileNotFoundError:
            pass
        os.close(lst.lock_fd)

    def close(self) -> None:
        for name in self.listening():
            self._stop(name)
        with self._cv:
            for c in self._asked.values():
                c.close()
            self._asked.clear()
