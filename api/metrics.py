"""The API's Prometheus metrics, and its log line per request.

Two kinds of metrics:
- per process: HTTP requests and their latency, counted in each API process. Under gunicorn with several worker
  processes, `blipq api` sets PROMETHEUS_MULTIPROC_DIR and prometheus_client's multiprocess mode adds them up
  across the processes at each scrape (api/gunicorn_conf.py clears the directory at start, and marks a process
  that exits as dead);
- read from Redis at scrape time, the same whichever process answers: the queue's depth and jobs running, the
  workers ready, and the fleet's counters (how jobs ended, reruns, duplicates...), which the workers keep in Redis.
"""

from __future__ import annotations

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

from api.admission import queue_depth
from api.auth import api_key_name
from contract.fleet import live_workers, outcome_counts
from contract.jobs import STATS_FIELDS
from contract.keys import stats_key

log = logging.getLogger("blipq.api.requests")

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # an upload of 10 MB: seconds
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"
UNMATCHED_ROUTE = "unmatched"  # a 404 or 405 from routing: one label value, however many paths are tried
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
            "blipq_jobs_queued", "Jobs waiting in the queue, every priority level together", labels=["queue"]
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
        for queue in self.queues:
            queued.add_metric([queue], queue_depth(self.client, queue))
            running.add_metric([queue], unacked_jobs(self.client, queue))
            workers.add_metric([queue], len(live_workers(self.client, queue)))
            for (status, code), count in sorted(outcome_counts(self.client, queue).items()):
                finished.add_metric([queue, status, code], count)
        events = CounterMetricFamily(
            "blipq_reliability_events", "The fleet's counters of GET /v1/stats, every queue together", labels=["event"]
        )
        raw: dict[str, str] = self.client.hgetall(stats_key())  # type: ignore[assignment]
        for name in STATS_FIELDS:
            events.add_metric([name], int(raw.get(name, 0)))
        return [queued, running, workers, finished, events]


def unacked_jobs(client: redis.Redis, queue: str) -> int:
    """Messages of `queue` that a worker has taken and not acknowledged: kombu's `unacked` hash, by routing key.

    Each entry is JSON [message, exchange, routing_key]; Celery routes a queue's tasks with the queue's name as the
    routing key. `client` must decode responses.
    """
    entries: list[str] = client.hvals(Channel.unacked_key)  # type: ignore[assignment]
    return sum(1 for entry in entries if json.loads(entry)[2] == queue)


def scrape(registry: CollectorRegistry, fleet: FleetCollector) -> Response:
    """The text format of this API's metrics: the app's registry, or every process's under multiprocess mode."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(fleet)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
