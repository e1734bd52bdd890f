"""A worker's metrics, readiness record and job log lines, hooked in through Celery's signals.

The worker process holds the model (its task threads share it), so it counts, announces itself
(contract/fleet.py) and serves Prometheus's text format on BLIPQ_METRICS_PORT (one port per worker). Its metrics
are prometheus_client's default registry: the ones below, plus the process's own (`process_resident_memory_bytes`...).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import PIL
import redis
from celery.signals import task_postrun, task_prerun, worker_shutdown
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

from contract.batch_scripts import SKIPPED
from contract.broker import TASK_VQA, TASK_VQA_CHUNK
from contract.fleet import Announcer, WorkerRecord, count_outcome, fleet_client, worker_identity
from contract.jobs import utc_now
from worker.rate import RateMeter
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import torch

    from worker.inference import LoadedModel

log = logging.getLogger("blipq.worker")

NOT_AN_END = "duplicate"  # a delivery of a job that had already ended: not run, not counted again
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

disable_created_metrics()  # no `_created` series: they would double the series of every counter, for little use
BATCH_SIZE = Histogram(
    "blipq_worker_batch_size",
    "Texts (questions or prompts) per model call (generate_texts)",
    buckets=BATCH_SIZE_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "blipq_worker_inference_seconds",
    "Time of one model call (generate_texts): tokenizing, generate and decoding, on pixels prepared beforehand",
    buckets=INFERENCE_BUCKETS,
)
ANSWERS = Counter("blipq_worker_answers", "Answers the model gave (rate() of it: answers per second)")
JOBS = Counter("blipq_worker_jobs", "Runs of jobs that ended, by outcome", ["status", "code"])
MODEL_LOAD_SECONDS = Gauge(
    "blipq_worker_model_load_seconds", "How long this process took to get its model ready (imports included)"
)
MODEL = Info("blipq_worker_model", "The model this process holds")


class JobTiming(threading.local):
    """The message a task thread is running: when it started, and the time of the model calls it waited for."""

    started = 0.0
    model_s = 0.0
    calls: set[int] = set()  # noqa: RUF012  (replaced per message by `begin`, never mutated on the class)

    def begin(self) -> None:
        self.started, self.model_s, self.calls = time.perf_counter(), 0.0, set()


CURRENT_JOB = JobTiming()


@contextmanager
def observe_inference(questions: int) -> Iterator[None]:
    """Measure one model call on `questions` texts (answered only when it returns)."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    BATCH_SIZE.observe(questions)
    INFERENCE_SECONDS.observe(elapsed)
    ANSWERS.inc(questions)


class HoldsModel(Protocol):
    """What the ops read of the worker's runtime (worker/runtime.py): its model, None until loaded (or if the load
    failed)."""

    @property
    def loaded(self) -> LoadedModel | None: ...


class WorkerOps:
    """Connects a worker's metrics, readiness record and job log lines to Celery's signals."""

    def __init__(self, runtime: HoldsModel, settings: WorkerSettings) -> None:
        self.runtime, self.settings = runtime, settings
        self.load_started = 0.0
        self.announcer: Announcer | None = None
        self.metrics_server: WSGIServer | None = None
        self._client: redis.Redis | None = None
        self.meter = RateMeter()  # the answers/s its record publishes

    def connect(self) -> None:
        """Listen to task and process signals (the model load is connected around runtime.load_model by the app)."""
        task_prerun.connect(self.on_task_prerun, weak=False)
        task_postrun.connect(self.on_task_postrun, weak=False)
        worker_shutdown.connect(self.on_shutdown, weak=False)

    def before_model_load(self, **_: Any) -> None:
        """Connected to `worker_init` before runtime.load_model: the load starts."""
        self.load_started = time.monotonic()
        if self.settings.log_format == "json":  # progress bars are for terminals: in a JSON log they are noise
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()

    def after_model_load(self, **_: Any) -> None:
        """Connected to `worker_init` after runtime.load_model: announce the worker and serve its metrics."""
        if self.runtime.loaded is None:  # runtime.load_model failed (Celery logged why): not ready, nothing to serve
            log.error("the model did not load; this worker does not announce itself ready")
            return
        self._model_ready(self.runtime.loaded, time.monotonic() - self.load_started)

    def on_task_prerun(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) in (TASK_VQA, TASK_VQA_CHUNK):
            CURRENT_JOB.begin()
            self.meter.begin()

    def on_task_postrun(self, sender: Any = None, args: Any = (), retval: Any = None, **_: Any) -> None:
        """Count how the run ended, in this process and in Redis, and log one line with its timings."""
        if getattr(sender, "name", None) not in (TASK_VQA, TASK_VQA_CHUNK):
            return
        answers = self._run_ended(sender, args, retval)
        job_run_s = time.perf_counter() - CURRENT_JOB.started if sender.name == TASK_VQA else None
        self.meter.end(answers, job_run_s)

    def _run_ended(self, sender: Any, args: Any, retval: Any) -> int:
        """Count and log a run of a job or a chunk; the answers it ended."""
        if self.announcer is None and self.runtime.loaded is not None:
            self._model_ready(self.runtime.loaded, 0.0)  # loaded inside its first job (no worker_init): untimed
        if not isinstance(retval, dict):  # the task raised: Celery logged it, and the job has not ended
            return 0
        if sender.name == TASK_VQA_CHUNK:
            return self._chunk_ended(retval)
        status, code = str(retval.get("status", "")), str(retval.get("code", ""))
        payload = args[0] if args and isinstance(args[0], dict) else {}
        duration_s = time.perf_counter() - CURRENT_JOB.started
        fields: dict[str, Any] = {"job_id": payload.get("job_id"), "status": status, "duration_s": round(duration_s, 4)}
        fields["inference_s"] = round(CURRENT_JOB.model_s, 4)
        if code:
            fields["error_code"] = code
        log.info("job %s %s in %.3f s", fields["job_id"], status, duration_s, extra=fields)
        if status == NOT_AN_END:
            return 0
        JOBS.labels(status=status, code=code).inc()
        self._count_in_redis(status, code)
        return 1

    def _chunk_ended(self, retval: dict[str, Any]) -> int:
        """Count a chunk's items by outcome in this process, and log one line for the chunk (the end script counted
        them in Redis, with the items); the items it ended."""
        duration_s = time.perf_counter() - CURRENT_JOB.started
        counts = retval.get("outcomes") or {}
        fields: dict[str, Any] = {"batch_id": retval.get("batch_id"), "jobs": sum(counts.values())}
        fields |= {"duration_s": round(duration_s, 4), "inference_s": round(CURRENT_JOB.model_s, 4)}
        log.info("chunk of batch %s: %d items in %.3f s", fields["batch_id"], fields["jobs"], duration_s, extra=fields)
        ended = 0
        for outcome, count in counts.items():
            status, _, code = str(outcome).partition(":")
            if status != SKIPPED:
                JOBS.labels(status=status, code=code).inc(count)
                ended += int(count)
        return ended

    def on_shutdown(self, **_: Any) -> None:
        """The worker exits cleanly: withdraw its record and close its metrics endpoint."""
        if self.announcer is not None:
            self.announcer.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    def _model_ready(self, loaded: LoadedModel, load_seconds: float) -> None:
        settings = self.settings
        device, dtype = str(loaded.device), str(loaded.dtype).removeprefix("torch.")
        MODEL_LOAD_SECONDS.set(load_seconds)
        MODEL.info({"model": settings.model, "device": device, "dtype": dtype, "queue": settings.queue})
        if loaded.device.type == "cuda":
            watch_gpu_memory(loaded.device)
        port = self._serve_metrics()
        width, height = loaded.image_size
        record = WorkerRecord(
            id=worker_identity(),
            host=socket.gethostname(),
            pid=os.getpid(),
            queue=settings.queue,
            model=settings.model,
            device=device,
            dtype=dtype,
            loaded_at=utc_now(),
            load_seconds=round(load_seconds, 3),
            metrics_port=port,
            image_width=width,
            image_height=height,
            decode=settings.image_decode,
            resample=loaded.resample_name,
            pillow=PIL.__version__,
        )
        meter = self.meter
        self.announcer = Announcer(self.client, record, settings.announce_interval_s, meter.rates, meter.job_run_s)
        self.announcer.start()

    def _serve_metrics(self) -> int:
        """Serve /metrics on the configured port; the port, or 0 when off or taken (the worker runs on without)."""
        port = self.settings.metrics_port
        if not port:
            return 0
        try:
            self.metrics_server, _ = start_http_server(port, self.settings.metrics_addr)
        except OSError as exc:
            log.warning("cannot serve metrics on %s:%d: %s", self.settings.metrics_addr, port, exc)
            return 0
        log.info("metrics on http://%s:%d/metrics", self.settings.metrics_addr, port)
        return port

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # made on first use, once the worker runs
            self._client = fleet_client(self.settings.redis)
        return self._client

    def _count_in_redis(self, status: str, code: str) -> None:
        try:
            count_outcome(self.client, self.settings.queue, status, code)
        except (redis.RedisError, OSError) as exc:  # a lost count must not fail the job
            log.warning("cannot count a job's outcome: %s", exc)


def watch_gpu_memory(device: torch.device, registry: CollectorRegistry = REGISTRY) -> None:
    """Gauges of the CUDA memory torch holds on `device`, read when Prometheus scrapes (none on the CPU)."""
    import torch

    allocated = Gauge(
        "blipq_worker_gpu_memory_allocated_bytes", "CUDA memory torch has allocated on the device", registry=registry
    )
    allocated.set_function(lambda: torch.cuda.memory_allocated(device))
    peak = Gauge(
        "blipq_worker_gpu_memory_max_allocated_bytes",
        "The most CUDA memory torch has held on the device since the model loaded",
        registry=registry,
    )
    peak.set_function(lambda: torch.cuda.max_memory_allocated(device))
