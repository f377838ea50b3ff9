"""Host side of the rig: boot a user-mode-linux kernel (a real Linux 6.1 with dm-era,
dm-mirror, nbd, loop, udev) over this machine's own root filesystem, and run commands in it.

    with UmlHost("a") as a:
        a.run(["dmsetup", "targets"]).out
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RIG = Path(__file__).resolve().parent
FRAME = b"\x1eRIG "
CACHE = Path(os.environ.get("DMMIG_RIG_CACHE", "/var/cache/dmmig-rig"))


class RigError(RuntimeError):
    pass


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        if self.rc != 0:
            raise RigError(f"{self.argv} exited {self.rc}\nstdout: {self.out[-3000:]}\nstderr: {self.err[-3000:]}")
        return self


def shim() -> Path:
    """linux.uml 6.1 passes PTRACE_SETREGSET(NT_X86_XSTATE) its own xstate size, which the host
    refuses (EFAULT) when its XSAVE area is larger (AVX-512, AMX): every guest process dies.
    This LD_PRELOAD shim reads the host's full state and overlays what UML knows."""
    src = RIG / "xstate_shim.c"
    out = CACHE / f"xstate_shim-{int(src.stat().st_mtime)}.so"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl"], check=True)
        tmp.rename(out)
    return out


def venv_python() -> str:
    # the rig runs the project's own venv: hostfs makes this machine's files the guest's
    return str(ROOT / ".venv" / "bin" / "python")


class Job:
    def __init__(self, host: UmlHost, rid: int, argv: list[str]) -> None:
        self.host, self.id, self.argv = host, rid, argv

    def wait(self, timeout: float = 300) -> Result:
        return self.host._wait(self.id, self.argv, timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.host._request({"op": "signal", "target": self.id, "sig": int(sig)}, timeout=10)

    def done(self) -> bool:
        with self.host._cv:
            return self.id in self.host._replies


class UmlHost:
    _ids = itertools.count(1)

    def __init__(self, name: str, *, mem: str = "1G", ifname: str | None = None, ip: str | None = None,
                 netns: str | None = None, udev_rules: str | None = None,
                 log_dir: str | None = None) -> None:
        self.name = name
        self.mem = mem
        self.ifname, self.ip, self.netns = ifname, ip, netns
        self.udev_rules = udev_rules
        self.umid = f"dmmig-{name}-{os.getpid()}-{next(self._ids)}"
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"{self.umid}.console"
        self._proc: subprocess.Popen[bytes] | None = None
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        # requests the guest has not acknowledged yet, and when they were last sent
        self._unacked: dict[int, tuple[dict, float]] = {}
        self._next = itertools.count(1)
        self.boot_seconds = 0.0
        # the last kernel log record the leak fixture has seen (tests/rig/kernel_log.py)
        self.kmsg_seen = -1
        # a directory on this machine's file system that the guest sees too (hostfs): large
        # inputs and files shared between hosts go here, not through the console
        self.shared = Path(f"/var/tmp/{self.umid}")

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 90) -> UmlHost:
        if not shutil.which("linux.uml"):
            raise RigError("linux.uml not found: install Debian's user-mode-linux package "
                           "(the README's install command)")
        if not os.path.exists(venv_python()):
            raise RigError(f"{venv_python()} missing: run the README's install command")
        argv = ["linux.uml", f"mem={self.mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={RIG / 'guest-init.sh'}", "con=null", "con0=fd:0,fd:1", f"umid={self.umid}",
                "quiet", "loglevel=1", f"RIG_NAME={self.name}", f"RIG_PY={venv_python()}", f"RIG_ROOT={ROOT}"]
        if self.ifname:
            argv.insert(1, f"vec0:transport=raw,ifname={self.ifname}")
        if self.ip:
            argv.append(f"RIG_IP={self.ip}")
        if self.udev_rules:
            argv.append(f"RIG_UDEV_RULES={self.udev_rules}")
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        env = dict(os.environ, LD_PRELOAD=str(shim()), TMPDIR="/dev/shm")
        self.shared.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=env, start_new_session=True)
        threading.Thread(target=self._reader, daemon=True).start()
        try:
            self._wait(0, ["<boot>"], timeout)
        except RigError as e:
            self.kill()
            raise RigError(f"rig kernel {self.name} did not boot: {e}\n"
                           f"--- console ---\n{self.console()[-4000:]}") from e
        self.boot_seconds = time.monotonic() - t0
        return self

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._request({"op": "poweroff"}, timeout=10)
            except RigError:
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup_umid()
        self._proc = None

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._cleanup_umid()

    def _cleanup_umid(self) -> None:
        shutil.rmtree(Path.home() / ".uml" / self.umid, ignore_errors=True)
        shutil.rmtree(self.shared, ignore_errors=True)

    def __enter__(self) -> UmlHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- commands -------------------------------------------------------------------------
    def run(self, argv: list[str], *, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None,
            input: bytes | None = None, cwd: str | None = None) -> Result:
        res = self.spawn(argv, env=env, input=input, cwd=cwd, timeout=timeout).wait(timeout + 30)
        return res.check() if check else res

    def sh(self, script: str, **kw: object) -> Result:
        """Only for test scaffolding (never for dmmig's own commands)."""
        return self.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]

    def py(self, code: str, *args: str, **kw: object) -> Result:
        return self.run([venv_python(), "-c", code, *args], **kw)  # type: ignore[arg-type]

    def dmmig(self, *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
        return self.run([str(ROOT / ".venv" / "bin" / "dmmig"), *args], check=check, timeout=timeout, env=env)

    def spawn(self, argv: list[str], *, env: dict[str, str] | None = None, input: bytes | None = None,
              cwd: str | None = None, timeout: float | None = None) -> Job:
        rid = next(self._next)
        msg = {"op": "run", "id": rid, "argv": argv, "env": env or {}, "cwd": cwd, "timeout": timeout}
        if input is not None:  # the console drops bytes of very long lines: pass input as a file
            f = self.shared / f"stdin-{rid}"
            f.write_bytes(input)
            msg["stdin_file"] = str(f)
        with self._cv:
            self._unacked[rid] = (msg, time.monotonic())
        self._send(msg)
        return Job(self, rid, argv)

    def _request(self, msg: dict, timeout: float) -> dict:
        rid = next(self._next)
        self._send(dict(msg, id=rid))
        with self._cv:
            if not self._cv.wait_for(lambda: rid in self._replies or not self.alive(), timeout):
                raise RigError(f"no reply to {msg['op']}")
            return self._replies.pop(rid, {})

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _send(self, msg: dict) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with self._send_lock:  # one whole line at a time, from any thread
            self._proc.stdin.write(base64.b64encode(json.dumps(msg).encode()) + b"\n")
            self._proc.stdin.flush()

    ACK_TIMEOUT = 15.0

    def _wait(self, rid: int, argv: list[str], timeout: float) -> Result:
        deadline = time.monotonic() + timeout
        with self._cv:
            while rid not in self._replies and self.alive() and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                # a request the guest never acknowledged was lost on the way in: send it again
                # (the guest runs each id once) and say so in the console log
                pending = self._unacked.get(rid)
                if pending and rid not in self._replies and time.monotonic() - pending[1] > self.ACK_TIMEOUT:
                    self._log.write(f"[rig: no ack for request {rid} {argv[:3]} in {self.ACK_TIMEOUT:.0f}s, "
                                    f"resending]\n".encode())
                    self._log.flush()
                    self._unacked[rid] = (pending[0], time.monotonic())
                    self._send(pending[0])
            if rid not in self._replies:
                why = "rig kernel died" if not self.alive() else (
                    f"no answer in {timeout}s "
                    f"(the guest {'never acknowledged it' if rid in self._unacked else 'received it'})")
                raise RigError(f"{argv}: {why}\n--- console tail ---\n{self.console()[-3000:]}")
            rep = self._replies.pop(rid)
        if rid == 0:
            return Result(argv, 0, "", "")
        return Result(argv, rep["rc"], base64.b64decode(rep["out"]).decode(errors="replace"),
                      base64.b64decode(rep["err"]).decode(errors="replace"))

    def _reader(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            i = raw.find(FRAME)
            if i < 0:
                self._log.write(raw)
                self._log.flush()
                continue
            try:
                msg = json.loads(base64.b64decode(raw[i + len(FRAME):].strip()))
            except ValueError:
                self._log.write(b"[rig: garbled frame] " + raw)
                continue
            rid = msg.get("id", -1)
            if rid == -1:  # a request line the guest could not decode
                self._log.write(b"[rig: guest reports " + str(msg.get("error")).encode() + b"]\n")
                self._log.flush()
            with self._cv:
                self._unacked.pop(rid, None)  # an ack or a reply: either way the guest has it
                if not msg.get("ack"):
                    self._replies[rid] = msg
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()
