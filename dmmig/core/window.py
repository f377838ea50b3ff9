"""A suspended window with a hard cap: the guest's disk is never frozen without bound.

The handover gate suspends the source's top device and then checks, queries era, copies over
the network and answers; any of these can hang on a link that black-holes. A timer resumes
the device at the cap whatever the owner is blocked in, then runs the expiry callbacks (e.g.
shutting down the socket a blocked NBD client polls); the owner sees expired() and answers
no. dm serialises the timer's resume with a suspend still in progress, so the window is at
most max(cap, the time the suspend itself waits for in-flight I/O).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dmmig.errors import TimedOut

RESUME_MARGIN_S = 2.0  # what the resume itself may take (a loaded host spawns dmsetup slowly)


class WindowClosed(TimedOut):
    """The cap passed: whatever was under way may no longer decide the answer."""


class Window:
    def __init__(self, cap: float, resume: Callable[[], object]) -> None:
        """RESUME may return the monotonic time the device resumed at (DmSetup.resume does:
        the kernel's resume, before udev settled); else the time it returned counts."""
        self.cap = cap
        self._resume = resume
        self._lock = threading.Lock()         # one resume, by whichever side comes first
        self._expired = threading.Event()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._t0 = 0.0
        self._resumed_at: float | None = None
        self._resume_error: BaseException | None = None
        # the timer fires early enough for its own resume (a dmsetup process, udev's sync) to
        # end inside the cap: the work gets the rest (remaining())
        self.budget = max(cap - RESUME_MARGIN_S, cap / 2)
        self._timer = threading.Timer(self.budget, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        """Call right before the suspend: the cap counts from here."""
        self._t0 = time.monotonic()
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left for the work before the timer resumes the device."""
        return max(0.0, self._t0 + self.budget - time.monotonic())

    def expired(self) -> bool:
        return self._expired.is_set()

    def check(self, what: str) -> None:
        if self._expired.is_set():
            raise WindowClosed(f"the {self.cap:.0f}s the guest's disk may stay suspended ran out {what}")

    def on_expiry(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run FN once the cap passes (at once if it has); returns what unregisters it."""
        with self._lock:
            key = self._next
            self._next += 1
            self._callbacks[key] = fn
        if self._expired.is_set():
            self._run_callbacks()

        def cancel() -> None:
            with self._lock:
                self._callbacks.pop(key, None)
        return cancel

    def close(self) -> float:
        """Resume now unless the timer already did; returns the seconds the window lasted
        (start to the end of the resume). Raises if the device could not be resumed."""
        self._timer.cancel()
        self._resume_once()
        with self._lock:
            if self._resumed_at is None:  # the resume failed (the timer's, or ours): once more
                try:
                    self._resumed_at = _when(self._resume())
                except BaseException:
                    if self._resume_error is not None:
                        raise self._resume_error from None
                    raise
            return self._resumed_at - self._t0

    def _fire(self) -> None:
        self._expired.set()
        self._resume_once()
        self._run_callbacks()

    def _resume_once(self) -> None:
        with self._lock:
            if self._resumed_at is not None:
                return
            try:
                self._resumed_at = _when(self._resume())
            except Exception as e:  # noqa: BLE001 - kept for close(), which retries and raises
                self._resume_error = e

    def _run_callbacks(self) -> None:
        with self._lock:
            fns = list(self._callbacks.values())
            self._callbacks.clear()
        for fn in fns:
            try:
                fn()
            except Exception:  # noqa: BLE001 - each callback only unblocks the owner; none may stop the rest
                pass


def _when(resumed: object) -> float:
    return resumed if isinstance(resumed, float) else time.monotonic()
