"""The suspended window's cap (dmmig/core/window.py), with real threads and a real blocking call:
the device is resumed at the cap whatever the owner is blocked in; the owner learns it."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from dmmig.core.window import RESUME_MARGIN_S, Window, WindowClosed


class Device:
    def __init__(self) -> None:
        self.resumes: list[float] = []
        self.fail = 0

    def resume(self) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("dmsetup resume failed")
        self.resumes.append(time.monotonic())


def test_the_timer_resumes_at_the_cap_while_the_owner_is_blocked() -> None:
    dev = Device()
    win = Window(0.5, dev.resume)
    ours, theirs = socket.socketpair()
    win.on_expiry(lambda: ours.shutdown(socket.SHUT_RDWR))  # what unblocks the owner
    t0 = time.monotonic()
    win.start()
    assert ours.recv(10) == b""  # blocked like an NBD client on a black-holed link, until the cap
    # early enough for the resume itself to end inside the cap (RESUME_MARGIN_S, at most half of it)
    assert win.expired() and 0.24 < dev.resumes[0] - t0 < 0.5
    with pytest.raises(WindowClosed, match="0s the guest's disk may stay suspended ran out during x"):
        win.check("during x")
    assert 0.24 < win.close() < 0.5 and len(dev.resumes) == 1  # close() does not resume twice
    ours.close()
    theirs.close()


def test_an_owner_done_in_time_resumes_once_and_the_timer_never_fires() -> None:
    dev = Device()
    fired: list[bool] = []
    win = Window(0.3, dev.resume)
    win.on_expiry(lambda: fired.append(True))
    win.start()
    win.check("in time")
    assert win.close() < 0.3
    time.sleep(0.5)
    assert len(dev.resumes) == 1 and not fired and not win.expired()


def test_a_callback_registered_after_expiry_runs_at_once_and_unhooked_ones_never() -> None:
    dev = Device()
    win = Window(0.1, dev.resume)
    ran: list[str] = []
    unhook = win.on_expiry(lambda: ran.append("unhooked"))
    unhook()
    win.start()
    time.sleep(0.3)
    win.on_expiry(lambda: ran.append("late"))
    assert ran == ["late"]
    win.close()


def test_a_failed_resume_is_retried_and_reported() -> None:
    dev = Device()
    dev.fail = 1
    win = Window(0.1, dev.resume)
    win.start()
    time.sleep(0.3)  # the timer's resume failed
    assert win.close() > 0 and len(dev.resumes) == 1  # close() retried
    dev = Device()
    dev.fail = 2
    win = Window(5, dev.resume)
    win.start()
    with pytest.raises(OSError, match="resume failed"):
        win.close()


def test_concurrent_resumes_are_one() -> None:
    dev = Device()
    win = Window(0.2, dev.resume)
    win.start()
    time.sleep(0.19)
    ts = [threading.Thread(target=win.close) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(0.1)
    assert len(dev.resumes) == 1


def test_the_work_gets_the_cap_less_the_resume_margin() -> None:
    win = Window(12, Device().resume)
    win.start()
    assert win.budget == 12 - RESUME_MARGIN_S and 9.9 < win.remaining() <= 10
    win.close()


def test_the_kernels_resume_time_counts_not_udevs() -> None:
    t = time.monotonic()
    win = Window(5, lambda: t + 0.01)  # as DmSetup.resume: the time the kernel resumed
    win.start()
    time.sleep(0.2)
    assert win.close() < 0.05
