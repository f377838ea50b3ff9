"""The Xen block hotplug script `block-dmmig` (hotplug/block-dmmig execs `dmmig hotplug`).

libxl runs it as `block-dmmig add|remove`, with XENBUS_PATH=backend/vbd/<domid>/<devid>
(relative to the backend domain's XenStore home), XENBUS_TYPE=vbd, stdin on /dev/null, and
kills it after 40 s. It reads `params` (the disk spec's target=) and `mode`.

- add: wrap the target as /dev/mapper/dmmig-NAME (a loop device first for a regular file,
  like Xen's stock `block` script), then write `physical-device` (hex major:minor, which
  blkback opens), `physical-device-path` and `hotplug-status=connected`. On any failure:
  undo, write `hotplug-error` and `hotplug-status=error`, exit non-zero; libxl then fails
  the domain's creation and logs hotplug-error. A disk a migration just handed over to this
  host (the gate's yes recorded a generation here) gets era under its top before
  `physical-device` is written, so a migration back sends only what the guest writes here
  (dmmig/flows/warm.py); that tracking never fails the add.
- remove (libxl runs it after `xl destroy`, after a migration away, and after a failed add):
  undo what this backend's add connected, i.e. unwrap and detach the loop device add
  attached (and end the tracking above), unless a migration of the disk is under way (dmmig's migration owns the stack
  then) or the top device is still open. Failures are logged; libxl ignores them.

NAME depends on `params` only, never on the domid: libxl sends the source's config to the
destination, so both hosts derive the same NAME while the domid changes.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from dmmig.adapters.dm.dmsetup import DmInfo, DmSetup
from dmmig.adapters.runner import SubprocessRunner
from dmmig.adapters.xenstore import PyxsXenStore, XenStore
from dmmig.core import gate, journal
from dmmig.core.stack import Stack
from dmmig.errors import BadInput, Busy, DmmigError, Exit, StateError, TimedOut, Undo
from dmmig.names import SCRIPT, disk_name_for, era_name, format_devno, top_name

LOG_FILE = "/var/log/xen/xen-hotplug.log"  # where Xen's own scripts log (xen-hotplug-common.sh)
# libxl kills the script after 40 s (LIBXL_HOTPLUG_TIMEOUT). The work gets WORK_BUDGET_S; when
# it runs out, undoing and reporting get UNDO_BUDGET_S more, so the error reaches XenStore and
# libxl's log before libxl gives up and reports only "timed out".
WORK_BUDGET_S = 26.0
GATE_TIMEOUT_S = 20.0  # of WORK_BUDGET_S; the rest is wrapping the disk
UNDO_BUDGET_S = 8.0
COMMAND_TIMEOUT_S = 15.0
# blkback drops its reference to the device from deferred work, so at `remove` the top device
# may still be open for a moment after the domain is gone
CLOSE_WAIT_S = 10.0
_BACKEND = re.compile(r"(?:/local/domain/\d+/)?backend/vbd/\d+/\d+")


class HotplugError(BadInput):
    """What libxl gave the script cannot be used."""


class HotplugTimeout(TimedOut):
    """blkback, udev or the handover gate did not answer in time."""


@dataclass(frozen=True)
class Backend:
    """The vbd backend directory libxl named in XENBUS_PATH."""
    path: str

    def key(self, k: str) -> str:
        return f"{self.path}/{k}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        path = env.get("XENBUS_PATH", "")
        if not _BACKEND.fullmatch(path):
            raise HotplugError(f"XENBUS_PATH={path!r} is not a vbd backend path (backend/vbd/DOMID/DEVID): "
                               "block-dmmig is run by libxl for a disk with script=block-dmmig")
        kind = env.get("XENBUS_TYPE", "")
        if kind != "vbd":
            raise HotplugError(f"XENBUS_TYPE={kind!r}: block-dmmig handles only vbd (disk) devices")
        return cls(path)


def canonical_mode(mode: str) -> str:
    """Like Xen's canonicalise_mode (block-common.sh): 'r' without a 'w', 'w', or '!' for
    'w!' (the no-sharing-check mode)."""
    if "w" not in mode:
        return "r"
    return "!" if "!" in mode else "w"


def hex_devno(path: str) -> str:
    """major:minor in hex without 0x, as `stat -L -c %t:%T` prints it (blkback scans "%x:%x")."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise StateError(f"{path} is not a block device")
    return format_devno(st.st_rdev)


def handover_gate(name: str, params: str, state_dir: str) -> None:
    """The handover gate of a live migration (dmmig/core/gate.py, README "The handover gate").

    On the destination, libxl runs `add` while the source guest is suspended and the source
    host still holds the disk. If a dmmig migration of NAME is arriving here (the agent's
    record is in STATE_DIR and not yet handed over), ask dmmig on the source to vouch for the
    disk: every region in sync, every leg alive, the dm event counter unchanged since the
    sync, or the delta era recorded copied first. No yes within GATE_TIMEOUT_S raises
    GateRefused: the add fails, `xl migrate` fails, and the guest resumes on the source. A
    domain that is merely started passes. It runs before anything is created for NAME here, so
    a refusal leaves nothing to undo. PARAMS is the same string on both hosts."""
    if gate.incoming(state_dir, name):
        gate.ask(state_dir, name, GATE_TIMEOUT_S)


class Log:
    """`block-dmmig: ACTION BACKEND: message` lines on stderr, which libxl passes on to xl's
    output, and appended to xen-hotplug.log, where Xen's own scripts log, so the operator
    finds them later."""

    def __init__(self, context: str, *, stream: TextIO | None = None, file: str | None = LOG_FILE) -> None:
        self.context = context
        self.stream = stream if stream is not None else sys.stderr
        self.file = file if file and os.path.isdir(os.path.dirname(file)) and not _same_file(self.stream, file) \
            else None

    def __call__(self, msg: str) -> None:
        line = f"{SCRIPT}: {self.context}: {msg}"
        try:
            print(line, file=self.stream, flush=True)
        except OSError:
            pass
        if self.file:
            try:
                now = time.time()
                with open(self.file, "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} "
                            f"{line}\n")
            except OSError:
                pass


def _same_file(stream: TextIO, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):
        return False


def one_line(msg: str, limit: int = 900) -> str:
    """hotplug-error is shown on one line by libxl, and XenStore takes 7-bit ASCII only."""
    flat = " ".join(msg.split())
    flat = flat.encode("ascii", "replace").decode("ascii")
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class Hotplug:
    def __init__(self, xs: XenStore, stack: Stack, be: Backend, log: Callable[[str], None], *,
                 close_wait_s: float = CLOSE_WAIT_S) -> None:
        self.xs, self.stack, self.be, self.log = xs, stack, be, log
        self.close_wait_s = close_wait_s
        self.t0 = time.monotonic()

    def _took(self) -> str:
        return f"{time.monotonic() - self.t0:.1f}s"

    def _read(self, key: str) -> str:
        v = self.xs.read(self.be.key(key))
        if v is None or v == "":
            raise HotplugError(f"{self.be.key(key)} is missing from XenStore (was the disk set up by libxl?)")
        return v

    # ---- add ------------------------------------------------------------------------------
    def add(self) -> None:
        if self.xs.read(self.be.key("physical-device")) is not None:
            # as the stock block script: a second run for the same backend changes nothing
            self.log("physical-device is already set: called twice, nothing to do")
            return
        params = self._read("params")
        mode = canonical_mode(self._read("mode"))
        name = disk_name_for(params)
        kind = _kind(params)
        top = top_name(name)
        if mode == "r":
            self.log(f"mode r: {top} is wrapped read-write and blkback enforces read-only access; "
                     "sharing one disk read-only between domains is not supported by dmmig")
        info = self.stack.dm.info(top)
        if info is not None and info.open_count > 0:
            raise Busy(f"{top} (target {params}) is already open ({info.open_count} opener(s)): "
                       "another domain or process uses this disk")
        handover_gate(name, params, self.stack.journal.dir)
        undo = Undo()
        try:
            origin, attached = self._origin(params, kind, top, info)
            if attached:
                undo.push(f"detach {origin}", lambda: self.stack.loop.detach(origin))
            path = self.stack.wrap(name, origin)
            if info is None:
                undo.push(f"unwrap {name}", lambda: self.stack.unwrap(name))
                self._track(name, undo)
            devno = hex_devno(path)
            if kind == "file":
                # like the stock script's `node`: remove detaches exactly this loop device
                self.xs.write(self.be.key("node"), origin)
            self.xs.write(self.be.key("physical-device"), devno)
            self.xs.write(self.be.key("physical-device-path"), path)
            self.xs.write(self.be.key("hotplug-status"), "connected")
        except BaseException as e:
            try:
                undo.run(f"undo of the failed add of {params}")
            except DmmigError as u:
                self.log(f"while undoing: {one_line(u.message)}")
            raise e
        self.log(f"{params} wrapped as {path} ({devno}, origin {origin}, mode {mode}): connected in {self._took()}")

    def _track(self, name: str, undo: Undo) -> None:
        """A disk a migration just handed over to this host (its generation, role took-over,
        recorded by the agent at the gate's yes): era goes under the top now, before blkback
        opens it, so a migration back sends only what the guest writes here (flows/warm.py).
        It never fails the add: a disk that is not tracked makes the way back a full copy."""
        from dmmig.flows import warm  # here only, as in _finish_source
        try:
            note = warm.track(self.stack, name)
        except (DmmigError, OSError) as e:
            warm.drop(self.stack.journal.dir, name)
            msg = e.message if isinstance(e, DmmigError) else str(e)
            note = f"cold: {name}'s writes are not tracked ({one_line(msg)}): a migration back is a full copy"
            if self.stack.dm.info(era_name(name)) is not None:
                self.stack.abort(name)  # as it was before: linear over the origin
        if note is None:
            return
        self.log(note)
        if note.startswith("warm"):
            undo.push(f"stop tracking {name}", lambda: warm.forget(self.stack, name))

    def _origin(self, params: str, kind: str, top: str, info: DmInfo | None) -> tuple[str, bool]:
        """(block device to wrap, whether it is a loop device attached just now)."""
        if kind == "block":
            return params, False
        file = os.path.realpath(params)
        loops = self.stack.loop.find(file)
        entry = self.stack.journal.load(top[len("dmmig-"):])
        if info is not None and entry is not None and entry.origin in loops:
            # left wrapped over a loop of this file (e.g. a domain whose remove found it open)
            self.log(f"{top} already wraps {entry.origin} over {file}: reusing it")
            return entry.origin, False
        if loops:
            raise Busy(f"{file} is already attached as {', '.join(loops)}: a second loop device would "
                       "give the file two writers", hint=f"detach it (losetup -d {loops[0]}) if nothing uses it")
        dev = self.stack.loop.attach(file)
        self.log(f"attached {file} as {dev}")
        return dev, True

    # ---- remove ---------------------------------------------------------------------------
    def remove(self) -> None:
        params = self.xs.read(self.be.key("params"))
        if not params:
            self.log("no params in XenStore: nothing of block-dmmig to remove")
            return
        name = disk_name_for(params)
        top = top_name(name)
        entry = self.stack.journal.load(name)
        if entry is not None and entry.handed_over:
            self._finish_source(name, entry, params)
            return
        tracked = entry is not None and _tracked_only(entry)
        if entry is not None and entry.phase != journal.WRAPPED and not tracked:
            # the stack belongs to the migration (a domain destroyed mid-migration, or a gate
            # that said no): dmmig finishes or aborts it
            self.log(f"{name} is in phase {entry.phase!r} of a migration: left for dmmig "
                     f"(`dmmig status {name}`; the migration finishes it, or `dmmig abort {name}`)")
            return
        used = self.xs.read(self.be.key("physical-device"))
        if used is None:
            # add refused (libxl runs remove after a failed add) or never ran: nothing here is
            # this backend's, and a top device of that name may serve another domain
            self.log("this backend was never connected: nothing of block-dmmig to remove")
            return
        node = self.xs.read(self.be.key("node"))
        info = self._wait_closed(top)
        if info is not None and format_devno(os.makedev(info.major, info.minor)) != used:
            self.log(f"{top} is {info.major}:{info.minor}, not the device this backend used ({used}): left alone")
            return
        if info is not None and info.open_count > 0:
            self.log(f"{top} is still open ({info.open_count} opener(s)) after {self.close_wait_s:.0f}s: "
                     f"left in place; `dmmig unwrap {name}` once it is closed")
            return
        if tracked:  # the guest stopped here: its writes since the handover are not known any more
            from dmmig.flows import warm
            for step in warm.forget(self.stack, name):
                self.log(step)
        if info is not None or entry is not None:
            self.stack.unwrap(name)
            self.log(f"unwrapped {top} in {self._took()}")
        else:
            self.log(f"{top} does not exist: nothing to unwrap")
        if node:
            self._detach(node, params)

    def _finish_source(self, name: str, entry: journal.Entry, params: str) -> None:
        """After a completed migration (libxl destroys the source domain once the destination
        runs it): the destination's add got our yes, so this host's stack is history. Tear it
        down here and keep the data; `dmmig migrate` tells the destination's agent."""
        from dmmig.flows import finish  # here only: paramiko costs every other run of the script 0.2 s
        try:
            done = finish.finish_handed_over(self.stack, name, node=self.xs.read(self.be.key("node")),
                                              params=params, close_wait_s=self.close_wait_s)
        except StateError as e:  # still open: `dmmig migrate` (or the operator) finishes it
            self.log(f"{e.message}: left for {e.hint}")
            return
        for step in done:
            self.log(step)
        self.log(f"{name} was handed over to the destination: finished here in {self._took()} ({len(done)} steps)")

    def _wait_closed(self, top: str) -> DmInfo | None:
        deadline = time.monotonic() + self.close_wait_s
        while True:
            info = self.stack.dm.info(top)
            if info is None or info.open_count == 0 or time.monotonic() >= deadline:
                return info
            time.sleep(0.2)

    def _detach(self, node: str, params: str) -> None:
        # only the loop device add attached over this very file: never someone else's
        file = os.path.realpath(params)
        if node not in (self.stack.loop.find(file) if os.path.isfile(file) else []):
            self.log(f"{node} is no longer a loop device over {file}: left alone")
            return
        self.stack.loop.detach(node)
        self.log(f"detached {node} ({file})")


def _tracked_only(entry: journal.Entry) -> bool:
    """ENTRY is prepared only to track the writes of a disk a migration handed over here
    (add's _track), with no migration of it under way."""
    c = entry.copy
    return (entry.phase == journal.PREPARED and c.warm is not None and entry.dest is None
            and c.base_era is None and not c.base_started)


def _kind(params: str) -> str:
    """'block' or 'file'; anything else is refused before anything changes."""
    try:
        st = os.stat(params)
    except FileNotFoundError:
        raise HotplugError(f"target {params} does not exist") from None
    except OSError as e:
        raise HotplugError(f"target {params}: {e.strerror}") from e
    if stat.S_ISBLK(st.st_mode):
        return "block"
    if stat.S_ISREG(st.st_mode):
        return "file"
    raise HotplugError(f"target {params} is neither a block device nor a regular file")


# ---- the script's process: deadline, error reporting ------------------------------------------

@contextmanager
def deadline(work_s: float, undo_s: float) -> Iterator[None]:
    """Raise HotplugTimeout in the main thread after WORK_S, and once more UNDO_S later if the
    cleanup that follows hangs too. pyxs and subprocess both give way to it (Python retries
    neither a lock wait nor a child wait interrupted by a raising handler)."""
    fired: list[float] = []

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        fired.append(time.monotonic())
        if len(fired) == 1:
            signal.setitimer(signal.ITIMER_REAL, undo_s)
            raise HotplugTimeout(f"gave up after {work_s:.0f}s (libxl allows 40s)")
        raise HotplugTimeout(f"cleanup after the timeout took more than {undo_s:.0f}s more")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, work_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run(action: str, xs: XenStore, stack: Stack, be: Backend, log: Callable[[str], None], *,
        close_wait_s: float = CLOSE_WAIT_S) -> int:
    """The error boundary: every failure becomes hotplug-error + hotplug-status=error and a
    non-zero exit status (which libxl ignores for remove, but the log keeps it)."""
    hp = Hotplug(xs, stack, be, log, close_wait_s=close_wait_s)
    try:
        if action == "add":
            hp.add()
        elif action == "remove":
            hp.remove()
        else:
            raise HotplugError(f"unknown action {action!r}: expected add or remove")
        return 0
    except DmmigError as e:
        msg, code = e.message + (f" (what to do: {e.hint})" if e.hint else ""), int(e.exit_code)
    except Exception as e:  # noqa: BLE001 - a script must report, never die with a traceback
        msg, code = f"internal error: {type(e).__name__}: {e}", int(Exit.FAILED)
    report_error(xs, be, log, msg)
    return code


def report_error(xs: XenStore, be: Backend, log: Callable[[str], None], msg: str) -> None:
    line = one_line(f"{SCRIPT}: {msg}")
    log(f"error: {line[len(SCRIPT) + 2:]}")
    try:
        # the order of the stock script's fatal: libxl reads hotplug-error once we exit
        xs.write(be.key("hotplug-error"), line)
        xs.write(be.key("hotplug-status"), "error")
    except Exception as e:  # noqa: BLE001 - nothing left to report to but the log
        log(f"could not write hotplug-error to XenStore: {e}")


def make_stack(state_dir: str | None) -> Stack:
    from dmmig.adapters.udev import wait_dm_node
    runner = SubprocessRunner(default_timeout=COMMAND_TIMEOUT_S)
    return Stack(runner, DmSetup(runner, wait_node=wait_dm_node), journal.Journal(journal.state_dir(state_dir)))


def main(action: str, env: Mapping[str, str] | None = None, *, state_dir: str | None = None) -> int:
    """`dmmig hotplug add|remove`, as libxl runs it through hotplug/block-dmmig."""
    env = os.environ if env is None else env
    log = Log(f"{action} {env.get('XENBUS_PATH', '?')}")
    try:
        be = Backend.from_env(env)
    except HotplugError as e:
        # without a backend path there is nowhere to write hotplug-error
        log(f"error: {e.message}")
        return int(e.exit_code)
    with deadline(WORK_BUDGET_S, UNDO_BUDGET_S):
        try:
            with PyxsXenStore() as xs:
                return run(action, xs, make_stack(state_dir), be, log)
        except DmmigError as e:  # xenstored unreachable, or the deadline hit outside run()
            log(f"error: {e.message}")
            return int(e.exit_code)
