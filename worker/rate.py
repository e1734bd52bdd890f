"""A worker's measured rate: answers ended per second over the last minute, and per second of it that the worker had
a job in hand; and how long a single job takes from its start to its end (the 10th percentile over the last minute:
its fixed latency, without the wait behind other work in the worker). The
announcer publishes them in the worker's record (contract/fleet.py); the API's drain-time metric divides the backlog
by the second, which is what the worker drains while it has work, however idle it was, and its end estimates count the
third as the fixed latency of an answer (fetching, decoding, the model call it waits for)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0
RUN_PERCENTILE = 0.1  # a single job's run as published: its fixed latency, not its wait behind others


class RateMeter:
    """Counts the answers that task threads end, and the time at least one of them runs; thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.created = clock()
        self.lock = threading.Lock()
        self.ended: deque[tuple[float, int]] = deque()  # (when, answers)
        self.busy: deque[tuple[float, float]] = deque()  # (start, end) of each spell with a job in hand
        self.runs: deque[tuple[float, float]] = deque()  # (when, seconds) of each single job that ended
        self.in_flight = 0
        self.busy_since = 0.0

    def begin(self) -> None:
        """A task thread starts a job or a chunk."""
        with self.lock:
            if self.in_flight == 0:
                self.busy_since = self.clock()
            self.in_flight += 1

    def end(self, answers: int, job_run_s: float | None = None) -> None:
        """The thread's job or chunk is over, with `answers` ended (0: it raised, or was a duplicate delivery); a
        single job's with `job_run_s`, the seconds from its start to its end."""
        with self.lock:
            now = self.clock()
            if answers > 0:
                self.ended.append((now, answers))
                if job_run_s is not None:
                    self.runs.append((now, job_run_s))
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

    def job_run_s(self) -> float:
        """The seconds of the single jobs that ended over the last minute, at their 10th percentile (0.0 when none
        did): what a job takes with little ahead of it in the worker, not what one behind a backlog does."""
        with self.lock:
            self._forget(self.clock())
            runs = sorted(seconds for _, seconds in self.runs)
        return runs[max(0, math.ceil(len(runs) * RUN_PERCENTILE) - 1)] if runs else 0.0

    def _forget(self, now: float) -> None:
        since = now - self.window_s
        while self.ended and self.ended[0][0] <= since:
            self.ended.popleft()
        while self.runs and self.runs[0][0] <= since:
            self.runs.popleft()
        while self.busy and self.busy[0][1] <= since:
            self.busy.popleft()
