"""A worker's measured rate: answers ended per second over the last minute, and per second of it that the worker had
a job in hand. The announcer publishes both in the worker's record (contract/fleet.py); the API's drain-time metric
divides the backlog by the second, which is what the worker drains while it has work, however idle it was."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0


class RateMeter:
    """Counts the answers that task threads end, and the time at least one of them runs; thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.created = clock()
        self.lock = threading.Lock()
        self.ended: deque[tuple[float, int]] = deque()  # (when, answers)
        self.busy: deque[tuple[float, float]] = deque()  # (start, end) of each spell with a job in hand
        self.in_flight = 0
        self.busy_since = 0.0

    def begin(self) -> None:
        """A task thread starts a job or a chunk."""
        with self.lock:
            if self.in_flight == 0:
                self.busy_since = self.clock()
            self.in_flight += 1

    def end(self, answers: int) -> None:
        """The thread's job or chunk is over, with `answers` ended (0: it raised, or was a duplicate delivery)."""
        with self.lock:
            now = self.clock()
            if answers > 0:
                self.ended.append((now, answers))
            if self.in_flight > 0:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.busy.append((self.busy_since, now))
            self._forget(now)

    def rates(self) -> tuple[float, float]:
        """Answers per second over the last minute (or since the meter started), and per busy second of it (0.0
        when no answer ended in it)."""
        with self.lock:
            now = self.clock()
            self._forget(now)
            since = max(now - self.window_s, self.created)
            answers = sum(count for _, count in self.ended)
            spells = [*self.busy, *([(self.busy_since, now)] if self.in_flight else [])]
            busy_s = sum(end - max(start, since) for start, end in spells if end > since)
        if answers == 0:
            return 0.0, 0.0
        return answers / max(now - since, 1e-3), answers / max(busy_s, 1e-3)

    def _forget(self, now: float) -> None:
        since = now - self.window_s
        while self.ended and self.ended[0][0] <= since:
            self.ended.popleft()
        while self.busy and self.busy[0][1] <= since:
            self.busy.popleft()
