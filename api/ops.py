"""Routes for operators, open without an API key: readiness (/readyz) and Prometheus metrics (/metrics).

`GET /healthz` (api/views.py) says the process lives; `GET /readyz` says whether jobs submitted now will run: Redis
answers and each task the deployment serves has a worker with its model loaded (workers announce themselves in
Redis: contract/fleet.py). `GET /v1/models` (behind the API keys, like every /v1 route) lists each task's models,
input size, workers, waiting answers and outcomes (what the web page's fleet panel shows), and the API's upload limits
(what `blipq tag` checks its files against).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify
from prometheus_client import CollectorRegistry

from api.admission import waiting_answers
from api.auth import api_key_name, public
from api.metrics import FleetCollector, RequestMetrics, scrape
from api.openapi import documented
from api.schemas.ops import MetricsText, Models, Readiness
from api.settings import ApiSettings
from contract.fair_share import key_shares
from contract.fleet import WorkerRecord, fleet_client, live_workers, outcome_counts
from contract.keys import share_name
from contract.states import JobPriority, JobTask

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
@documented(
    "readyz",
    "operations",
    {
        200: (Readiness, "Ready: jobs submitted now will run."),
        503: (Readiness, "Not ready: `missing` says what is missing."),
    },
)
def readyz() -> tuple[Response, int]:
    """Readiness: Redis answers and each task served (BLIPQ_TASKS) has a worker with its model loaded.

    503 says what is missing: `redis`, or `worker:<task>` for each task with none.
    """
    ops = _ops()
    settings = ops.settings
    tasks: dict[str, dict[str, Any]] = {}
    try:
        ops.client.ping()
        for task in settings.tasks:
            queue = settings.queue_for(task)
            workers = [asdict(worker) for worker in live_workers(ops.client, queue)]
            tasks[task.value] = {"queue": queue, "workers": workers}
        redis_state = "ok"
        missing = [f"worker:{task}" for task, state in tasks.items() if not state["workers"]]
    except (redis.RedisError, OSError):
        redis_state, missing = "unreachable", ["redis"]
    body = {"status": "not_ready" if missing else "ready", "redis": redis_state, "tasks": tasks, "missing": missing}
    return jsonify(body), 503 if missing else 200


@bp.get("/v1/models")
@documented("listModels", "operations", {200: (Models, "The tasks, and the limits of what they take.")})
def models() -> Response:
    """Each task: its queue, models, input size and workers, answers waiting, runs by outcome; the upload limits.

    Each task this API takes jobs for: its queue, the models its live workers serve, the size their processors resize
    every image to (and how they decode and resize images, when they say), its workers, the answers waiting in its
    queue and how the runs of its jobs ended (counts since Redis started keeping them). `limits` are what this API
    accepts, so that a client can check its files before it sends them.
    """
    ops = _ops()
    listed = []
    for task in JobTask:
        queue = ops.settings.queue_for(task)
        workers = live_workers(ops.client, queue)
        outcomes: dict[str, int] = {}
        for (status, _), count in outcome_counts(ops.client, queue).items():
            outcomes[status] = outcomes.get(status, 0) + count
        listed.append(
            {
                "task": task.value,
                "queue": queue,
                "models": sorted({worker.model for worker in workers}),
                "image_size": input_size(workers),
                "decode": agreed(workers, "decode"),
                "resample": agreed(workers, "resample"),
                "workers": [asdict(worker) for worker in workers],
                "waiting": waiting_answers(ops.client, queue),
                "outcomes": outcomes,
                "shares": queue_shares(ops.client, queue, share_name(api_key_name())),
            }
        )
    return jsonify(limits=upload_limits(ops.settings), models=listed)


def queue_shares(client: redis.Redis, queue: str, caller: str) -> list[dict[str, Any]]:
    """The API keys holding work in `queue`, level by level, with their shares (contract/fair_share.py); only the
    caller's own key is named."""
    listed = []
    for priority in JobPriority:
        shares = key_shares(client, queue, priority)
        total = sum(share.weight for share in shares)
        for share in shares:
            yours = share.name == caller
            listed.append(
                {
                    "priority": priority.value,
                    "key": share.name if yours else None,
                    "yours": yours,
                    "waiting": share.held,
                    "weight": share.weight,
                    "share": round(share.weight / total, 4),
                }
            )
    return listed


def input_size(workers: list[WorkerRecord]) -> dict[str, int] | None:
    """The largest input size the workers publish (a picture shrunk to it loses nothing any of them uses), or None."""
    sizes = [(worker.image_width, worker.image_height) for worker in workers if worker.image_width > 0]
    if not sizes:
        return None
    return {"width": max(width for width, _ in sizes), "height": max(height for _, height in sizes)}


def agreed(workers: list[WorkerRecord], field: str) -> str | None:
    """A field the workers publish (`decode`, `resample`), when they all publish the same value; else None."""
    values = {str(getattr(worker, field)) for worker in workers}
    return values.pop() if len(values) == 1 and "" not in values else None


def upload_limits(settings: ApiSettings) -> dict[str, int]:
    """What the API accepts of a submission, as GET /v1/models publishes it."""
    return {
        "max_image_bytes": settings.max_image_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "max_batch_upload_bytes": settings.max_batch_upload_bytes,
        "max_question_chars": settings.max_question_chars,
    }


@bp.get("/metrics")
@public
@documented("metrics", "operations", {200: (MetricsText, "Prometheus's text format.")}, media_type="text/plain")
def metrics() -> Response:
    """Prometheus's text format: this API's requests, and the queue, workers and job outcomes read from Redis."""
    ops = _ops()
    return scrape(ops.registry, ops.fleet)
