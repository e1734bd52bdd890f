"""Where a worker's CPU goes, by stage: `blipq_worker_stage_cpu_seconds_total{stage=...}`.

Each stage is timed with the CPU clock of the thread that runs it (`time.thread_time`), so that the stages of many
threads add up without counting another thread's work or the time a thread waited:

- `fetch`: an image's bytes downloaded (or an upload read from Redis);
- `decode`: the bytes decoded into the picture a viewer sees, as far as the model needs (contract.images), in
  the worker's decoder processes (worker/decoders.py), which report their CPU with each image, or in its threads;
- `resize`: that picture resized to the model's input, as uint8 pixels, likewise;
- `model`: the model's calls (worker/batching.py's thread: stacking, normalising, generate, decoding the tokens);
- `bookkeeping`: the rest of the worker process's CPU (Celery's consumer, the sockets to the decoders, the start and end
  scripts, the answer cache, the intake, the reaper, metrics, logs), read at each scrape as the process's CPU less
  the stages it ran itself. (The decoder processes' own CPU outside decoding, their sockets, is in no stage.)

Bookkeeping is kept from ever going down (a counter must not): a stage still running at a scrape is counted there as
bookkeeping until it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

STAGES = ("fetch", "decode", "resize", "model", "bookkeeping")
METRIC = "blipq_worker_stage_cpu_seconds"  # `_total` in the exposition


class StageClock(Collector):
    """The CPU seconds each stage has spent in this process; a Prometheus collector of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent = dict.fromkeys(STAGES, 0.0)
        self._elsewhere = 0.0  # of the seconds above, those spent in other processes (worker/decoders.py)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the calling thread's CPU time in the block as stage `name`'s (also when the block raises)."""
        started = time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.thread_time() - started)

    def add(self, name: str, seconds: float, elsewhere: bool = False) -> None:
        """Count `seconds` of CPU as stage `name`'s; `elsewhere`: spent by another process for this one."""
        with self._lock:
            self._spent[name] += seconds
            if elsewhere:
                self._elsewhere += seconds

    def spent(self) -> dict[str, float]:
        """CPU seconds by stage so far, bookkeeping the process's CPU less the other stages (never less than before)."""
        with self._lock:
            measured = sum(seconds for name, seconds in self._spent.items() if name != "bookkeeping")
            rest = time.process_time() - (measured - self._elsewhere)
            self._spent["bookkeeping"] = max(self._spent["bookkeeping"], rest)
            return dict(self._spent)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            METRIC, "CPU seconds this worker spent, by stage of its work (thread CPU time)", labels=["stage"]
        )
        for name, seconds in self.spent().items():
            family.add_metric([name], seconds)
        yield family

    def register(self, registry: CollectorRegistry = REGISTRY) -> StageClock:
        """Export the counter on `registry` (the worker's /metrics); returns the clock."""
        registry.register(self)
        return self


STAGE_CLOCK = StageClock().register()
stage = STAGE_CLOCK.stage
