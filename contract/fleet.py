"""What workers publish about themselves in Redis, for the API's /readyz and /metrics: who is up, and how jobs end.

Imports neither Flask nor torch: the workers write these keys, the API reads them.

- Each worker that has its model loaded keeps a hash `blipq:worker:<host>:<pid>` (model, device, dtype, queue,
  when it loaded, the model's input size...) that expires `RECORD_TTL_FACTOR` announce intervals after its last
  refresh: a worker is live while its hash exists. Its id is also in its queue's sorted set `blipq:workers:<queue>`,
  scored by the last refresh, so that a reader finds a queue's workers without scanning the keyspace. A clean exit
  deletes both; a killed process drops out when its hash expires, and out of the set an hour later.
  Each refresh also publishes the worker's answers per second over the last minute, and per second it had work in
  hand; the latter is kept a day in `blipq:rate:<queue>` too, so that the API's drain-time metric has a rate while the
  queue has no worker.
- Each run of a job that ends adds 1 to the field `<status>:<code>` of the hash `blipq:stats:outcomes:<queue>`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract.keys import kept_rate_key, queue_outcomes_key, worker_key, workers_key
from contract.redis_target import RedisTarget, as_target

log = logging.getLogger("blipq.worker")

RECORD_TTL_FACTOR = 3  # a record outlives two missed refreshes (a busy machine, a Redis blip), not three
INDEX_HORIZON_S = 3600  # ids silent this long leave a queue's set (their hash expired long before)
REDIS_TIMEOUT_S = 2.0  # a heartbeat or a probe gives up this fast when Redis does not answer
KEPT_RATE_TTL_S = 86400  # a queue's last measured rate outlives a night scaled to zero
UNMEASURED_RATE = 1.0  # answers per busy second assumed for a queue no worker has measured a rate of (in a day)

Rates = Callable[[], tuple[float, float]]  # a worker's answers per second, and per busy second, over the last minute


@dataclass(frozen=True)
class WorkerRecord:
    """A worker that has its model loaded and serves a queue."""

    id: str  # host:pid, as jobs record their `worker`
    host: str
    pid: int
    queue: str
    model: str
    device: str
    dtype: str
    loaded_at: str  # ISO 8601 UTC
    load_seconds: float
    metrics_port: int  # 0: no metrics endpoint
    # The model's input size, which its processor resizes every image to: a client may shrink pictures to it before
    # uploading them. 0: not published (a record of an older worker).
    image_width: int = 0
    image_height: int = 0
    decode: str = ""  # how the worker decodes images, for a worker that says; "": not published
    # The PIL filter its processor resizes with, by name (`bicubic`): with the input size and the decode mode, what a
    # client needs to make the very pixels the model would see. "": not published.
    resample: str = ""
    pillow: str = ""  # the Pillow release that decodes and resizes its images (its pixels are that release's)
    # Answers ended per second over the last minute, and per second of it that the worker had a job in hand (what it
    # drains when busy). 0: none ended in that minute, or not published (a record of an older worker).
    answers_per_s: float = 0.0
    busy_answers_per_s: float = 0.0
    # The seconds a single job took from its start to its end over the last minute, at their 10th percentile: an
    # answer's fixed latency
    # (fetch, decode, the model call it waits for), which end estimates count. 0: none ended, or not published.
    job_run_s: float = 0.0

    def to_redis(self) -> dict[str, str]:
        """The record as flat string fields for a Redis hash."""
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_redis(cls, fields: Mapping[str, str]) -> WorkerRecord:
        """Rebuild a record from its Redis hash (one written before a field was added has its default)."""
        return cls(
            id=fields["id"],
            host=fields["host"],
            pid=int(fields["pid"]),
            queue=fields["queue"],
            model=fields["model"],
            device=fields["device"],
            dtype=fields["dtype"],
            loaded_at=fields["loaded_at"],
            load_seconds=float(fields["load_seconds"]),
            metrics_port=int(fields["metrics_port"]),
            image_width=int(fields.get("image_width", 0)),
            image_height=int(fields.get("image_height", 0)),
            decode=fields.get("decode", ""),
            resample=fields.get("resample", ""),
            pillow=fields.get("pillow", ""),
            answers_per_s=float(fields.get("answers_per_s", 0.0)),
            busy_answers_per_s=float(fields.get("busy_answers_per_s", 0.0)),
            job_run_s=float(fields.get("job_run_s", 0.0)),
        )


def fleet_client(where: RedisTarget | str) -> redis.Redis:
    """A client for these keys: short timeouts, decoded strings."""
    return as_target(where).client(
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),  # once more (a stale pooled connection), then report Redis away
        decode_responses=True,
    )


def live_workers(client: redis.Redis, queue: str) -> list[WorkerRecord]:
    """The workers of `queue` whose record has not expired; `client` must decode responses."""
    ids: list[str] = client.zrange(workers_key(queue), 0, -1)  # type: ignore[assignment]
    with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(worker_key(worker_id))
        records: list[dict[str, str]] = pipe.execute()
    return [WorkerRecord.from_redis(fields) for fields in records if fields]


def has_live_worker(client: redis.Redis, queue: str) -> bool:
    """Whether some worker of `queue` has a record that has not expired (any client: nothing is decoded)."""
    ids: list[bytes | str] = client.zrange(workers_key(queue), 0, -1)  # type: ignore[assignment]
    if not ids:
        return False
    with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.exists(worker_key(worker_id.decode() if isinstance(worker_id, bytes) else worker_id))
        return any(pipe.execute())


def kept_rate(client: redis.Redis, queue: str) -> float:
    """The last answers per busy second a worker of `queue` published (kept a day), 0.0 if none."""
    raw = client.get(kept_rate_key(queue))
    return float(raw) if raw else 0.0


def measured_rate(workers: list[WorkerRecord], kept: float) -> float:
    """The answers per busy second one worker of a queue drains, as measured: the mean of the live workers' measured
    rates; else (none live, or none ended an answer in the last minute) the queue's kept rate; 0.0 when neither."""
    measured = [worker.busy_answers_per_s for worker in workers if worker.busy_answers_per_s > 0]
    return sum(measured) / len(measured) if measured else max(kept, 0.0)


def per_worker_rate(workers: list[WorkerRecord], kept: float) -> float:
    """`measured_rate`, or `UNMEASURED_RATE` for a queue no worker has measured a rate of."""
    return measured_rate(workers, kept) or UNMEASURED_RATE


def count_outcome(client: redis.Redis, queue: str, status: str, code: str) -> None:
    """Count one run of a job of `queue` that ended with `status` (and error `code`, "" on success)."""
    client.hincrby(queue_outcomes_key(queue), f"{status}:{code}", 1)


def outcome_counts(client: redis.Redis, queue: str) -> dict[tuple[str, str], int]:
    """How runs of `queue`'s jobs ended, by (status, code); `client` must decode responses."""
    raw: dict[str, str] = client.hgetall(queue_outcomes_key(queue))  # type: ignore[assignment]
    counts = {}
    for field, value in raw.items():
        status, _, code = field.partition(":")
        counts[status, code] = int(value)
    return counts


class Announcer(threading.Thread):
    """Keeps a worker's record fresh every `interval_s`, until stopped (which deletes it), with its rates and its jobs'
    run time of the moment when given `rates` and `job_run_s`."""

    def __init__(
        self,
        client: redis.Redis,
        record: WorkerRecord,
        interval_s: float,
        rates: Rates | None = None,
        job_run_s: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name="blipq-announcer", daemon=True)
        self.client, self.record, self.interval_s, self.rates = client, record, interval_s, rates
        self.job_run_s = job_run_s
        self.ttl_s = interval_s * RECORD_TTL_FACTOR
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.announce()
            except (redis.RedisError, OSError) as exc:  # Redis away: this worker drops out of /readyz until it's back
                log.warning("cannot announce worker %s: %s", self.record.id, exc)
            if self.stopping.wait(self.interval_s):
                return

    def announce(self) -> None:
        """Write the record with its expiry, list it in its queue, and drop the queue's workers gone silent."""
        now = time.time()
        key, index = worker_key(self.record.id), workers_key(self.record.queue)
        record = self.record
        if self.rates is not None:
            per_s, busy_per_s = self.rates()
            record = replace(record, answers_per_s=round(per_s, 4), busy_answers_per_s=round(busy_per_s, 4))
        if self.job_run_s is not None:
            record = replace(record, job_run_s=round(self.job_run_s(), 4))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record.to_redis())  # type: ignore[arg-type]  # redis-py: invariant Mapping
            if record.busy_answers_per_s > 0:
                pipe.set(kept_rate_key(record.queue), record.busy_answers_per_s, ex=KEPT_RATE_TTL_S)
            pipe.expire(key, max(1, round(self.ttl_s)))
            pipe.zadd(index, {self.record.id: now})
            # A fixed horizon, not this worker's TTL: workers announcing less often must not be dropped by it.
            pipe.zremrangebyscore(index, "-inf", now - INDEX_HORIZON_S)
            pipe.execute()

    def stop(self) -> None:
        """Stop refreshing and delete the record: the worker is going away."""
        self.stopping.set()
        self.join(REDIS_TIMEOUT_S * 2)  # a refresh under way must not write the record back after it is deleted
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(worker_key(self.record.id))
                pipe.zrem(workers_key(self.record.queue), self.record.id)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:  # it expires by itself
            log.warning("cannot withdraw worker %s: %s", self.record.id, exc)


def worker_identity() -> str:
    """Which worker runs a job, recorded on it: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"
