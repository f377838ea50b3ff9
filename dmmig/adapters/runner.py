"""The one way dmmig runs a command: argv lists only, a timeout, logged, typed errors."""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from dmmig.errors import CommandError, MissingDependency

log = logging.getLogger("dmmig.cmd")

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


class Process(Protocol):
    """A started child: poll() is its exit status once it ended, else None."""
    pid: int

    def poll(self) -> int | None: ...


class Runner(Protocol):
    def run(self, argv: list[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None, env: Mapping[str, str] | None = None) -> Result: ...

    def spawn(self, argv: list[str], *, logfile: str) -> int: ...

    def start(self, argv: list[str], *, logfile: str) -> Process: ...

    def spawn_piped(self, argv: list[str], *, logfile: str) -> tuple[int, int]: ...


class SubprocessRunner:
    """Runs commands for real. Never through a shell."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.default_timeout = default_timeout

    def run(self, argv: list[str], *, check: bool = True, timeout: float | None = None,
            input: str | None = None, env: Mapping[str, str] | None = None) -> Result:
        """ENV: variables set for this command on top of dmmig's own environment."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")
        t = self.default_timeout if timeout is None else timeout
        log.debug("run: %s%s", argv, f" with {', '.join(sorted(env))} set" if env else "")  # names only
        full = dict(os.environ)
        full.setdefault("LC_ALL", "C")  # we parse output; keep it stable
        full.update(env or {})
        try:
            p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=t,
                               env=full, stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise MissingDependency(f"command not found: {argv[0]}",
                                    hint="install it (see README: the install command)") from e
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            log.debug("timeout after %ss: %s", t, argv)
            raise CommandError(argv, None, out, err, timed_out=True) from e
        log.debug("rc=%d stdout=%r stderr=%r", p.returncode, p.stdout[-2000:], p.stderr[-2000:])
        res = Result(argv, p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise CommandError(argv, p.returncode, p.stdout, p.stderr)
        return res

    def spawn(self, argv: list[str], *, logfile: str) -> int:
        """Start a daemon that outlives dmmig (SSH tunnel, leg watcher): its own session, so a
        terminal's ^C does not reach it; stdout and stderr appended to LOGFILE. Returns its pid."""
        return self._spawn(argv, logfile, subprocess.DEVNULL).pid

    def start(self, argv: list[str], *, logfile: str) -> Process:
        """As spawn, but the caller keeps the child to learn its exit status (poll): a pid
        alone is no proof, subprocess reaps a child whose Popen object was dropped."""
        return self._spawn(argv, logfile, subprocess.DEVNULL)

    def spawn_piped(self, argv: list[str], *, logfile: str) -> tuple[int, int]:
        """Like spawn, with its stdin a pipe from us: (pid, the pipe's write end). The pipe
        ends when we exit, however we exit, which the daemon can wait for."""
        r, w = os.pipe()  # not inherited by the other children we start (close-on-exec)
        try:
            pid = self._spawn(argv, logfile, r).pid
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return pid, w

    def _spawn(self, argv: list[str], logfile: str, stdin: int) -> subprocess.Popen[bytes]:
        log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            env = dict(os.environ)
            env.setdefault("LC_ALL", "C")
            log.debug("spawn: %s", argv)
            return subprocess.Popen(argv, stdin=stdin, stdout=log_fd, stderr=log_fd, start_new_session=True, env=env)
        except FileNotFoundError as e:
            raise MissingDependency(f"command not found: {argv[0]}",
                                    hint="install it (see README: the install command)") from e
        finally:
            os.close(log_fd)
