"""The Celery app both sides use (Redis broker and result backend, JSON only), and how a job's message is sent."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS

from contract.redis_target import RedisTarget, as_target
from contract.settings import DEFAULT_TIME_LIMIT_S
from contract.states import BROKER_PRIORITY, JobPriority

if TYPE_CHECKING:
    from contract.jobs import Job

TASK_VQA = "blipq.vqa"
TASK_VQA_CHUNK = "blipq.vqa_chunk"  # a chunk of a batch's items: images, each with its (item index, text) pairs
SOFT_LIMIT_MARGIN_S = 10  # the soft limit comes this much earlier, so the job can record its `timeout` failure
VISIBILITY_MARGIN_S = 60  # beyond the hard limit, before a job reserved by a vanished worker is delivered again
# A message header: when it was published (epoch seconds, taken before the publish). A level's list is first in, first
# out, so a job accepted before the message at the head of its list was published has left the list (worker/reaper.py).
PUBLISHED_HEADER = "blipq_published_at"


def publish_job(celery: Celery, job: Job, queue: str, published_at: float | None = None) -> None:
    """Send the job's task message (task id = job id) at the job's priority, stamped `published_at` (default: now).

    `task` tells the worker what `question` is: a question (vqa), or a caption's prompt ("" for none).
    """
    payload = {
        "job_id": job.id,
        "question": job.question,
        "image_url": job.image_url,
        "priority": str(job.priority),
        "task": str(job.task),
    }
    headers = {PUBLISHED_HEADER: time.time() if published_at is None else published_at}
    priority = BROKER_PRIORITY[job.priority]
    celery.send_task(TASK_VQA, args=[payload], task_id=job.id, queue=queue, priority=priority, headers=headers)


def publish_chunk(celery: Celery, queue: str, payload: dict[str, Any], published_at: float | None = None) -> None:
    """Send a chunk of a batch (task id `<batch id>.<number>`) on the queue of its task, at its priority, stamped
    `published_at` (default: now).

    `payload` is one of the chunks contract.batch_store.BatchStore.create stored: {"batch_id", "number", "member",
    "priority", "task", "images": [{"image_url" | "upload", "items": [[index, text], ...]}, ...]}; `task` says what
    the texts are: questions (vqa) or caption prompts ("" for none).
    """
    priority = BROKER_PRIORITY[JobPriority(payload["priority"])]
    task_id = f"{payload['batch_id']}.{payload['number']}"
    headers = {PUBLISHED_HEADER: time.time() if published_at is None else published_at}
    celery.send_task(TASK_VQA_CHUNK, args=[payload], task_id=task_id, queue=queue, priority=priority, headers=headers)


def create_celery(where: RedisTarget | str, queue: str, time_limit_s: int = DEFAULT_TIME_LIMIT_S) -> Celery:
    """The Celery app both sides use: a Redis broker, JSON only, one queue per model, no result backend.

    Outcomes live in the job and batch records, written by the scripts that end them; a second copy in Celery's
    result backend would cost Redis memory and a write per message, and nothing would read it.

    `time_limit_s` is the hard limit of one job: the visibility timeout is derived from it, and must be the same
    in every process that uses the broker (Redis's transport uses the shortest one it is given).
    """
    target = as_target(where)
    visibility_timeout_s = visibility_timeout_for(time_limit_s)
    app = Celery("blipq", broker=target.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # never pickle: a message must not be able to run code in a worker
        task_ignore_result=True,
        task_default_queue=queue,
        # A message sent without a priority (by hand, or by an older API) waits with the normal jobs, not before them.
        task_routes={
            task: {"queue": queue, "priority": BROKER_PRIORITY[JobPriority.NORMAL]}
            for task in (TASK_VQA, TASK_VQA_CHUNK)
        },
        # A job is acknowledged only once it ended (so a worker that dies mid-job has not acknowledged it)...
        task_acks_late=True,
        # ...(a process pool would also put back at once the job of a pool process that died mid-job; blipq's
        # workers run a thread pool, and the reaper republishes the jobs of a worker that died)...
        task_reject_on_worker_lost=True,
        # ...and a worker reserves one message per pool thread (BLIPQ_WORKER_CONCURRENCY), each started at once: the
        # rest stay on the queue, free for other workers.
        worker_prefetch_multiplier=1,
        # A job that a dead worker had reserved comes back after the visibility timeout (the reaper is quicker): it
        # must be above the longest a job may legitimately run, or a slow job would be delivered a second time while
        # it still runs. Celery reads it in two places; both are set.
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "socket_connect_timeout": 5,
            "priority_steps": list(PRIORITY_STEPS),  # kombu's default, named: BROKER_PRIORITY and the reaper need it
            **target.broker_options,  # with Sentinel, the primary's name
        },
        visibility_timeout=visibility_timeout_s,
        # No Celery time limits: it enforces them in a process pool only. blipq's workers time their jobs themselves
        # (worker/tasks.py: a job fails `timeout` SOFT_LIMIT_MARGIN_S before the limit; worker/batching.py: a model
        # call past the limit ends the worker).
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis to come back however long it is away
        broker_connection_timeout=5,
        redis_socket_connect_timeout=5,
        # The API must answer 503 quickly when Redis is away, not retry a publish for long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
    return app


def visibility_timeout_for(time_limit_s: int) -> int:
    """Seconds before a reserved, unacknowledged job is delivered again: above a job's longest legitimate run."""
    return time_limit_s + VISIBILITY_MARGIN_S
