"""The Celery app both sides use (Redis broker and result backend, JSON only), and how a job's message is sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS

from worker.settings import DEFAULT_TIME_LIMIT_S
from worker.states import BROKER_PRIORITY, JobPriority

if TYPE_CHECKING:
    from worker.jobs import Job

TASK_VQA = "blipq.vqa"
TASK_VQA_CHUNK = "blipq.vqa_chunk"  # a chunk of a batch's items: images, each with its (job id, question) pairs
SOFT_LIMIT_MARGIN_S = 10  # the soft limit comes this much earlier, so the job can record its `timeout` failure
VISIBILITY_MARGIN_S = 60  # beyond the hard limit, before a job reserved by a vanished worker is delivered again


def publish_job(celery: Celery, job: Job, queue: str) -> None:
    """Send the job's task message (task id = job id) at the job's priority.

    `task` tells the worker what `question` is: a question (vqa), or a caption's prompt ("" for none).
    """
    payload = {
        "job_id": job.id,
        "question": job.question,
        "image_url": job.image_url,
        "priority": str(job.priority),
        "task": str(job.task),
    }
    if job.upload_key:  # a batch item's uploaded image (a reaper's republish): the worker reads it there
        payload["upload"] = job.upload_key
    celery.send_task(TASK_VQA, args=[payload], task_id=job.id, queue=queue, priority=BROKER_PRIORITY[job.priority])


def publish_chunk(
    celery: Celery,
    queue: str,
    batch_id: str,
    number: int,
    images: list[dict[str, Any]],
    priority: JobPriority,
    task: str = "vqa",
) -> None:
    """Send chunk `number` of a batch (task id `<batch id>.<number>`) on the queue of its task, at its priority.

    `images` is one of worker.batches.plan_chunks's chunks: [{"image_url", "items": [[job id, text], ...]}, ...];
    an uploaded image names its Redis key instead: {"upload", "items"}. `task` says what the texts are: questions
    (vqa) or caption prompts ("" for none).
    """
    payload = {"batch_id": batch_id, "priority": str(priority), "images": images, "task": task}
    celery.send_task(
        TASK_VQA_CHUNK, args=[payload], task_id=f"{batch_id}.{number}", queue=queue, priority=BROKER_PRIORITY[priority]
    )


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
        task_routes={
            task: {"queue": queue, "priority": BROKER_PRIORITY[JobPriority.NORMAL]}
            for task in (TASK_VQA, TASK_VQA_CHUNK)
        },
        result_expires=result_ttl_s,
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
        # it still runs. Celery reads it in three places; all three are set.
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "socket_connect_timeout": 5,
            "priority_steps": list(PRIORITY_STEPS),  # kombu's default, named: BROKER_PRIORITY and the reaper need it
        },
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s},
        visibility_timeout=visibility_timeout_s,
        # Celery enforces these in a process pool only; blipq's workers time their jobs themselves (worker/tasks.py).
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
