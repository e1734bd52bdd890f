"""The job contract shared by the API and the workers: states, Redis keys, the task name and the Celery app.

Imports neither Flask nor torch. A job is a Redis hash that the API creates and the worker moves through
queued -> running -> succeeded | failed; it expires `job_ttl_s` after submission.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from worker.settings import DEFAULT_TIME_LIMIT_S

TASK_VQA = "blipq.vqa"
KEY_PREFIX = "blipq:"
JOB_ID_BYTES = 16  # 128 random bits: ids are unguessable
OUTAGE_BACKOFF_CAP_S = 1.0  # the longest wait between two tries of a worker's Redis command while Redis is away
SOFT_LIMIT_MARGIN_S = 10  # the soft limit comes this much earlier, so the job can record its `timeout` failure
VISIBILITY_MARGIN_S = 60  # beyond the hard limit, before a job reserved by a vanished worker is delivered again
API_RETRIES = 1  # the API tries a failed Redis command once more (a stale pooled connection), then answers 503

# Starts a run of a job, unless it has expired or already ended; counts its attempts and gives up after too many.
# It also takes the job off its queue's set of jobs never started, and moves the queue's mark (the latest enqueue
# time of a job started) forward: see worker/reaper.py.
# KEYS[1] = job hash, KEYS[2] = stats hash, KEYS[3] = never-started set, KEYS[4] = mark;
# ARGV = max attempts, started_at, model, worker, message, job id.
# Returns the attempt number (>= 1), START_ENDED, START_MISSING, or START_GAVE_UP (the job is now failed).
_START_LUA = """
local enqueued = redis.call('zscore', KEYS[3], ARGV[6])
if enqueued then
  redis.call('zrem', KEYS[3], ARGV[6])
  local mark = redis.call('get', KEYS[4])
  if (not mark) or tonumber(enqueued) > tonumber(mark) then redis.call('set', KEYS[4], enqueued) end
end
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then
  redis.call('hincrby', KEYS[2], 'duplicate_deliveries', 1)
  return 0
end
local attempt = redis.call('hincrby', KEYS[1], 'attempts', 1)
if attempt > tonumber(ARGV[1]) then
  redis.call('hset', KEYS[1], 'status', 'failed', 'error_code', 'worker_lost', 'error_message', ARGV[5],
             'finished_at', ARGV[2])
  redis.call('hincrby', KEYS[2], 'worker_lost', 1)
  return -2
end
redis.call('hset', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'model', ARGV[3], 'worker', ARGV[4])
redis.call('hincrby', KEYS[2], 'executions', 1)
if attempt > 1 then redis.call('hincrby', KEYS[2], 'reruns', 1) end
return attempt
"""

# Ends a job with its outcome unless it already ended: an answer, once written, never changes. Two runs of one job
# (a redelivery racing a slow worker) publish one answer; the later one is counted as a duplicate execution.
# KEYS[1] = job hash, KEYS[2] = stats hash; ARGV = field, value, ... Returns 1 when written, 0 when the job had
# ended, -1 when it is missing (expired).
_FINISH_LUA = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then
  redis.call('hincrby', KEYS[2], 'duplicate_executions', 1)
  return 0
end
redis.call('hset', KEYS[1], unpack(ARGV))
return 1
"""
START_ENDED = 0  # the job had already ended: its answer stands, the model is not run again
START_MISSING = -1  # the job expired (or was never issued)
START_GAVE_UP = -2  # the job started too many times without ending (it kills its worker): failed `worker_lost`
STATS_FIELDS = ("executions", "reruns", "duplicate_deliveries", "duplicate_executions", "worker_lost", "republished")


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def new_job_id() -> str:
    """A random, URL-safe, unguessable job id."""
    return secrets.token_urlsafe(JOB_ID_BYTES)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, the format of every timestamp in a job."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_key(job_id: str) -> str:
    """The Redis hash that holds a job's record."""
    return f"{KEY_PREFIX}job:{job_id}"


def stats_key() -> str:
    """The Redis hash of the fleet's counters (executions, reruns, duplicates...): see STATS_FIELDS."""
    return f"{KEY_PREFIX}stats"


def unstarted_key(queue: str) -> str:
    """The sorted set of a queue's jobs that no worker has started yet, scored by enqueue time (epoch seconds)."""
    return f"{KEY_PREFIX}unstarted:{queue}"


def started_mark_key(queue: str) -> str:
    """The latest enqueue time (epoch seconds) of a job of this queue that a worker started."""
    return f"{KEY_PREFIX}started-mark:{queue}"


def upload_key(job_id: str) -> str:
    """The Redis string that holds a job's uploaded image until the job ends."""
    return f"{KEY_PREFIX}upload:{job_id}"


@dataclass(frozen=True)
class Job:
    """A job's record as stored in Redis and shown to clients."""

    id: str
    status: JobStatus
    question: str
    created_at: str
    image_url: str = ""
    answer: str = ""
    error_code: str = ""
    error_message: str = ""
    model: str = ""
    started_at: str = ""
    finished_at: str = ""
    owner: str = ""  # the name of the API key that made the job ("" when keys are off); never shown to clients

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Job:
        """Rebuild a job from its Redis hash."""
        known = {name: value for name, value in fields.items() if name in cls.__dataclass_fields__}
        known.pop("status")
        return cls(status=JobStatus(fields["status"]), **known)

    def to_redis(self) -> dict[str, str]:
        """The job as flat string fields for a Redis hash."""
        return {name: str(value) for name, value in asdict(self).items()}

    def to_public(self) -> dict[str, Any]:
        """The job as the API shows it: empty fields become null, the error becomes {code, message}."""
        error = {"code": self.error_code, "message": self.error_message} if self.error_code else None
        return {
            "id": self.id,
            "status": str(self.status),
            "question": self.question,
            "image_url": self.image_url or None,
            "answer": self.answer if self.status is JobStatus.SUCCEEDED else None,
            "error": error,
            "model": self.model or None,
            "created_at": self.created_at,
            "started_at": self.started_at or None,
            "finished_at": self.finished_at or None,
        }


class JobStore:
    """Reads and writes job records (and uploaded images) in Redis.

    The client must not decode responses: uploads are bytes, and the record's fields are decoded here.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._start = client.register_script(_START_LUA)
        self._finish_script = client.register_script(_FINISH_LUA)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, timeout_s: float = 5.0, outage_s: float = 0.0) -> JobStore:
        """A store on its own connection pool, with timeouts so a dead Redis fails fast instead of hanging.

        `outage_s` > 0 retries commands that fail for want of a connection for about that long: a worker that
        finishes a job while Redis restarts records the answer once Redis is back rather than losing it. The API
        keeps the default (a few quick retries) so that it answers 503 at once while Redis is away.
        """
        if outage_s > 0:
            retries = max(1, math.ceil(outage_s / OUTAGE_BACKOFF_CAP_S))
            retry = Retry(ExponentialBackoff(cap=OUTAGE_BACKOFF_CAP_S, base=0.05), retries)
        else:
            retry = Retry(NoBackoff(), API_RETRIES)
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=30,
            retry=retry,
        )
        return cls(client, ttl_s)

    def create(self, job: Job, queue: str, upload: bytes | None = None) -> None:
        """Write a new job record (and its uploaded image) atomically, both expiring after the TTL.

        The job also joins its queue's set of jobs never started, from which the reaper republishes a job whose
        message was lost (see worker/reaper.py).
        """
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), mapping=job.to_redis())  # type: ignore[arg-type]  # redis-py: invariant Mapping
            pipe.expire(job_key(job.id), self.ttl_s)
            if upload is not None:
                pipe.set(upload_key(job.id), upload, ex=self.ttl_s)
            pipe.zadd(unstarted_key(queue), {job.id: time.time()})
            pipe.execute()

    def delete(self, job_id: str, queue: str) -> None:
        """Remove a job and its upload (used when its task could not be enqueued)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(job_key(job_id), upload_key(job_id))
            pipe.zrem(unstarted_key(queue), job_id)
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None if it was never issued or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(job_key(job_id))  # type: ignore[assignment]
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    def start(self, job_id: str, queue: str, model: str, worker: str, max_attempts: int) -> int:
        """Record that a worker starts a run of the job; see _START_LUA for the return value."""
        message = f"the job was started {max_attempts} times and its worker died each time; it is not tried again"
        args: list[str | int] = [max_attempts, utc_now(), model, worker, message, job_id]
        keys = [job_key(job_id), stats_key(), unstarted_key(queue), started_mark_key(queue)]
        return int(self._start(keys=keys, args=args))

    def mark_succeeded(self, job_id: str, answer: str) -> int:
        """Record the job's answer, unless it already has one."""
        return self._finish(job_id, status=JobStatus.SUCCEEDED, answer=answer)

    def mark_failed(self, job_id: str, code: str, message: str) -> int:
        """Record why the job failed, unless it already ended."""
        return self._finish(job_id, status=JobStatus.FAILED, error_code=code, error_message=message)

    def load_upload(self, job_id: str) -> bytes | None:
        """The job's uploaded image bytes, or None if there are none (any more)."""
        data = self.client.get(upload_key(job_id))
        return data if isinstance(data, bytes) else None

    def stats(self) -> dict[str, int]:
        """The fleet's counters since Redis started keeping them (see STATS_FIELDS)."""
        raw: dict[bytes, bytes] = self.client.hgetall(stats_key())  # type: ignore[assignment]
        counts = {name.decode(): int(value) for name, value in raw.items()}
        return {name: counts.get(name, 0) for name in STATS_FIELDS}

    def _finish(self, job_id: str, **fields: str) -> int:
        args: list[str] = ["finished_at", utc_now()]
        for name, value in fields.items():
            args += [name, str(value)]
        written = int(self._finish_script(keys=[job_key(job_id), stats_key()], args=args))
        self.client.delete(upload_key(job_id))
        return written


def create_celery(redis_url: str, queue: str, result_ttl_s: int, time_limit_s: int = DEFAULT_TIME_LIMIT_S) -> Celery:
    """The Celery app both sides use: Redis broker and result backend, JSON only, one queue per model.

    `time_limit_s` is the hard limit of one job: the visibility timeout is derived from it, and must be the same
    in every process that uses the broker (Redis's transport uses the shortest one it is given).
    """
    visibility_timeout_s = visibility_timeout_for(time_limit_s)
    app = Celery("blipq", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message must not be able to run code in a worker
        result_accept_content=["json"],
        task_default_queue=queue,
        task_routes={TASK_VQA: {"queue": queue}},
        result_expires=result_ttl_s,
        # A job is acknowledged only once it ended (so a worker that dies mid-job has not acknowledged it)...
        task_acks_late=True,
        # ...and when a pool process dies mid-job, the main process puts the job back on the queue at once.
        task_reject_on_worker_lost=True,
        # With one pool process and late acknowledgement, a worker reserves only the job it runs: the rest stay on
        # the queue, free for other workers, and a worker that dies holds one job at most.
        worker_prefetch_multiplier=1,
        # A job that a dead worker had reserved (the whole worker killed, not only its pool process) comes back after
        # the visibility timeout: it must be above the longest a job may legitimately run, or a slow job would be
        # delivered a second time while it still runs. Celery reads it in three places; all three are set.
        broker_transport_options={"visibility_timeout": visibility_timeout_s, "socket_connect_timeout": 5},
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s},
        visibility_timeout=visibility_timeout_s,
        # A job that runs past its soft limit fails with `timeout`; past the hard one, its pool process is killed.
        task_soft_time_limit=max(1, time_limit_s - SOFT_LIMIT_MARGIN_S),
        task_time_limit=time_limit_s,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis to come back however long it is away
        broker_connection_timeout=5,
        redis_socket_connect_timeout=5,
        # The result backend retries its writes across a Redis restart instead of failing the task.
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        # The API must answer 503 quickly when Redis is away, not retry a publish for long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
    return app


def visibility_timeout_for(time_limit_s: int) -> int:
    """Seconds before a reserved, unacknowledged job is delivered again: above a job's longest legitimate run."""
    return time_limit_s + VISIBILITY_MARGIN_S
