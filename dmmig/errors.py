"""Typed errors. Each carries what failed, why, and what the operator can do next.

The CLI is the one place that turns them into a message and an exit code.
"""
from __future__ import annotations

import enum
from collections.abc import Callable


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1           # an unexpected failure (a bug, or something we did not foresee)
    USAGE = 2            # argparse's own code for bad arguments
    BAD_INPUT = 3        # refused before anything changed
    MISSING_DEP = 4      # a kernel target or a tool is missing
    COMMAND = 5          # an external command failed
    STATE = 6            # the journal or the kernel are not in the state the verb needs
    BUSY = 7             # another dmmig holds the disk's lock, or a device is open
    REMOTE = 8           # the destination (SSH, agent, NBD) failed or refused
    MISMATCH = 9         # verify: the two disks differ
    IO = 10              # a disk on this host failed a read or a write (I/O error)
    INTERRUPTED = 130


class DmmigError(Exception):
    exit_code = Exit.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadInput(DmmigError):
    exit_code = Exit.BAD_INPUT


class MissingDependency(DmmigError):
    exit_code = Exit.MISSING_DEP


class StateError(DmmigError):
    exit_code = Exit.STATE


class Busy(DmmigError):
    exit_code = Exit.BUSY


class RemoteError(DmmigError):
    exit_code = Exit.REMOTE


class LocalIOError(DmmigError):
    exit_code = Exit.IO


class CommandError(DmmigError):
    """An external command exited non-zero (or timed out); carries its stderr."""

    exit_code = Exit.COMMAND

    def __init__(self, argv: list[str], returncode: int | None, stdout: str, stderr: str,
                 *, timed_out: bool = False, hint: str | None = None) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited with status {returncode}"
        detail = stderr.strip() or stdout.strip()
        msg = f"`{' '.join(argv)}` {what}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg, hint=hint)


class TeardownError(DmmigError):
    """Several cleanup steps failed; all were attempted."""

    exit_code = Exit.STATE

    def __init__(self, what: str, errors: list[BaseException]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{what}: {len(errors)} step(s) failed:\n{lines}",
                         hint="run `dmmig status NAME` to see what is left, then retry")


class Steps:
    """Teardown steps that keep going past failures: every step is attempted, every error
    is kept, and check() reports them all at once."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.errors: list[BaseException] = []

    def __call__(self, desc: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            self.done.append(desc)
        except Exception as e:  # noqa: BLE001 - every error is collected and reported
            self.errors.append(DmmigError(f"{desc}: {e}"))

    def check(self, what: str) -> None:
        if self.errors:
            raise TeardownError(what, self.errors)


class Undo:
    """Collects cleanup callbacks; runs them all in reverse order and reports every failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self, what: str) -> None:
        steps = Steps()
        while self._steps:
            steps(*self._steps.pop())
        steps.check(what)

    def clear(self) -> None:
        self._steps.clear()
