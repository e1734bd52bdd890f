"""The worker's Celery app: `celery -A worker.app worker` and `python -m worker` both use it."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from worker.jobs import JobStore, create_celery, visibility_timeout_for
from worker.reaper import ReaperPolicy, ReaperThread
from worker.settings import WorkerSettings
from worker.tasks import WorkerRuntime, register_tasks

log = logging.getLogger("blipq.worker")


def create_worker_app(settings: WorkerSettings) -> Celery:
    """A Celery app whose pool processes each load the model once, after the fork, and keep it."""
    app = create_celery(settings.redis_url, settings.queue, settings.job_ttl_s, settings.job_time_limit_s)
    app.conf.update(
        # Loading a large model takes longer than Celery's default 4 s wait for a new pool process.
        worker_proc_alive_timeout=settings.model_load_timeout_s,
        # Soft shutdown (SIGTERM is mapped to it by `python -m worker`): the running job gets this long to finish,
        # then the worker stops and puts it back on the queue, rather than a deploy waiting on it without end.
        worker_soft_shutdown_timeout=settings.shutdown_grace_s,
    )
    runtime = WorkerRuntime(settings)
    worker_process_init.connect(runtime.start, weak=False)
    register_tasks(app, runtime)
    if settings.reaper_interval_s > 0:
        start_reaper_when_ready(app, settings)
    return app


def start_reaper_when_ready(app: Celery, settings: WorkerSettings) -> None:
    """Run the reaper of this worker's queue in a thread of the main process once the worker is ready."""
    time_limit_s = settings.job_time_limit_s
    policy = ReaperPolicy(behind_mark_s=time_limit_s, waiting_s=visibility_timeout_for(time_limit_s))

    def start(**_: Any) -> None:
        store = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
        # A Celery app of its own to publish with: the worker's connections belong to its event loop and thread.
        publisher = create_celery(settings.redis_url, settings.queue, settings.job_ttl_s, time_limit_s)
        ReaperThread(store, publisher, settings.queue, policy, settings.reaper_interval_s).start()
        log.info("reaper of queue %s: a look every %g s", settings.queue, settings.reaper_interval_s)

    worker_ready.connect(start, weak=False)


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app` looks up `app`: build it from the environment only when asked.
    if name == "app":
        return create_worker_app(WorkerSettings.from_env())
    raise AttributeError(name)
