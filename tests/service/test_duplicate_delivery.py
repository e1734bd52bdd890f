"""A single job run twice (its message delivered again, as after a visibility timeout or a republish): the first
answer recorded stands. A delivery after the job ended is not run; a run that ends second has its answer dropped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from contract.broker import create_celery, publish_job
from contract.job_store import JobStore
from contract.keys import ANSWER_PREFIX
from tests.support.holding_worker import HOLDING_QUESTION, RELEASE_KEY
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_job,
    wait_for_status,
    wait_for_worker_record,
)

PLANTED = "planted in the cache"  # an answer no model gives: a run that reached the model step would answer it


def deliver_again(redis_url: str, client: redis.Redis, job_id: str, queue: str) -> None:
    """Publish the job's message again, as the broker redelivers it or the reaper republishes it."""
    job = JobStore(client, 600).get(job_id)
    assert job is not None
    publish_job(create_celery(redis_url, queue), job, queue)


def wait_for_stat(client: FlaskClient, name: str, value: int, worker: WorkerProcess) -> dict[str, int]:
    """Poll GET /v1/stats until counter `name` reaches `value`."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (stats := client.get("/v1/stats").get_json())[name] < value:
        assert time.monotonic() < deadline, f"{name} stayed at {stats[name]}\n{worker.log_tail()}"
        time.sleep(0.02)
    stats_now: dict[str, int] = stats
    return stats_now


def test_a_job_delivered_again_after_it_ended_is_not_run_and_keeps_its_answer(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_worker: WorkerProcess, image_server: ImageServer
) -> None:
    # Given: a job answered, and the cache entry of its answer since overwritten, so that a second run of the model
    # step would answer otherwise
    image_server.routes["/twice/red.png"] = (200, "image/png", shape_png("red"))
    client = api_client(redis_server.url, tiny_worker.queue)
    body = {"image_url": image_server.url("/twice/red.png"), "question": "what color is the shape?"}
    job_id = client.post("/v1/jobs", json=body).get_json()["id"]
    first = wait_for_job(client, job_id, tiny_worker)
    assert first["status"] == "succeeded" and first["answer"], first
    [entry] = redis_client.scan_iter(f"{ANSWER_PREFIX}*")
    redis_client.set(entry, PLANTED, keepttl=True)

    # When: its message is delivered again, and the worker takes it
    deliver_again(redis_server.url, redis_client, job_id, tiny_worker.queue)
    stats = wait_for_stat(client, "duplicate_deliveries", 1, tiny_worker)

    # Then: the delivery was not run (no second execution, no second fetch), and the job shows its first answer
    assert stats["executions"] == 1, stats
    assert image_server.requests["/twice/red.png"] == 1
    assert redis_client.hget(f"blipq:job:{job_id}", "attempts") == b"1"
    assert client.get(f"/v1/jobs/{job_id}").get_json() == first


@pytest.fixture
def holding_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[WorkerProcess]:
    """A worker whose model call for HOLDING_QUESTION waits until the test pushes on RELEASE_KEY (one call a push)."""
    module = "tests.support.holding_worker"
    process = start_worker(redis_server.url, tiny_model_dir, "twice", tmp_path / "w.log", module)
    wait_for_worker_record(redis_server.url, process.queue, 1, process)
    yield process
    redis_client.lpush(RELEASE_KEY, "go", "go")  # calls the test left held must not keep the worker from stopping
    stop_process(process.process)
    redis_client.delete(RELEASE_KEY)


def test_a_job_run_twice_at_once_keeps_the_answer_recorded_first(
    redis_server: RedisProcess, redis_client: redis.Redis, holding_worker: WorkerProcess, image_server: ImageServer
) -> None:
    # Given: a job whose run is held in the model call, and its message delivered again meanwhile: a second run
    # starts (its attempt counted) and waits for the model behind the first
    image_server.routes["/twice/blue.png"] = (200, "image/png", shape_png("blue"))
    client = api_client(redis_server.url, holding_worker.queue)
    body = {"image_url": image_server.url("/twice/blue.png"), "question": HOLDING_QUESTION}
    job_id = client.post("/v1/jobs", json=body).get_json()["id"]
    wait_for_status(client, job_id, "running", holding_worker)
    deliver_again(redis_server.url, redis_client, job_id, holding_worker.queue)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while redis_client.hget(f"blipq:job:{job_id}", "attempts") != b"2":
        assert time.monotonic() < deadline, holding_worker.log_tail()
        time.sleep(0.02)

    # When: the first run ends, then the second
    redis_client.lpush(RELEASE_KEY, "go")
    first: dict[str, Any] = wait_for_job(client, job_id, holding_worker)
    redis_client.lpush(RELEASE_KEY, "go")
    stats = wait_for_stat(client, "duplicate_executions", 1, holding_worker)

    # Then: both ran, the second one's answer was dropped, and the job shows the first one's, finish time included
    assert first["status"] == "succeeded" and first["answer"], first
    assert (stats["executions"], stats["reruns"]) == (2, 1), stats
    assert "its answer stands, this one is dropped" in holding_worker.log_tail(100)
    assert client.get(f"/v1/jobs/{job_id}").get_json() == first
