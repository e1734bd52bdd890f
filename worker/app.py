"""The worker's Celery app: `celery -A worker.app worker` and `python -m worker` both use it."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown

from worker.broker import create_celery, visibility_timeout_for
from worker.jobs import JobStore
from worker.logs import use_json_logs_in_celery
from worker.metrics import WorkerOps
from worker.netguard import NetworkPolicy
from worker.reaper import ReaperPolicy, ReaperThread
from worker.settings import WorkerSettings
from worker.tasks import WorkerRuntime, register_tasks
from worker.webhooks import WebhookPolicy, WebhookSender

log = logging.getLogger("blipq.worker")

WEBHOOK_SENDERS = 4  # sender threads per worker: a few slow receivers do not hold up every other delivery


def create_worker_app(settings: WorkerSettings) -> Celery:
    """A Celery app whose worker loads the model once, before it takes messages, and keeps it.

    The thread pool runs one thread per message held (`concurrency`): they fetch images while the model answers,
    and the model answers the texts of many messages at once (worker/batching.py). With late acknowledgement and a
    prefetch multiplier of 1, a worker holds at most `concurrency` messages: the rest wait on the queue for others.
    Time limits are the worker's own (Celery's are not enforced in a thread pool): a job fails `timeout` after
    BLIPQ_JOB_TIME_LIMIT_S less 10 s, and a model call that runs past the limit ends the worker.
    """
    app = create_celery(settings.redis_url, settings.queue, settings.job_ttl_s, settings.job_time_limit_s)
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # Soft shutdown (SIGTERM is mapped to it by `python -m worker`): the running job gets this long to finish,
        # then the worker stops and puts it back on the queue, rather than a deploy waiting on it without end.
        worker_soft_shutdown_timeout=settings.shutdown_grace_s,
    )
    runtime = WorkerRuntime(settings)
    ops = WorkerOps(runtime, settings)  # metrics, the readiness record, a log line per job: around the model load
    worker_init.connect(ops.before_model_load, weak=False)
    worker_init.connect(runtime.start, weak=False)
    worker_init.connect(ops.after_model_load, weak=False)
    worker_shutdown.connect(runtime.stop, weak=False)
    register_tasks(app, runtime)
    ops.connect()
    if settings.log_format == "json":
        use_json_logs_in_celery()
    if settings.reaper_interval_s > 0:
        start_reaper_when_ready(app, settings)
    start_webhook_senders_when_ready(app, settings)
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


def start_webhook_senders_when_ready(app: Celery, settings: WorkerSettings) -> None:
    """Deliver the fleet's due webhooks from threads of the main process once the worker is ready (needs a secret)."""
    if not settings.webhook_secret:
        log.info("no BLIPQ_WEBHOOK_SECRET: this worker delivers no webhooks")
        return
    policy = WebhookPolicy(
        settings.webhook_secret, settings.webhook_max_attempts, settings.webhook_timeout_s, settings.webhook_backoff_s
    )
    network_policy = NetworkPolicy(settings.fetch_allow_networks, settings.fetch_allow_ports)

    def start(**_: Any) -> None:
        store = JobStore.from_url(settings.redis_url, settings.job_ttl_s)
        for number in range(WEBHOOK_SENDERS):
            WebhookSender(store, policy, network_policy, f"blipq-webhooks-{number}").start()
        log.info("webhooks: %d senders", WEBHOOK_SENDERS)

    worker_ready.connect(start, weak=False)


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app` looks up `app`: build it from the environment only when asked.
    if name == "app":
        return create_worker_app(WorkerSettings.from_env())
    raise AttributeError(name)
