"""One thread that calls callbacks at their deadlines, for the image fetcher's whole-request cut-offs.

A `threading.Timer` per request starts and joins a thread for every image: about 0.25 ms of the worker's CPU per image
on a kept-alive connection, measured with benchmarks/fetch.py. Here every cut-off waits in one heap, served by one
daemon thread that sleeps until the earliest is due; a cut-off canceled before it is due is dropped when it comes up.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Cutoff:
    """A callback due at a time; `cancel` keeps it from being called if it has not been yet."""

    __slots__ = ("callback", "canceled", "due")

    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due, self.callback, self.canceled = due, callback, False

    def cancel(self) -> None:
        """Do not call the callback (it may be running already, or have run)."""
        self.canceled = True


class Timers:
    """Calls each scheduled callback, in its own thread's turn, once its deadline (time.monotonic) has passed."""

    def __init__(self, name: str = "blipq-timers") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Cutoff]] = []
        self._order = itertools.count()  # ties on the deadline are served in scheduling order
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Cutoff:
        """Call `callback` from the timer thread in `seconds`, unless the returned cut-off is canceled first."""
        cutoff = Cutoff(time.monotonic() + seconds, callback)
        with self._changed:
            heapq.heappush(self._heap, (cutoff.due, next(self._order), cutoff))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is cutoff:  # a new earliest: the thread sleeps until a later one
                self._changed.notify()
        return cutoff

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._heap and self._heap[0][2].canceled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait()
                    continue
                wait_s = self._heap[0][0] - time.monotonic()
                if wait_s > 0:
                    self._changed.wait(wait_s)
                    continue
                cutoff = heapq.heappop(self._heap)[2]
            if not cutoff.canceled:
                cutoff.callback()


TIMERS = Timers()  # the process's one timer thread for fetch cut-offs
