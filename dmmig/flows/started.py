"""A function running in a thread, its result or error taken later (the flows' overlapped
set-up steps). Its own module: session.py imports paramiko (0.8 s of a rig kernel's start),
which a cutover reusing the copy's export never needs."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Started(Generic[T]):
    """FN running in a thread from now on. result() waits for it and returns what it returned
    or raises what it raised; abandon(CLEANUP): nobody will take the result, CLEANUP gets it
    once it comes (exactly once, whichever comes first)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._lock = threading.Lock()
        self._value: list[T] = []  # the result, once there
        self._error: BaseException | None = None
        self._cleanup: Callable[[T], None] | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to whoever takes the result
            self._error = e
            return
        with self._lock:
            self._value.append(value)
            cleanup = self._cleanup
        if cleanup is not None:
            cleanup(value)

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value[0]

    def abandon(self, cleanup: Callable[[T], None]) -> None:
        with self._lock:
            self._cleanup = cleanup
            value = list(self._value)
        for v in value:
            cleanup(v)
