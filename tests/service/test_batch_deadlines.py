"""A batch's `deadline_s`: its items still queued at the deadline end `expired` then, closed by a worker's reaper
rather than when a worker reaches them (or a client looks), and its webhook goes out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.admission import waiting_answers
from blipq.up_redis import RedisProcess, stop_process
from contract.keys import batch_key
from tests.support.holding_worker import HOLDING_QUESTION, RELEASE_KEY
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_batch,
    wait_for_status,
    wait_for_worker_record,
)
from tests.support.webhooks import QUICK_WEBHOOKS, SECRET, Receiver, serve, verify_signature
from worker.webhooks import SIGNATURE_HEADER

DEADLINE_S = 1  # the hurried batch's; the worker is held far longer, so only the reaper can end its items in time
QUESTIONS = ["what color is the shape?", "is there a circle?"]


@pytest.fixture
def holding_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[WorkerProcess]:
    """A worker that takes one message at a time, whose model call for HOLDING_QUESTION waits for the test, whose
    reaper looks every half second, and that signs webhooks."""
    env = {**QUICK_WEBHOOKS, "BLIPQ_WORKER_CONCURRENCY": "1", "BLIPQ_REAPER_INTERVAL_S": "0.5"}
    module = "tests.support.holding_worker"
    process = start_worker(redis_server.url, tiny_model_dir, "batch-deadlines", tmp_path / "w.log", module, **env)
    wait_for_worker_record(redis_server.url, process.queue, 1, process)
    yield process
    redis_client.lpush(RELEASE_KEY, "go")  # a call the test left held must not keep the worker from stopping
    stop_process(process.process)
    redis_client.delete(RELEASE_KEY)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    httpd, receiver = serve("127.0.0.1")
    yield receiver
    httpd.shutdown()


def test_a_batch_past_its_deadline_is_closed_by_the_reaper_its_queued_items_expired_and_its_webhook_sent(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    holding_worker: WorkerProcess,
    image_server: ImageServer,
    receiver: Receiver,
) -> None:
    client = api_client(redis_server.url, holding_worker.queue, webhooks_enabled=True)
    for name in ("held", "a", "b"):
        image_server.routes[f"/deadlines/{name}.png"] = (200, "image/png", shape_png("red"))
    # Given: the worker's only message slot held by a batch whose item the model is answering...
    held = client.post(
        "/v1/batches",
        json={"items": [{"image_url": image_server.url("/deadlines/held.png"), "question": HOLDING_QUESTION}]},
    ).get_json()["id"]
    wait_for_status(client, f"{held}.0", "running", holding_worker)
    # ...and a batch behind it with a deadline and a webhook
    hurried = {
        "images": [image_server.url("/deadlines/a.png"), image_server.url("/deadlines/b.png")],
        "questions": QUESTIONS,
        "deadline_s": DEADLINE_S,
        "webhook": receiver.url("/deadline"),
    }
    response = client.post("/v1/batches", json=hurried)
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    deadline_at = float(redis_client.hget(batch_key(batch_id), "deadline_at") or 0)

    # When: its deadline passes, and nobody reads the batch (a read past the deadline would close it too)
    [delivery] = receiver.wait_for(1, JOB_TIMEOUT_S)
    delivered_at = time.time()

    # Then: the reaper closed it: every item expired, though no worker reached them (the held one still runs)...
    assert delivered_at >= deadline_at
    assert f"batch {batch_id} was not answered by its deadline" in holding_worker.log_tail(200)
    assert client.get(f"/v1/jobs/{held}.0").get_json()["status"] == "running"
    # ...and its webhook went out, signed, with the batch's summary
    assert verify_signature(SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body)
    summary = json.loads(delivery.body)
    assert (summary["id"], summary["ended"], summary["counts"]["expired"]) == (batch_id, 4, 4), summary

    # When the worker is let go and reaches the closed batch's message, it runs none of it
    log_before = len(holding_worker.log_path.read_text(errors="replace"))
    redis_client.lpush(RELEASE_KEY, "go")
    assert wait_for_batch(client, held, holding_worker)["counts"]["succeeded"] == 1
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while f"'batch_id': '{batch_id}', 'skipped': -4" not in holding_worker.log_path.read_text()[log_before:]:
        assert time.monotonic() < deadline, f"the worker never reached the closed batch\n{holding_worker.log_tail()}"
        time.sleep(0.05)
    lines = [
        json.loads(line) for line in client.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    ]
    assert {(line["status"], line["error"]["code"], line["answer"]) for line in lines} == {
        ("expired", "deadline_exceeded", None)
    }
    assert waiting_answers(redis_client, holding_worker.queue) == 0
    assert len(receiver.received) == 1, "the webhook went out once"
