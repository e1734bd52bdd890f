"""Routes for operators, open without an API key: readiness (/readyz) and Prometheus metrics (/metrics).

`GET /healthz` (api/views.py) says the process lives; `GET /readyz` says whether jobs submitted now will run: Redis
answers and at least one worker serving this API's queue has its model loaded (workers announce themselves in
Redis: worker/fleet.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify
from prometheus_client import CollectorRegistry

from api.auth import public
from api.metrics import FleetCollector, RequestMetrics, scrape
from api.settings import ApiSettings
from worker.fleet import fleet_client, live_workers

bp = Blueprint("ops", __name__)


@dataclass(frozen=True)
class Ops:
    """What the operations routes use, built once per app."""

    settings: ApiSettings
    client: redis.Redis  # short timeouts, decoded strings: a probe must answer quickly when Redis does not
    registry: CollectorRegistry
    fleet: FleetCollector


def install_ops(app: Flask, settings: ApiSettings) -> None:
    """Add /readyz and /metrics to `app`, and count, time and log its requests."""
    client = fleet_client(settings.redis)
    registry = CollectorRegistry()
    fleet = FleetCollector(client, (settings.queue, settings.caption_queue))
    registry.register(fleet)
    RequestMetrics(registry).install(app)
    app.extensions["blipq.ops"] = Ops(settings, client, registry, fleet)
    app.register_blueprint(bp)


def _ops() -> Ops:
    return current_app.extensions["blipq.ops"]


@bp.get("/readyz")
@public
def readyz() -> tuple[Response, int]:
    """200 when Redis answers and a worker with its model loaded serves the queue; 503, saying what is missing."""
    ops = _ops()
    queue = ops.settings.queue
    workers: list[dict[str, Any]] = []
    try:
        ops.client.ping()
        workers = [asdict(worker) for worker in live_workers(ops.client, queue)]
        redis_state, missing = "ok", [] if workers else ["worker"]
    except (redis.RedisError, OSError):
        redis_state, missing = "unreachable", ["redis"]
    body = {
        "status": "not_ready" if missing else "ready",
        "queue": queue,
        "redis": redis_state,
        "workers": workers,
        "missing": missing,
    }
    return jsonify(body), 503 if missing else 200


@bp.get("/metrics")
@public
def metrics() -> Response:
    """Prometheus's text format: this API's requests, and the queue, workers and job outcomes read from Redis."""
    ops = _ops()
    return scrape(ops.registry, ops.fleet)
