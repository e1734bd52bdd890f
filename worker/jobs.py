"""The job contract shared by the API and the workers: states, Redis keys, the task name and the Celery app.

Imports neither Flask nor torch. A job is a Redis hash that the API creates and the worker moves through
queued -> running -> succeeded | failed; it expires `job_ttl_s` after submission.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from celery import Celery

TASK_VQA = "blipq.vqa"
KEY_PREFIX = "blipq:"
JOB_ID_BYTES = 16  # 128 random bits: ids are unguessable

# Moves a job to a new state unless it has expired or already ended: an answer, once written, never changes.
# KEYS[1] = job hash; ARGV = field, value, ... Returns 1 when written, 0 when the job had ended, -1 when missing.
_TRANSITION_LUA = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local status = redis.call('hget', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV))
return 1
"""


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
        self._transition = client.register_script(_TRANSITION_LUA)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, timeout_s: float = 5.0) -> JobStore:
        """A store on its own connection pool, with timeouts so a dead Redis fails fast instead of hanging."""
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(client, ttl_s)

    def create(self, job: Job, upload: bytes | None = None) -> None:
        """Write a new job record (and its uploaded image) atomically, both expiring after the TTL."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), mapping=job.to_redis())  # type: ignore[arg-type]  # redis-py: invariant Mapping
            pipe.expire(job_key(job.id), self.ttl_s)
            if upload is not None:
                pipe.set(upload_key(job.id), upload, ex=self.ttl_s)
            pipe.execute()

    def delete(self, job_id: str) -> None:
        """Remove a job and its upload (used when its task could not be enqueued)."""
        self.client.delete(job_key(job_id), upload_key(job_id))

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None if it was never issued or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(job_key(job_id))  # type: ignore[assignment]
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    def mark_running(self, job_id: str, model: str) -> int:
        """Record that a worker started the job; see _TRANSITION_LUA for the return value."""
        return self._move(job_id, status=JobStatus.RUNNING, started_at=utc_now(), model=model)

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

    def _finish(self, job_id: str, **fields: str) -> int:
        written = self._move(job_id, finished_at=utc_now(), **fields)
        self.client.delete(upload_key(job_id))
        return written

    def _move(self, job_id: str, **fields: str) -> int:
        args: list[str] = []
        for name, value in fields.items():
            args += [name, str(value)]
        return int(self._transition(keys=[job_key(job_id)], args=args))


def create_celery(redis_url: str, queue: str, result_ttl_s: int) -> Celery:
    """The Celery app both sides use: Redis broker and result backend, JSON only, one queue per model."""
    app = Celery("blipq", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message must not be able to run code in a worker
        result_accept_content=["json"],
        task_default_queue=queue,
        task_routes={TASK_VQA: {"queue": queue}},
        result_expires=result_ttl_s,
        # A job is acknowledged only once it ended, and goes back to the queue if its worker dies mid-job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one job beyond the running one: others stay free to take
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={"socket_connect_timeout": 5},
        redis_socket_connect_timeout=5,
        # The API must answer 503 quickly when Redis is away, not retry a publish for long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
    return app
