"""Typed settings for the API process, read from BLIPQ_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from limits import parse_many

from api.auth import ApiKey, parse_api_keys
from worker.contract.errors import SettingsError
from worker.contract.redis_target import DEFAULT_MASTER, RedisTarget
from worker.contract.states import JobTask
from worker.settings import (
    DEFAULT_CAPTION_QUEUE,
    DEFAULT_JOB_TTL_S,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_QUEUE,
    DEFAULT_REDIS_URL,
    DEFAULT_TIME_LIMIT_S,
    LOG_FORMATS,
    env_int,
    env_redis_target,
    env_str,
    env_webhook_secret,
)

FORM_OVERHEAD_BYTES = 64 * 1024  # room for the multipart boundaries and text fields beside one image
# Answers waiting in a queue (single jobs and batch items not yet taken by a worker) beyond which submissions are
# refused (503 queue_full): about a minute of work for a few GPU workers, and a bound on what Redis holds for them.
DEFAULT_MAX_QUEUE_DEPTH = 100_000
DEFAULT_MAX_BATCH_UPLOAD_BYTES = 256 * 1024 * 1024  # a multipart batch's whole body: its images and its fields


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API process needs."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # Sentinel's addresses: the primary is found through them
    redis_master: str = DEFAULT_MASTER  # the name the sentinels know the primary by
    # Replicas that must hold a job (Redis WAIT) before it is answered 202; 0: answered once the primary holds it.
    min_replicas_ack: int = 0
    replica_ack_timeout_ms: int = 500  # how long to wait for them; then the job is withdrawn and answered 503
    queue: str = DEFAULT_QUEUE  # vqa jobs (`"task": "vqa"`, the default)
    caption_queue: str = DEFAULT_CAPTION_QUEUE  # caption jobs, served by captioning workers
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    job_time_limit_s: int = DEFAULT_TIME_LIMIT_S  # the workers' value: the visibility timeout derives from it
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_question_chars: int = 500
    api_keys: tuple[ApiKey, ...] = ()  # none: the API is open, as `blipq up` runs it
    rate_limit: str = ""  # job submissions per key (or client address), e.g. "120/minute"; "": no limit
    poll_rate_limit: str = ""  # reads of jobs per key (or client address), a budget of their own; "": no limit
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # 0: unbounded
    # Jobs for a task that no live worker serves wait for one (a fleet that scales from zero); off: refused, no_worker.
    wait_for_workers: bool = False
    tasks: tuple[JobTask, ...] = tuple(JobTask)  # the tasks this deployment serves: /readyz wants a worker for each
    log_format: str = "json"  # how `blipq api` logs (gunicorn and the app): json or text
    webhooks_enabled: bool = False  # BLIPQ_WEBHOOK_SECRET is set (the workers sign with it): jobs may name a webhook
    # Answers per chunk of a batch sent to the workers: one message; its texts share the worker's model calls.
    batch_chunk_size: int = 32
    max_batch_upload_bytes: int = DEFAULT_MAX_BATCH_UPLOAD_BYTES  # the body of a batch with uploaded images

    @property
    def redis(self) -> RedisTarget:
        """Where Redis is (worker/contract/redis_target.py)."""
        return RedisTarget(self.redis_url, self.redis_sentinels, self.redis_master)

    def queue_for(self, task: JobTask) -> str:
        """The queue of a job of this task: only workers with a model for that task read it."""
        return self.caption_queue if task is JobTask.CAPTION else self.queue

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: one image plus the form around it."""
        return self.max_image_bytes + FORM_OVERHEAD_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        """Build settings from the environment; raises SettingsError naming the variable at fault."""
        env = os.environ if env is None else env
        queue = env_str(env, "BLIPQ_QUEUE", DEFAULT_QUEUE)
        caption_queue = env_str(env, "BLIPQ_CAPTION_QUEUE", DEFAULT_CAPTION_QUEUE)
        if caption_queue == queue:  # a vqa worker would take caption jobs, and answer them as questions
            raise SettingsError(f"BLIPQ_CAPTION_QUEUE={caption_queue!r} must differ from BLIPQ_QUEUE")
        target = env_redis_target(env)
        return cls(
            redis_url=target.url,
            redis_sentinels=target.sentinels,
            redis_master=target.master,
            min_replicas_ack=env_int(env, "BLIPQ_MIN_REPLICAS_ACK", 0),
            replica_ack_timeout_ms=env_int(env, "BLIPQ_REPLICA_ACK_TIMEOUT_MS", 500, minimum=1),
            queue=queue,
            caption_queue=caption_queue,
            job_ttl_s=env_int(env, "BLIPQ_JOB_TTL_S", DEFAULT_JOB_TTL_S, minimum=60),
            job_time_limit_s=env_int(env, "BLIPQ_JOB_TIME_LIMIT_S", DEFAULT_TIME_LIMIT_S, minimum=15),
            max_image_bytes=env_int(env, "BLIPQ_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, minimum=1024),
            max_question_chars=env_int(env, "BLIPQ_MAX_QUESTION_CHARS", 500, minimum=1),
            api_keys=env_api_keys(env),
            rate_limit=env_rate_limit(env, "BLIPQ_RATE_LIMIT"),
            poll_rate_limit=env_rate_limit(env, "BLIPQ_POLL_RATE_LIMIT"),
            max_queue_depth=env_int(env, "BLIPQ_MAX_QUEUE_DEPTH", DEFAULT_MAX_QUEUE_DEPTH),
            wait_for_workers=env_str(env, "BLIPQ_WAIT_FOR_WORKERS", "off", ("on", "off")) == "on",
            tasks=env_tasks(env),
            batch_chunk_size=env_int(env, "BLIPQ_BATCH_CHUNK_SIZE", 32, minimum=1),
            max_batch_upload_bytes=env_int(
                env, "BLIPQ_MAX_BATCH_UPLOAD_BYTES", DEFAULT_MAX_BATCH_UPLOAD_BYTES, minimum=1024
            ),
            log_format=env_str(env, "BLIPQ_LOG_FORMAT", "json", LOG_FORMATS),
            webhooks_enabled=bool(env_webhook_secret(env)),
        )


def env_tasks(env: Mapping[str, str]) -> tuple[JobTask, ...]:
    """Read BLIPQ_TASKS: the tasks the deployment serves, comma-separated (vqa, caption); both by default."""
    names = [name.strip() for name in env.get("BLIPQ_TASKS", "").split(",") if name.strip()]
    known = ", ".join(task.value for task in JobTask)
    for name in names:
        if name not in known.split(", "):
            raise SettingsError(f"BLIPQ_TASKS: {name!r} is not a task ({known})")
    return tuple(JobTask(name) for name in dict.fromkeys(names)) or tuple(JobTask)


def env_api_keys(env: Mapping[str, str]) -> tuple[ApiKey, ...]:
    """Read the hashed API keys: lines of BLIPQ_API_KEYS_FILE, and entries of BLIPQ_API_KEY_HASHES (comma-separated).

    Both hold `name:sha256hex` entries (`blipq api-key new NAME` makes one); a name may appear only once.
    """
    keys = parse_api_keys(env.get("BLIPQ_API_KEY_HASHES", "").split(","), "BLIPQ_API_KEY_HASHES")
    path = env.get("BLIPQ_API_KEYS_FILE", "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise SettingsError(f"BLIPQ_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from None
        from_file = parse_api_keys(lines, f"BLIPQ_API_KEYS_FILE={path!r}")
        if not from_file:  # a file named but empty must not leave the API open
            raise SettingsError(f"BLIPQ_API_KEYS_FILE={path!r} holds no key: add one (`blipq api-key new NAME`)")
        keys += from_file
    names = [key.name for key in keys]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SettingsError(f"BLIPQ_API_KEYS_FILE / BLIPQ_API_KEY_HASHES: the name {duplicates[0]!r} is there twice")
    return keys


def env_rate_limit(env: Mapping[str, str], name: str) -> str:
    """Read a rate limit such as "120/minute" or "10/second;300/hour" (any of them stops a client); "" is none."""
    value = env.get(name, "").strip()
    if not value:
        return ""
    try:
        items = parse_many(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a rate limit such as 120/minute or 10/second;300/hour") from None
    if any(item.amount < 1 for item in items):
        raise SettingsError(f"{name}={value!r}: each limit must allow at least 1 request")
    return value
