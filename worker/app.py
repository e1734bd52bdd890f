"""The worker's Celery app: `celery -A worker.app worker` and `python -m worker` both use it."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from worker.jobs import create_celery
from worker.settings import WorkerSettings
from worker.tasks import WorkerRuntime, register_tasks


def create_worker_app(settings: WorkerSettings) -> Celery:
    """A Celery app whose pool processes each load the model once, after the fork, and keep it."""
    app = create_celery(settings.redis_url, settings.queue, settings.job_ttl_s)
    # Loading a large model takes longer than Celery's default 4 s wait for a new pool process.
    app.conf.worker_proc_alive_timeout = settings.model_load_timeout_s
    runtime = WorkerRuntime(settings)
    worker_process_init.connect(runtime.start, weak=False)
    register_tasks(app, runtime)
    return app


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app` looks up `app`: build it from the environment only when asked.
    if name == "app":
        return create_worker_app(WorkerSettings.from_env())
    raise AttributeError(name)
