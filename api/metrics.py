"""The API's Prometheus metrics, and its log line per request.

Two kinds of metrics:
- per process: HTTP requests and their latency, counted in each API process. Under gunicorn with several worker
  processes, `blipq api` sets PROMETHEUS_MULTIPROC_DIR and prometheus_client's multiprocess mode adds them up
  across the processes at each scrape (api/gunicorn_conf.py clears the directory at start, and marks a process
  that exits as dead);
- read from Redis at scrape time, the same whichever process answers: the queue's depth and jobs running, the
  workers ready, and the fleet's counters (how jobs ended, reruns, duplicates...), which the workers keep in Redis;
  and how long the queue's backlog takes to drain at the rate the workers measured (what KEDA scales them on).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Iterable

import redis
from flask import Flask, Response, g, request, request_finished, request_started
from kombu.transport.redis import Channel
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.admission import queue_depth, waiting_answers
from api.auth import api_key_name
from contract.broker import TASK_VQA_CHUNK
from contract.fleet import UNMEASURED_RATE, kept_rate, live_workers, outcome_counts, per_worker_rate
from contract.jobs import STATS_FIELDS
from contract.keys import stats_key

log = logging.getLogger("blipq.api.requests")

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # an upload of 10 MB: seconds
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"
UNMATCHED_ROUTE = "unmatched"  # a 404 or 405 from routing: one label value, however many paths are tried
DRAIN_SECONDS = "blipq_backlog_drain_seconds"  # the queue's backlog over the fleet's rate
WORKER_SECONDS = "blipq_backlog_worker_seconds"  # the backlog over one worker's rate: what KEDA scales on
QUIET_ENDPOINTS = frozenset({"jobs.healthz", "ops.readyz", "ops.metrics"})  # probes and scrapes: logged at DEBUG

disable_created_metrics()  # no `_created` series: they would double the series of every counter, for little use


class RequestMetrics:
    """Counts an app's requests by method, route and status, times them, and logs one line for each."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "blipq_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "blipq_http_request_duration_seconds",
            "Time from a request's start to its response, in the app",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def install(self, app: Flask) -> None:
        """Time every request of `app`, from before any before-request hook (a request refused 401 counts too)."""
        request_started.connect(self._started, app, weak=False)
        request_finished.connect(self._finished, app, weak=False)

    def _started(self, sender: Flask, **_: object) -> None:
        g.blipq_request_started = time.perf_counter()

    def _finished(self, sender: Flask, response: Response, **_: object) -> None:
        elapsed = time.perf_counter() - g.get("blipq_request_started", time.perf_counter())
        method = request.method if request.method in METHODS else "other"
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        self.requests.labels(method=method, route=route, status=str(response.status_code)).inc()
        self.latency.labels(method=method, route=route).observe(elapsed)
        fields: dict[str, object] = {
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000, 2),
            "remote_addr": request.remote_addr,
        }
        job_id = _job_id(response)
        if job_id:
            fields["job_id"] = job_id
        if api_key_name():
            fields["api_key"] = api_key_name()
        level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS else logging.INFO
        message = "%s %s %d in %.1f ms"
        log.log(level, message, request.method, request.path, response.status_code, elapsed * 1000, extra=fields)


def _job_id(response: Response) -> str:
    """The job a request is about: in its URL, or the one it just made (named by the 202's Location header)."""
    job_id = (request.view_args or {}).get("job_id")
    if job_id:
        return str(job_id)
    location = response.headers.get("Location", "")
    return location.rpartition("/")[2] if location.startswith("/v1/jobs/") else ""


class FleetCollector(Collector):
    """Metrics read from Redis when Prometheus scrapes: one round of reads, whichever API process answers."""

    def __init__(self, client: redis.Redis, queues: tuple[str, ...]) -> None:
        self.client, self.queues = client, queues

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read Redis

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("blipq_redis_up", "1 when the API could read Redis for this scrape, else 0")
        try:
            metrics = self._read()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *metrics]

    def _read(self) -> list[Metric]:
        queued = GaugeMetricFamily(
            "blipq_jobs_queued",
            "Messages (jobs, chunks of batches) never started, held or released to the workers, every level together",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "blipq_jobs_running",
            "Messages taken by a worker and not yet acknowledged (a job, or a chunk of a batch): held by a live "
            "worker (up to BLIPQ_WORKER_CONCURRENCY each), or by one that vanished until they are restored",
            labels=["queue"],
        )
        workers = GaugeMetricFamily(
            "blipq_workers_ready", "Workers with their model loaded that serve the queue", labels=["queue"]
        )
        finished = CounterMetricFamily(
            "blipq_jobs_finished",
            "Runs of the queue's jobs that ended, by status and error code (counted by the workers)",
            labels=["queue", "status", "code"],
        )
        drain = GaugeMetricFamily(
            DRAIN_SECONDS,
            "Seconds the queue's backlog (answers waiting, plus those of the messages workers hold) takes to drain at "
            "the live workers' answers per busy second over the last minute; with no live worker, as if one ran at the "
            f"queue's last measured rate (kept a day), or {UNMEASURED_RATE:g} answer/s if none was measured",
            labels=["queue"],
        )
        worker_seconds = GaugeMetricFamily(
            WORKER_SECONDS,
            "Seconds of one worker's work the queue's backlog holds: the backlog over one worker's answers per busy "
            "second (as blipq_backlog_drain_seconds reads them); KEDA scales the workers on it with an AverageValue",
            labels=["queue"],
        )
        taken = unacked_messages(self.client)  # one read of kombu's hash for every queue
        for queue in self.queues:
            held = taken.get(queue, [])
            records = live_workers(self.client, queue)
            queued.add_metric([queue], queue_depth(self.client, queue))
            running.add_metric([queue], len(held))
            workers.add_metric([queue], len(records))
            backlog = waiting_answers(self.client, queue) + sum(message_answers(message) for message in held)
            rate = per_worker_rate(records, kept_rate(self.client, queue))
            drain.add_metric([queue], backlog / (rate * max(1, len(records))))
            worker_seconds.add_metric([queue], backlog / rate)
            for (status, code), count in sorted(outcome_counts(self.client, queue).items()):
                finished.add_metric([queue, status, code], count)
        events = CounterMetricFamily(
            "blipq_reliability_events", "The fleet's counters of GET /v1/stats, every queue together", labels=["event"]
        )
        raw: dict[str, str] = self.client.hgetall(stats_key())  # type: ignore[assignment]
        for name in STATS_FIELDS:
            events.add_metric([name], int(raw.get(name, 0)))
        return [queued, running, workers, finished, events, drain, worker_seconds]


def unacked_messages(client: redis.Redis) -> dict[str, list[dict[str, object]]]:
    """The messages workers have taken and not acknowledged, by queue: kombu's `unacked` hash, by routing key.

    Each entry is JSON [message, exchange, routing_key]; Celery routes a queue's tasks with the queue's name as the
    routing key. `client` must decode responses.
    """
    entries: list[str] = client.hvals(Channel.unacked_key)  # type: ignore[assignment]
    by_queue: dict[str, list[dict[str, object]]] = {}
    for message, _, queue in map(json.loads, entries):
        by_queue.setdefault(queue, []).append(message)
    return by_queue


def message_answers(message: dict[str, object]) -> int:
    """The answers a taken message asks for: a chunk's items (Celery's body: JSON [args, kwargs, embed], its payload
    first), 1 for a job, or for a chunk that cannot be read."""
    headers = message.get("headers")
    if not isinstance(headers, dict) or headers.get("task") != TASK_VQA_CHUNK:
        return 1
    try:
        body = str(message["body"])
        properties = message.get("properties")
        encoded = isinstance(properties, dict) and properties.get("body_encoding") == "base64"
        payload = json.loads(base64.b64decode(body) if encoded else body)[0][0]
        return max(1, sum(len(image["items"]) for image in payload["images"]))
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        return 1


def scrape(registry: CollectorRegistry, fleet: FleetCollector) -> Response:
    """The text format of this API's metrics: the app's registry, or every process's under multiprocess mode."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(fleet)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
