"""The fetcher's one timer thread calls each cut-off once it is due, earliest first, and never a canceled one."""

from __future__ import annotations

import threading

from worker.timers import Timers


def test_cutoffs_run_in_deadline_order_and_canceled_ones_never() -> None:
    timers = Timers(name="test-timers")
    calls: list[str] = []
    last = threading.Event()

    def record(name: str) -> None:
        calls.append(name)
        if name == "late":
            last.set()

    timers.call_later(0.3, lambda: record("late"))
    canceled = timers.call_later(0.05, lambda: record("canceled"))
    timers.call_later(0.1, lambda: record("early"))  # earlier than the one the thread sleeps for: it wakes
    canceled.cancel()
    assert last.wait(10)
    assert calls == ["early", "late"]


def test_a_cutoff_scheduled_while_the_thread_sleeps_long_is_called_on_time() -> None:
    timers = Timers(name="test-timers")
    far = timers.call_later(3600, lambda: None)  # the thread now sleeps for an hour...
    soon = threading.Event()
    timers.call_later(0.01, soon.set)  # ...unless a nearer cut-off wakes it
    assert soon.wait(10)
    far.cancel()
