"""Typed errors. Each carries what failed, why, and what the operator can do next.

The CLI is the one place that turns them into a message and an exit code. Every expected
failure has its kind (a class here, or a subclass of one elsewhere) and each kind one exit
code; 1 is left for bugs. The agent relays a kind unchanged (DmmigError.to_reply/from_reply),
so a failure on the destination exits with the code it would have here.

    code  kind (class)          meaning
    0     -                     success
    1     DmmigError, any other a bug, or a failure dmmig did not foresee (--debug shows the traceback)
    2     -                     bad command line (argparse)
    3     BadInput              refused before anything changed: a bad argument, name, path or disk
    4     MissingDependency     a tool, kernel module or dm target is missing (on either host)
    5     CommandError          an external command (dmsetup, qemu-nbd, xl, ...) or xenstored failed,
                                or printed what dmmig cannot parse
    6     StateError            the journal or the kernel are not in the state the verb needs;
                                teardown left something behind (TeardownError)
    7     Busy                  another dmmig holds the disk, or a device is open / all are in use
    8     RemoteError           the destination (SSH, agent, NBD) failed, refused or went away
    9     -                     verify: the two disks differ
    10    LocalIOError          a disk on this host failed a read or a write
    11    TimedOut              a wait ran out: udev, a device node, blkback, the suspend window
    130   -                     interrupted (^C)
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar


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
    TIMEOUT = 11         # a wait for udev, a device or blkback ran out
    INTERRUPTED = 130


class DmmigError(Exception):
    exit_code = Exit.FAILED
    # every subclass by name, wherever it is defined: from_reply re-raises the destination's kind
    kinds: ClassVar[dict[str, type[DmmigError]]] = {}
    relay_fields: ClassVar[tuple[str, ...]] = ()  # attributes to_reply carries along (JSON values)

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.remote_trace: str | None = None  # the destination's traceback of a bug there

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        DmmigError.kinds.setdefault(cls.__name__, cls)

    def with_context(self, what: str) -> DmmigError:
        """The same kind (class, exit code, fields), its message after WHAT; raise it `from`
        self so --debug still shows where it came from."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.message = f"{what}: {self.message}"
        out.args = (out.message,)
        return out

    def to_reply(self) -> dict[str, Any]:
        """The agent protocol's error reply."""
        return {"error": self.message, "hint": self.hint, "kind": type(self).__name__,
                "exit_code": int(self.exit_code), "fields": {f: getattr(self, f, None) for f in self.relay_fields}}

    @staticmethod
    def from_reply(rep: dict[str, Any], prefix: str = "") -> DmmigError:
        """The destination's error, re-made as the same kind here. A kind this side does not
        know (another version) keeps its exit code; a bug there (kind "internal") is one here."""
        cls = DmmigError.kinds.get(str(rep.get("kind")))
        if cls is None:
            code = rep.get("exit_code")
            cls = next((c for c in _BY_CODE if int(c.exit_code) == code), RemoteError)
            if rep.get("kind") == "internal":
                cls = DmmigError
        e = cls.__new__(cls)
        DmmigError.__init__(e, f"{prefix}{rep.get('error')}", hint=rep.get("hint"))
        fields = rep.get("fields") or {}
        for f in cls.relay_fields:
            setattr(e, f, fields.get(f))
        e.set_relayed(fields)
        if rep.get("trace"):
            e.remote_trace = str(rep["trace"])
        return e

    def set_relayed(self, fields: dict[str, Any]) -> None:
        """What a kind whose __init__ sets more than relay_fields needs after from_reply."""


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


class TimedOut(DmmigError):
    exit_code = Exit.TIMEOUT


class CommandError(DmmigError):
    """An external command exited non-zero (or timed out); carries its stderr. Also the kind of
    an outside service's failure or unparsable output (ToolError)."""

    exit_code = Exit.COMMAND
    relay_fields = ("argv", "returncode", "stdout", "stderr", "timed_out")

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


class ToolError(CommandError):
    """A tool or service failed, or said what dmmig cannot parse, with no argv to show: the
    kind of CommandError, made from a message."""

    def __init__(self, message: str, *, hint: str | None = None, argv: list[str] | None = None) -> None:
        DmmigError.__init__(self, message, hint=hint)
        self.argv = argv or []
        self.returncode: int | None = None
        self.stdout = self.stderr = ""
        self.timed_out = False


class TeardownError(DmmigError):
    """Several cleanup steps failed; all were attempted."""

    exit_code = Exit.STATE

    def __init__(self, what: str, errors: list[BaseException]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{what}: {len(errors)} step(s) failed:\n{lines}",
                         hint="run `dmmig status NAME` to see what is left, then retry")

    def set_relayed(self, fields: dict[str, Any]) -> None:
        self.errors = []


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
            err = e.with_context(desc) if isinstance(e, DmmigError) else DmmigError(f"{desc}: {e}")
            err.__cause__ = e  # --debug shows each step's own traceback
            self.errors.append(err)

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


# the kind of each exit code, for a relayed kind this side does not know
_BY_CODE: tuple[type[DmmigError], ...] = (BadInput, MissingDependency, CommandError, StateError, Busy,
                                          RemoteError, LocalIOError, TimedOut)
