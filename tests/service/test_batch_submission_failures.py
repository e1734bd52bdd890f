"""A batch whose submission meets trouble. Its chunks cannot be published at once: it is accepted all the same (it is
in Redis, held in its key's line) and runs once published. Too few Redis replicas hold it in time (WAIT falls short):
it is withdrawn and answered 503, so that it never runs; unless a worker started one of its chunks meanwhile (another
process released it): then it is accepted (202), and runs."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from api.admission import queue_names, waiting_answers
from api.app import create_app
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, stop_process
from contract.broker import create_celery
from contract.fair_share import key_shares, release
from contract.job_store import JobStore
from contract.keys import ANONYMOUS_SHARE, line_key, unstarted_key
from contract.states import JobPriority
from tests.support.holding_worker import HOLDING_QUESTION, RELEASE_KEY
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_batch,
    wait_for_worker_record,
)

UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every publish fails at once


def uploads() -> dict[str, object]:
    """A multipart batch body: three uploaded images, each asked two questions (chunks of 2: three messages)."""
    files = [(io.BytesIO(shape_png(color)), f"{color}.png", "image/png") for color in ("red", "blue", "green")]
    return {"images": files, "questions": json.dumps(["what color is the shape?", "is there a circle?"])}


def test_a_batch_whose_chunks_cannot_be_published_at_once_is_accepted_and_a_retry_is_its_replay(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_worker: WorkerProcess
) -> None:
    # Given: an API whose broker is unreachable while its job store is not, and chunks of 2 answers
    settings = ApiSettings(
        redis_url=redis_server.url, queue=tiny_worker.queue, wait_for_workers=True, batch_chunk_size=2
    )
    app = create_app(settings)
    services = app.extensions["blipq"]
    app.extensions["blipq"] = dataclasses.replace(services, celery=create_celery(UNREACHABLE_BROKER, "x"))
    key = {"Idempotency-Key": "batch-unpublished"}

    # When: a batch of uploaded images is submitted with an Idempotency-Key: accepted into its key's line, then its
    # release (the publish) fails
    response = app.test_client().post("/v1/batches", data=uploads(), headers=key)

    # Then: it is accepted (202), and its retry with the same key is that same batch...
    assert response.status_code == 202, response.get_json()
    working = create_app(settings).test_client()
    retry = working.post("/v1/batches", data=uploads(), headers=key)
    assert (retry.status_code, retry.headers.get("Idempotent-Replayed")) == (202, "true"), retry.get_json()
    assert retry.get_json()["id"] == response.get_json()["id"]

    # ...which runs: the worker's reaper publishes its chunks at its next sweep
    batch = wait_for_batch(working, response.get_json()["id"], tiny_worker)
    assert batch["counts"]["succeeded"] == 6, batch


def test_a_batch_too_few_replicas_hold_is_withdrawn_and_its_message_runs_nothing(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    tiny_model_dir: Path,
    tmp_path: Path,
    image_server: ImageServer,
) -> None:
    # Given: an API that needs one replica to hold each submission, and a Redis with none
    queue = f"withdrawn-{secrets.token_hex(4)}"
    image_server.routes["/withdrawn.png"] = (200, "image/png", shape_png("red"))
    client = api_client(redis_server.url, queue, min_replicas_ack=1, replica_ack_timeout_ms=50)

    # When: a batch is submitted (no worker reads its queue yet, so that none can start it meanwhile)
    response = client.post("/v1/batches", json={"images": [image_server.url("/withdrawn.png")], "questions": ["what?"]})

    # Then: it is refused 503 for want of replicas, and withdrawn: no record, nothing waiting...
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "replicas_unavailable"
    assert not list(redis_client.scan_iter("blipq:batch*"))
    assert not redis_client.zcard(unstarted_key(queue))
    assert waiting_answers(redis_client, queue) == 0
    # ...and nothing of it is ever published: the release that finds its chunk in its key's line drops it
    store = JobStore(redis_client, 600)
    assert release(store, create_celery(redis_server.url, queue), queue) == 0
    assert not redis_client.exists(line_key(queue, JobPriority.NORMAL, ANONYMOUS_SHARE))
    assert key_shares(redis_client, queue, JobPriority.NORMAL) == []
    worker = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "worker.log")
    try:
        wait_for_worker_record(redis_server.url, queue, 1, worker)
    finally:
        stop_process(worker.process)
    assert image_server.requests["/withdrawn.png"] == 0, "the withdrawn batch's image was fetched"
    assert not any(redis_client.llen(name) for name in queue_names(queue)), "a message of it was published"


@pytest.fixture
def holding_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[WorkerProcess]:
    """A worker whose model call for HOLDING_QUESTION waits until the test pushes on RELEASE_KEY."""
    module = "tests.support.holding_worker"
    process = start_worker(redis_server.url, tiny_model_dir, "wait-started", tmp_path / "w.log", module)
    wait_for_worker_record(redis_server.url, process.queue, 1, process)
    yield process
    redis_client.lpush(RELEASE_KEY, "go")  # a call the test left held must not keep the worker from stopping
    stop_process(process.process)
    redis_client.delete(RELEASE_KEY)


def chunk_started(client: redis.Redis) -> bool:
    """A worker has started a chunk of some batch (the start script names its worker on the chunk)."""
    return any(field.endswith(b":w") for key in client.scan_iter("blipq:batch-chunks:*") for field in client.hkeys(key))


def unblock_waits(client: redis.Redis) -> None:
    """End every WAIT blocked on this Redis as if its time were up: it answers the replicas that acknowledged (0)."""
    for connection in client.client_list():
        if connection.get("cmd") == "wait":
            client.client_unblock(int(connection["id"]))


def batch_ended(client: redis.Redis) -> bool:
    """Every item of the one batch in Redis has ended (its chunk left the chunks hash with them)."""
    [key] = [key for key in client.scan_iter("blipq:batch:*")]
    ended, count = client.hmget(key, ["ended", "count"])
    return ended == count


@pytest.mark.parametrize("chunk_ended", [False, True], ids=["chunk-running", "chunk-ended"])
def test_a_batch_a_worker_started_before_too_few_replicas_held_it_is_accepted_and_runs(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    holding_worker: WorkerProcess,
    image_server: ImageServer,
    caplog: pytest.LogCaptureFixture,
    chunk_ended: bool,
) -> None:
    # Given: an API that waits (for ever, in effect) for a replica that a Redis with none never gives
    queue = holding_worker.queue
    client = api_client(redis_server.url, queue, min_replicas_ack=1, replica_ack_timeout_ms=int(JOB_TIMEOUT_S * 1000))
    path = f"/started-{secrets.token_hex(4)}.png"
    image_server.routes[path] = (200, "image/png", shape_png("red"))
    body = {"images": [image_server.url(path)], "questions": [HOLDING_QUESTION]}
    caplog.set_level(logging.WARNING, logger="blipq.api")
    with ThreadPoolExecutor(1) as pool:
        # When: the batch is published and accepted, and a worker starts its chunk (held in the model call) while
        # the API waits for the replica; or the worker even answers it, the whole batch ending meanwhile...
        submitted = pool.submit(client.post, "/v1/batches", json=body)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        store, celery = JobStore(redis_client, 600), create_celery(redis_server.url, queue)
        while not chunk_started(redis_client):  # another process releases it (an API that accepts, a worker)
            assert time.monotonic() < deadline and not submitted.done(), holding_worker.log_tail()
            release(store, celery, queue)
            time.sleep(0.005)
        if chunk_ended:
            redis_client.lpush(RELEASE_KEY, "go")
            while not batch_ended(redis_client):
                assert time.monotonic() < deadline, holding_worker.log_tail()
                time.sleep(0.005)
        # ...and then the WAIT falls short (its time is up, as far as the API can tell), as does the WAIT that the
        # withdrawal's script call makes in turn
        while not submitted.done():
            unblock_waits(redis_client)
            assert time.monotonic() < deadline, "the submission never answered"
            time.sleep(0.005)
        response = submitted.result()

    # Then: the batch a worker had started is accepted (202) rather than withdrawn, and runs to its end, once
    assert response.status_code == 202, response.get_json()
    assert "was started by a worker before it could be withdrawn: it runs" in caplog.text
    redis_client.lpush(RELEASE_KEY, "go")
    batch = wait_for_batch(client, response.get_json()["id"], holding_worker)
    assert (batch["counts"]["succeeded"], image_server.requests[path]) == (1, 1), batch
    assert waiting_answers(redis_client, queue) == 0, "the answers waiting counted it once, and not now"
    chunks_waiting = [m for m in redis_client.zrange(unstarted_key(queue), 0, -1) if m.startswith(b"chunk:")]
    assert not chunks_waiting, "the chunk left the never-started set when it started, and is not back"
