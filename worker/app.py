"""The worker's Celery app: `celery -A worker.app worker` and `python -m worker` both use it."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import (
    task_postrun,
    task_received,
    worker_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from contract.broker import create_celery
from contract.fleet import fleet_client, worker_identity
from contract.job_store import JobStore
from contract.logs import use_json_logs_in_celery
from worker.metrics import WorkerOps
from worker.netguard import NetworkPolicy
from worker.prefetch_bound import Intake
from worker.reaper import ReaperPolicy, ReaperThread
from worker.receipts import Receipts
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings
from worker.tasks import register_tasks
from worker.webhooks import WebhookPolicy, WebhookSender

log = logging.getLogger("blipq.worker")

WEBHOOK_SENDERS = 4  # sender threads per worker: a few slow receivers do not hold up every other delivery


def create_worker_app(settings: WorkerSettings) -> Celery:
    """A Celery app whose worker loads the model once, before it takes messages, and keeps it.

    The thread pool runs one thread per message held (`concurrency`): they fetch images while the model answers,
    and the model answers the texts of many messages at once (worker/batching.py). With late acknowledgement and a
    prefetch multiplier of 1, a worker holds at most `concurrency` messages, and takes one only while it holds fewer
    than `intake` answers (worker/prefetch_bound.py): the rest wait on the queue, for it or for others.
    Time limits are the worker's own (Celery's are not enforced in a thread pool): a job fails `timeout` after
    BLIPQ_JOB_TIME_LIMIT_S less 10 s, and a model call that runs past the limit ends the worker.
    """
    app = create_celery(settings.redis, settings.queue, settings.job_time_limit_s)
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        worker_consumer="worker.broker_loss:Consumer",  # a lost broker never ends the worker
    )
    runtime = WorkerRuntime(settings)
    ops = WorkerOps(runtime, settings)  # metrics, the readiness record, a log line per job: around the model load
    worker_init.connect(ops.before_model_load, weak=False)
    worker_init.connect(runtime.load_model, weak=False)
    worker_init.connect(ops.after_model_load, weak=False)
    worker_shutdown.connect(runtime.stop, weak=False)  # a warm shutdown; a cold one sends no signal, hence:
    atexit.register(runtime.stop)  # the model's thread must not be inside torch when the interpreter exits
    grace = ShutdownGrace(settings.shutdown_grace_s, ops.on_shutdown)
    worker_init.connect(grace.arm, weak=False)
    worker_shutting_down.connect(grace.begin, weak=False)
    register_tasks(app, runtime)
    # Each message received is recorded as held until its task returns: a worker that dies holding it, started or
    # not, loses nothing.
    receipts = Receipts(fleet_client(settings.redis), settings.queue, worker_identity())
    task_received.connect(receipts.received, weak=False)
    task_postrun.connect(receipts.finished, weak=False)
    Intake(settings.intake).connect(app)
    ops.connect()
    if settings.log_format == "json":
        use_json_logs_in_celery()
    if settings.reaper_interval_s > 0:
        start_reaper_when_ready(app, settings)
    start_webhook_senders_when_ready(app, settings)
    return app


class ShutdownGrace:
    """SIGTERM (a deploy) is Celery's warm shutdown: the worker takes no more messages and finishes the jobs it holds.
    Should that take longer than `grace_s`, the worker withdraws its record and exits; the reaper then publishes the
    jobs it still held to other workers, as for a worker that died.

    Celery's own bounded ("soft") shutdown runs the pool's shutdown inside the signal handler, which deadlocks a
    thread pool that the signal interrupted while it started a thread; here the handler only sets an event.
    """

    def __init__(self, grace_s: float, withdraw: Callable[[], None]) -> None:
        self.grace_s, self.withdraw = grace_s, withdraw
        self.asked = threading.Event()

    def arm(self, **_: Any) -> None:
        """Start the waiting thread (at `worker_init`, outside any signal handler)."""
        threading.Thread(target=self._wait, name="blipq-shutdown-grace", daemon=True).start()

    def begin(self, **_: Any) -> None:
        """Connected to `worker_shutting_down`, sent from the signal handler: nothing but an event."""
        self.asked.set()

    def _wait(self) -> None:
        self.asked.wait()
        time.sleep(self.grace_s)  # a worker whose jobs ended within the grace has exited by now
        log.warning("the jobs still held after the %g s shutdown grace go to other workers", self.grace_s)
        self.withdraw()
        logging.shutdown()
        os._exit(0)


def start_reaper_when_ready(app: Celery, settings: WorkerSettings) -> None:
    """Run the reaper of this worker's queue in a thread of the main process once the worker is ready."""
    time_limit_s = settings.job_time_limit_s
    # A live worker moves a message from the queue to its held set within moments, and refreshes its record every
    # announce interval: a message found nowhere for that long is lost.
    policy = ReaperPolicy(grace_s=settings.announce_interval_s)

    def start(**_: Any) -> None:
        store = JobStore.connect(settings.redis, settings.job_ttl_s)
        # A Celery app of its own to publish with: the worker's connections belong to its event loop and thread.
        publisher = create_celery(settings.redis, settings.queue, time_limit_s)
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
        store = JobStore.connect(settings.redis, settings.job_ttl_s)
        for number in range(WEBHOOK_SENDERS):
            WebhookSender(store, policy, network_policy, f"blipq-webhooks-{number}").start()
        log.info("webhooks: %d senders", WEBHOOK_SENDERS)

    worker_ready.connect(start, weak=False)


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app` looks up `app`: build it from the environment only when asked.
    if name == "app":
        return create_worker_app(WorkerSettings.from_env())
    raise AttributeError(name)
