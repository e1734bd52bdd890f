"""The job contract shared by the API and the workers: states, priorities, Redis keys, the task name and the Celery app.

Imports neither Flask nor torch. A job is a Redis hash that the API creates and that moves through
queued -> running -> succeeded | failed, or ends without running: canceled (a cancel while it was queued) or expired
(still queued at its deadline). Every change of state is a Lua script below, so that a job that ended never changes
again, and a job that names a webhook gets its delivery queued in the same script that ends it (worker/webhooks.py
sends it). A job expires `job_ttl_s` after submission.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS, Channel
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

DEADLINE_MESSAGE = "the job was still queued at its deadline; it was not run"
CANCELED_MESSAGE = "the job was canceled before it started; it was not run"
CANCELED_RERUN_MESSAGE = "the job was canceled while it ran and its worker died; it is not run again"


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"  # canceled while queued: never run
    EXPIRED = "expired"  # still queued at its deadline: never run


ENDED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED})


class JobPriority(StrEnum):
    """How soon a job runs relative to the other jobs of its queue."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# kombu's Redis transport keeps one list per priority step and BRPOPs step 0's list first: a LOWER number runs
# SOONER (the reverse of AMQP). 0, 3 and 6 are steps of kombu's own PRIORITY_STEPS, so each level has a list of its
# own and a level is first in, first out (worker/reaper.py relies on that).
BROKER_PRIORITY = {JobPriority.HIGH: 0, JobPriority.NORMAL: 3, JobPriority.LOW: 6}

# What every script below starts with. `end_job` writes the final fields, deletes the upload and, when the job names
# a webhook, puts its delivery in the outbox, due now: in the same script, so an ended job's webhook is never lost.
_LUA_LIBRARY = (
    "local ENDED = {"
    + ", ".join(f"{status}=true" for status in sorted(ENDED_STATUSES))
    + """}
local function end_job(job, upload, outbox, now, fields)
  redis.call('hset', job, unpack(fields))
  redis.call('del', upload)
  local webhook = redis.call('hget', job, 'webhook')
  if webhook and webhook ~= '' then
    redis.call('hset', job, 'webhook_status', 'pending')
    redis.call('zadd', outbox, now, redis.call('hget', job, 'id'))
  end
end
local function overdue(job, now)
  local deadline = redis.call('hget', job, 'deadline_at')
  return deadline and deadline ~= '' and tonumber(now) >= tonumber(deadline)
end
local function expire(job, upload, outbox, unstarted, deadlines, id, now, finished_at, message)
  redis.call('zrem', unstarted, id)
  redis.call('zrem', deadlines, id)
  end_job(job, upload, outbox, now, {'status', 'expired', 'error_code', 'deadline_exceeded', 'error_message', message,
                                     'finished_at', finished_at})
end
"""
)

# Starts a run of a job, unless it expired, ended or was canceled; counts its attempts and gives up after too many.
# It also takes the job off its level's set of jobs never started, and moves the level's mark (the latest enqueue
# time of a job started) forward: see worker/reaper.py. A job still queued at its deadline ends `expired` here, and
# one whose cancel was asked while it ran (its worker died since) ends `canceled`: neither runs.
# KEYS = job hash, stats hash, never-started set, mark, upload, webhook outbox, deadlines set;
# ARGV = max attempts, started_at, model, worker, gave-up message, job id, now (epoch s), deadline message,
# canceled-rerun message. Returns the attempt number (>= 1) or one of the START_* codes below.
_START_LUA = (
    _LUA_LIBRARY
    + """
local enqueued = redis.call('zscore', KEYS[3], ARGV[6])
if enqueued then
  redis.call('zrem', KEYS[3], ARGV[6])
  local mark = redis.call('get', KEYS[4])
  if (not mark) or tonumber(enqueued) > tonumber(mark) then redis.call('set', KEYS[4], enqueued) end
end
redis.call('zrem', KEYS[7], ARGV[6])
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if status == 'canceled' then return -3 end
if status == 'expired' then return -4 end
if ENDED[status] then
  redis.call('hincrby', KEYS[2], 'duplicate_deliveries', 1)
  return 0
end
if status == 'queued' and overdue(KEYS[1], ARGV[7]) then
  expire(KEYS[1], KEYS[5], KEYS[6], KEYS[3], KEYS[7], ARGV[6], ARGV[7], ARGV[2], ARGV[8])
  return -4
end
if status ~= 'queued' and redis.call('hget', KEYS[1], 'cancel_requested') == '1' then
  end_job(KEYS[1], KEYS[5], KEYS[6], ARGV[7], {'status', 'canceled', 'error_code', 'canceled', 'error_message', ARGV[9],
                                               'finished_at', ARGV[2]})
  return -3
end
local attempt = redis.call('hincrby', KEYS[1], 'attempts', 1)
if attempt > tonumber(ARGV[1]) then
  end_job(KEYS[1], KEYS[5], KEYS[6], ARGV[7], {'status', 'failed', 'error_code', 'worker_lost',
                                               'error_message', ARGV[5], 'finished_at', ARGV[2]})
  redis.call('hincrby', KEYS[2], 'worker_lost', 1)
  return -2
end
redis.call('hset', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'model', ARGV[3], 'worker', ARGV[4])
redis.call('hincrby', KEYS[2], 'executions', 1)
if attempt > 1 then redis.call('hincrby', KEYS[2], 'reruns', 1) end
return attempt
"""
)

# Ends a job with its outcome unless it already ended: an answer, once written, never changes. Two runs of one job
# (a redelivery racing a slow worker) publish one answer; the later one is counted as a duplicate execution.
# KEYS = job hash, stats hash, upload, webhook outbox; ARGV = now (epoch s), then field, value, ...
# Returns 1 when written, 0 when the job had ended, -1 when it is missing (expired).
_FINISH_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
if ENDED[redis.call('hget', KEYS[1], 'status')] then
  redis.call('hincrby', KEYS[2], 'duplicate_executions', 1)
  return 0
end
end_job(KEYS[1], KEYS[3], KEYS[4], ARGV[1], {unpack(ARGV, 2)})
return 1
"""
)

# Cancels a job: a queued one ends `canceled` at once (its message, when a worker takes it, is refused by the start
# script); a running one is marked `cancel_requested` and runs to its end. A queued job already past its deadline
# ends `expired` instead, as its next read would show. KEYS and ARGV: as _EXPIRE_LUA's, then the cancel message.
# Returns one of the CANCEL_* codes below.
_CANCEL_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if ENDED[status] then return 0 end
if status == 'queued' and overdue(KEYS[1], ARGV[1]) then
  expire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
  return 0
end
redis.call('hset', KEYS[1], 'cancel_requested', '1')
if status ~= 'queued' then return 2 end
redis.call('zrem', KEYS[4], ARGV[3])
redis.call('zrem', KEYS[5], ARGV[3])
end_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], {'status', 'canceled', 'error_code', 'canceled', 'error_message', ARGV[5],
                                             'finished_at', ARGV[2]})
return 1
"""
)

# Ends a queued job `expired` if it is past its deadline (a read by the API, the reaper's look at due deadlines).
# KEYS = job hash, upload, webhook outbox, never-started set, deadlines set; ARGV = now (epoch s), finished_at, job id,
# deadline message. Returns 1 when it expired the job, 0 when not, -1 when the job is missing.
_EXPIRE_LUA = (
    _LUA_LIBRARY
    + """
if redis.call('exists', KEYS[1]) == 0 then
  redis.call('zrem', KEYS[5], ARGV[3])
  return -1
end
if redis.call('hget', KEYS[1], 'status') ~= 'queued' then
  redis.call('zrem', KEYS[5], ARGV[3])
  return 0
end
if not overdue(KEYS[1], ARGV[1]) then return 0 end
expire(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[1], ARGV[2], ARGV[4])
return 1
"""
)

# Claims an idempotency key for a request that is about to store its job, or returns the claim that holds it.
# KEYS = the key; ARGV = claim, seconds it holds before the job is stored.
_CLAIM_KEY_LUA = """
local held = redis.call('get', KEYS[1])
if held then return held end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
# Frees an idempotency key, only if it still holds this claim. KEYS = the key; ARGV = claim.
_RELEASE_KEY_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

START_ENDED = 0  # the job had already ended: its answer stands, the model is not run again
START_MISSING = -1  # the job expired (or was never issued)
START_GAVE_UP = -2  # the job started too many times without ending (it kills its worker): failed `worker_lost`
START_CANCELED = -3  # the job was canceled: it is not run
START_EXPIRED = -4  # the job was still queued at its deadline: it is (now) `expired`, not run
CANCEL_MISSING = -1  # no such job (expired)
CANCEL_ENDED = 0  # the job had ended (or just expired at its deadline): nothing to cancel
CANCEL_DONE = 1  # the job was queued: it is now `canceled` and will never run
CANCEL_REQUESTED = 2  # the job is running: it runs to its end, with `cancel_requested` set
STATS_FIELDS = ("executions", "reruns", "duplicate_deliveries", "duplicate_executions", "worker_lost", "republished")


def new_job_id() -> str:
    """A random, URL-safe, unguessable job id."""
    return secrets.token_urlsafe(JOB_ID_BYTES)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, the format of every timestamp in a job."""
    return utc_iso(time.time())


def utc_iso(epoch_s: float) -> str:
    """A time in epoch seconds as an ISO 8601 UTC string with milliseconds."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_key(job_id: str) -> str:
    """The Redis hash that holds a job's record."""
    return f"{KEY_PREFIX}job:{job_id}"


def stats_key() -> str:
    """The Redis hash of the fleet's counters (executions, reruns, duplicates...): see STATS_FIELDS."""
    return f"{KEY_PREFIX}stats"


def unstarted_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The sorted set of a queue level's jobs that no worker has started yet, scored by enqueue time (epoch seconds).

    The normal level keeps the name the whole queue had before priorities, so jobs queued across an upgrade stay
    watched by the reaper.
    """
    suffix = "" if priority is JobPriority.NORMAL else f":{priority}"
    return f"{KEY_PREFIX}unstarted:{queue}{suffix}"


def started_mark_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The latest enqueue time (epoch seconds) of a job of this queue level that a worker started."""
    suffix = "" if priority is JobPriority.NORMAL else f":{priority}"
    return f"{KEY_PREFIX}started-mark:{queue}{suffix}"


def broker_list_key(queue: str, priority: JobPriority) -> str:
    """The Redis list where kombu keeps the waiting messages of a queue level (one list per priority step)."""
    step = BROKER_PRIORITY[priority]
    return f"{queue}{Channel.sep}{step}" if step else queue


def deadlines_key(queue: str) -> str:
    """The sorted set of a queue's queued jobs that have a deadline, scored by it (epoch seconds)."""
    return f"{KEY_PREFIX}deadlines:{queue}"


def webhook_outbox_key() -> str:
    """The sorted set of webhook deliveries to make, job ids scored by when the next attempt is due (epoch seconds)."""
    return f"{KEY_PREFIX}webhooks:due"


def upload_key(job_id: str) -> str:
    """The Redis string that holds a job's uploaded image until the job ends."""
    return f"{KEY_PREFIX}upload:{job_id}"


def idempotency_key(owner: str, key: str) -> str:
    """The Redis string that ties an Idempotency-Key of an API key owner to its job (hashed: keys are arbitrary)."""
    digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    return f"{KEY_PREFIX}idempotency:{digest}"


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
    priority: JobPriority = JobPriority.NORMAL
    deadline_at: str = ""  # epoch seconds: still queued then, the job ends `expired`; "" for none
    cancel_requested: bool = False
    webhook: str = ""  # the URL told when the job ends; "" for none
    webhook_status: str = ""  # "" until the job ends, then pending -> delivered | failed
    webhook_attempts: int = 0
    webhook_error_code: str = ""  # the last attempt's failure
    webhook_error_message: str = ""

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Job:
        """Rebuild a job from its Redis hash."""
        known: dict[str, Any] = {name: value for name, value in fields.items() if name in cls.__dataclass_fields__}
        known["status"] = JobStatus(fields["status"])
        known["priority"] = JobPriority(fields.get("priority") or JobPriority.NORMAL)
        known["cancel_requested"] = fields.get("cancel_requested") == "1"
        known["webhook_attempts"] = int(fields.get("webhook_attempts") or 0)
        return cls(**known)

    def to_redis(self) -> dict[str, str]:
        """The job as flat string fields for a Redis hash (a flag is "1" or "")."""
        return {
            name: ("1" if value else "") if isinstance(value, bool) else str(value)
            for name, value in asdict(self).items()
        }

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
            "priority": str(self.priority),
            "deadline_at": utc_iso(float(self.deadline_at)) if self.deadline_at else None,
            "cancel_requested": self.cancel_requested,
            "webhook": self.webhook or None,
            "webhook_delivery": self._webhook_delivery(),
        }

    def to_webhook_body(self) -> dict[str, Any]:
        """What a webhook receives: the public job, less the state of the delivery itself."""
        body = self.to_public()
        del body["webhook_delivery"]
        return body

    def overdue(self, now: float) -> bool:
        """Whether the job is queued past its deadline (it ends `expired` as soon as anyone looks)."""
        return self.status is JobStatus.QUEUED and bool(self.deadline_at) and now >= float(self.deadline_at)

    def _webhook_delivery(self) -> dict[str, Any] | None:
        if not self.webhook_status:
            return None
        error = {"code": self.webhook_error_code, "message": self.webhook_error_message}
        return {
            "status": self.webhook_status,
            "attempts": self.webhook_attempts,
            "error": error if self.webhook_error_code else None,
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
        self._cancel = client.register_script(_CANCEL_LUA)
        self._expire = client.register_script(_EXPIRE_LUA)
        self._claim_key = client.register_script(_CLAIM_KEY_LUA)
        self._release_key = client.register_script(_RELEASE_KEY_LUA)

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

    def create(
        self, job: Job, queue: str, upload: bytes | None = None, idempotency: tuple[str, str] | None = None
    ) -> None:
        """Write a new job record (and its uploaded image) atomically, both expiring after the TTL.

        The job also joins its queue level's set of jobs never started, from which the reaper republishes a job
        whose message was lost (see worker/reaper.py), and its queue's set of deadlines if it has one.
        `idempotency` (key, claim) ties an Idempotency-Key to the job for as long as the job lives.
        """
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), mapping=job.to_redis())  # type: ignore[arg-type]  # redis-py: invariant Mapping
            pipe.expire(job_key(job.id), self.ttl_s)
            if upload is not None:
                pipe.set(upload_key(job.id), upload, ex=self.ttl_s)
            pipe.zadd(unstarted_key(queue, job.priority), {job.id: time.time()})
            if job.deadline_at:
                pipe.zadd(deadlines_key(queue), {job.id: float(job.deadline_at)})
            if idempotency is not None:
                pipe.set(idempotency[0], idempotency[1], ex=self.ttl_s)
            pipe.execute()

    def delete(self, job: Job, queue: str) -> None:
        """Remove a job and its upload (used when its task could not be enqueued)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(job_key(job.id), upload_key(job.id))
            pipe.zrem(unstarted_key(queue, job.priority), job.id)
            pipe.zrem(deadlines_key(queue), job.id)
            pipe.execute()

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None if it was never issued or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(job_key(job_id))  # type: ignore[assignment]
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    def start(
        self,
        job_id: str,
        queue: str,
        model: str,
        worker: str,
        max_attempts: int,
        priority: JobPriority = JobPriority.NORMAL,
    ) -> int:
        """Record that a worker starts a run of the job; see _START_LUA for the return value."""
        message = f"the job was started {max_attempts} times and its worker died each time; it is not tried again"
        args: list[str | int | float] = [max_attempts, utc_now(), model, worker, message, job_id, time.time()]
        args += [DEADLINE_MESSAGE, CANCELED_RERUN_MESSAGE]
        keys = [job_key(job_id), stats_key(), unstarted_key(queue, priority), started_mark_key(queue, priority)]
        keys += [upload_key(job_id), webhook_outbox_key(), deadlines_key(queue)]
        return int(self._start(keys=keys, args=args))

    def cancel(self, job: Job, queue: str) -> int:
        """Cancel the job: see _CANCEL_LUA; returns one of the CANCEL_* codes."""
        keys, args = self._queued_job_keys(job, queue)
        return int(self._cancel(keys=keys, args=[*args, CANCELED_MESSAGE]))

    def expire_if_overdue(self, job: Job, queue: str) -> bool:
        """End the job `expired` if it is still queued past its deadline; whether it did."""
        keys, args = self._queued_job_keys(job, queue)
        return int(self._expire(keys=keys, args=args)) == 1

    def overdue_job_ids(self, queue: str, now: float, limit: int) -> list[str]:
        """Up to `limit` ids of the queue's jobs whose deadline has passed while they were queued."""
        members: list[bytes] = self.client.zrangebyscore(  # type: ignore[assignment]
            deadlines_key(queue), "-inf", now, start=0, num=limit
        )
        return [member.decode() for member in members]

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

    def claim_idempotency_key(self, key: str, claim: str, pending_s: int) -> str | None:
        """Claim `key` for `claim` for `pending_s` (until the job is stored); None when claimed, else what holds it."""
        held = self._claim_key(keys=[key], args=[claim, pending_s])
        return held.decode() if isinstance(held, bytes) else None

    def release_idempotency_key(self, key: str, claim: str) -> None:
        """Free `key` if it still holds `claim` (its job could not be stored or enqueued)."""
        self._release_key(keys=[key], args=[claim])

    def stats(self) -> dict[str, int]:
        """The fleet's counters since Redis started keeping them (see STATS_FIELDS)."""
        raw: dict[bytes, bytes] = self.client.hgetall(stats_key())  # type: ignore[assignment]
        counts = {name.decode(): int(value) for name, value in raw.items()}
        return {name: counts.get(name, 0) for name in STATS_FIELDS}

    def _finish(self, job_id: str, **fields: str) -> int:
        args: list[str | float] = [time.time(), "finished_at", utc_now()]
        for name, value in fields.items():
            args += [name, str(value)]
        keys = [job_key(job_id), stats_key(), upload_key(job_id), webhook_outbox_key()]
        return int(self._finish_script(keys=keys, args=args))

    @staticmethod
    def _queued_job_keys(job: Job, queue: str) -> tuple[list[str], list[str | float]]:
        keys = [job_key(job.id), upload_key(job.id), webhook_outbox_key()]
        keys += [unstarted_key(queue, job.priority), deadlines_key(queue)]
        return keys, [time.time(), utc_now(), job.id, DEADLINE_MESSAGE]


def publish_job(celery: Celery, job: Job, queue: str) -> None:
    """Send the job's task message (task id = job id) at the job's priority."""
    payload = {"job_id": job.id, "question": job.question, "image_url": job.image_url, "priority": str(job.priority)}
    celery.send_task(TASK_VQA, args=[payload], task_id=job.id, queue=queue, priority=BROKER_PRIORITY[job.priority])


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
        # A message sent without a priority (by hand, or by an older API) waits with the normal jobs, not before them.
        task_routes={TASK_VQA: {"queue": queue, "priority": BROKER_PRIORITY[JobPriority.NORMAL]}},
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
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "socket_connect_timeout": 5,
            "priority_steps": list(PRIORITY_STEPS),  # kombu's default, named: BROKER_PRIORITY and the reaper need it
        },
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
