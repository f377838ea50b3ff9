"""Host side of the command channel to the rig agent (tests/rig/guest_agent.py, the same agent
the user-mode-linux rig uses) over a byte stream: here a QEMU virtio-serial port exposed as a
unix socket. Requests are lines of base64(JSON); replies are lines FRAME + base64(JSON)."""
from __future__ import annotations

import base64
import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.rig.uml import FRAME, Result, RigError


class Job:
    """A command started in the guest; wait() for its Result."""

    def __init__(self, chan: Channel, rid: int, argv: list[str]) -> None:
        self.chan, self.id, self.argv = chan, rid, argv

    def wait(self, timeout: float = 300) -> Result:
        return self.chan.result(self.id, self.argv, timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.chan.request({"op": "signal", "target": self.id, "sig": int(sig)}, timeout=30)

    def done(self) -> bool:
        return self.chan.has_reply(self.id)


class Channel:
    def __init__(self, path: Path, *, alive: Callable[[], bool], describe: Callable[[], str]) -> None:
        """alive(): is the machine still running; describe(): context (console tail) for errors."""
        self.path = path
        self._alive = alive
        self._describe = describe
        self._sock: socket.socket | None = None
        self._cv = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._closed = False

    def connect(self, timeout: float = 30) -> None:
        """Connect at once after QEMU starts: the guest's reads from a virtio-serial port whose
        host side is not connected return EOF, which would end the agent."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or not self._alive():
                    raise RigError(f"cannot connect to agent socket {self.path}\n{self._describe()}") from e
                time.sleep(0.05)
        self._sock = s
        threading.Thread(target=self._reader, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._cv:
            self._cv.notify_all()

    def spawn(self, msg: dict[str, Any], argv: list[str]) -> Job:
        rid = next(self._ids)
        self.send(dict(msg, id=rid))
        return Job(self, rid, argv)

    def send(self, msg: dict[str, Any]) -> None:
        if self._sock is None:
            raise RigError("agent channel not connected")
        with self._send_lock:
            self._sock.sendall(base64.b64encode(json.dumps(msg).encode()) + b"\n")

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        rid = next(self._ids)
        self.send(dict(msg, id=rid))
        return self._wait(rid, [str(msg.get("op"))], timeout)

    def has_reply(self, rid: int) -> bool:
        with self._cv:
            return rid in self._replies

    def wait_ready(self, timeout: float) -> None:
        self._wait(0, ["<agent ready>"], timeout)

    def result(self, rid: int, argv: list[str], timeout: float) -> Result:
        rep = self._wait(rid, argv, timeout)
        return Result(argv, rep["rc"], base64.b64decode(rep["out"]).decode(errors="replace"),
                      base64.b64decode(rep["err"]).decode(errors="replace"))

    def _wait(self, rid: int, argv: list[str], timeout: float) -> dict[str, Any]:
        with self._cv:
            self._cv.wait_for(lambda: rid in self._replies or not self._alive() or self._closed, timeout)
            if rid not in self._replies:
                why = "machine died" if not self._alive() else f"no answer in {timeout}s"
                raise RigError(f"{argv}: {why}\n{self._describe()}")
            return self._replies.pop(rid)

    def _reader(self) -> None:
        assert self._sock is not None
        buf = b""
        while True:
            try:
                chunk = self._sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                i = line.find(FRAME)
                if i < 0:
                    continue
                try:
                    msg = json.loads(base64.b64decode(line[i + len(FRAME):].strip()))
                except ValueError:
                    continue
                if msg.get("ack"):  # the agent's receipt (the UML rig resends on none); a stream needs none
                    continue
                with self._cv:
                    self._replies[msg.get("id", -1)] = msg
                    self._cv.notify_all()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
