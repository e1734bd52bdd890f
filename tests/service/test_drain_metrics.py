"""Autoscaling on drain time: workers publish the answers per second they measured, and the API's /metrics divides
the queue's backlog by it (blipq_backlog_drain_seconds, blipq_backlog_worker_seconds)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.transport.redis import Channel

from api.metrics import DRAIN_SECONDS, WORKER_SECONDS
from blipq.up_redis import RedisProcess, stop_process
from contract.broker import TASK_VQA, TASK_VQA_CHUNK
from contract.fleet import UNMEASURED_RATE, Announcer, WorkerRecord, fleet_client, kept_rate, live_workers
from contract.keys import kept_rate_key, unstarted_key, waiting_answers_key, worker_key, workers_key
from contract.states import JobPriority, JobTask
from tests.support.images import shape_png
from tests.support.metrics import value
from tests.support.service import JOB_TIMEOUT_S, ImageServer, api_client, start_worker, wait_for_job

QUEUE = "drain-metric"  # no worker serves it: the test writes the records
WORKER_QUEUE = "drain-worker"
WAITING = 30  # answers waiting, every priority level together
HELD_CHUNK_ITEMS = 3


def message(task: str, payload: dict[str, object]) -> dict[str, object]:
    """A taken message as kombu keeps it in its `unacked` hash: Celery's body, base64-encoded."""
    body = base64.b64encode(json.dumps([[payload], {}, {}]).encode()).decode()
    return {"body": body, "headers": {"task": task}, "properties": {"body_encoding": "base64"}}


@pytest.fixture
def backlog(redis_client: redis.Redis) -> Iterator[int]:
    """`QUEUE`'s backlog: answers waiting at two levels, a job and a chunk a worker holds; its answers."""
    redis_client.hset(waiting_answers_key(), unstarted_key(QUEUE), WAITING - 10)
    redis_client.hset(waiting_answers_key(), unstarted_key(QUEUE, JobPriority.LOW), 10)
    chunk = {"batch_id": "b", "images": [{"upload": "u", "items": [[0, "a"], [1, "b"]]}, {"items": [[2, "c"]]}]}
    held = {"drain-job": message(TASK_VQA, {"job_id": "j"}), "drain-chunk": message(TASK_VQA_CHUNK, chunk)}
    redis_client.hset(Channel.unacked_key, mapping={tag: json.dumps([m, "", QUEUE]) for tag, m in held.items()})
    yield WAITING + 1 + HELD_CHUNK_ITEMS
    redis_client.hdel(Channel.unacked_key, *held)


def announce(client: redis.Redis, number: int, busy_answers_per_s: float) -> WorkerRecord:
    record = WorkerRecord(
        id=f"drain:{number}", host="drain", pid=number, queue=QUEUE, model="m", device="cpu", dtype="float32",
        loaded_at="", load_seconds=0.0, metrics_port=0,
    )  # fmt: skip
    Announcer(client, record, 60, rates=lambda: (busy_answers_per_s / 2, busy_answers_per_s)).announce()
    return record


def withdraw(client: redis.Redis, record: WorkerRecord) -> None:
    client.delete(worker_key(record.id))
    client.zrem(workers_key(record.queue), record.id)


def drain_metrics(redis_server: RedisProcess) -> tuple[float | None, float | None, float | None]:
    text = api_client(redis_server.url, QUEUE).get("/metrics").get_data(as_text=True)
    return (
        value(text, DRAIN_SECONDS, queue=QUEUE),
        value(text, WORKER_SECONDS, queue=QUEUE),
        value(text, "blipq_jobs_running", queue=QUEUE),
    )


def test_the_backlog_drains_at_the_live_workers_rate_else_the_kept_one(
    redis_server: RedisProcess, redis_client: redis.Redis, backlog: int
) -> None:
    client = fleet_client(redis_server.url)
    # No rate ever measured: the assumed one, so that a backlog still starts a first worker.
    assert drain_metrics(redis_server) == (backlog / UNMEASURED_RATE, backlog / UNMEASURED_RATE, 2)
    first, second = announce(client, 1, 2.0), announce(client, 2, 6.0)
    try:
        assert drain_metrics(redis_server)[:2] == (backlog / 8.0, backlog / 4.0)  # two workers, 4 answers/s each
        withdraw(client, second)
        assert drain_metrics(redis_server)[:2] == (backlog / 2.0, backlog / 2.0)
    finally:
        withdraw(client, first)
        withdraw(client, second)
    # Scaled to zero: as if one worker ran at the last rate measured (the last announced), kept a day.
    assert drain_metrics(redis_server)[:2] == (backlog / 6.0, backlog / 6.0)
    assert 0 < redis_client.ttl(kept_rate_key(QUEUE)) <= 86400


def test_a_worker_publishes_a_positive_rate_after_answering_jobs(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    tiny_model_dir: Path,
    image_server: ImageServer,
    tmp_path: Path,
) -> None:
    env = {"BLIPQ_ANNOUNCE_INTERVAL_S": "0.5"}
    worker = start_worker(redis_server.url, tiny_model_dir, WORKER_QUEUE, tmp_path / "worker.log", **env)
    try:
        api = api_client(redis_server.url, WORKER_QUEUE, tasks=(JobTask.VQA,))
        image_server.routes["/drain.png"] = (200, "image/png", shape_png("red"))
        submission = {"image_url": image_server.url("/drain.png"), "question": "what color is it?"}
        for _ in range(3):
            job = wait_for_job(api, api.post("/v1/jobs", json=submission).get_json()["id"], worker)
            assert job["status"] == "succeeded"
        client = fleet_client(redis_server.url)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (records := live_workers(client, WORKER_QUEUE)) or records[0].busy_answers_per_s <= 0:
            assert time.monotonic() < deadline and worker.process.poll() is None, worker.log_tail()
            time.sleep(0.05)
        (record,) = records
        assert record.answers_per_s > 0 and record.busy_answers_per_s >= record.answers_per_s
        assert kept_rate(client, WORKER_QUEUE) > 0
    finally:
        stop_process(worker.process)
