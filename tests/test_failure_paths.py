"""Documented failure paths, each reached for real: a job for the wrong model, an upload gone, a job past its limit."""

from __future__ import annotations

import io
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.admission import queue_names
from api.up import RedisProcess, stop_process
from tests.conftest import (
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    start_worker,
    wait_for_batch,
    wait_for_job,
)
from tests.fixtures.images import shape_png
from worker.broker import create_celery, publish_job
from worker.jobs import JobStore

SLOW_S = 30.0  # an image that arrives this late is still loading when a 5 s job limit ends


def test_a_caption_job_sent_to_a_vqa_worker_fails_wrong_task_and_the_worker_goes_on(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    # Given an API that routes captions to the VQA worker's queue (a misconfigured fleet)
    client = api_client(redis_server.url, tiny_worker.queue, caption_queue=tiny_worker.queue)
    image = {"image": (io.BytesIO(shape_png("red")), "red.png")}

    wrong = client.post("/v1/jobs", data={"task": "caption", **image}).get_json()["id"]
    right = client.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(shape_png("red")), "r")})

    failed = wait_for_job(client, wrong, tiny_worker)
    assert (failed["status"], failed["error"]["code"]) == ("failed", "wrong_task")
    assert "wrong queue" in failed["error"]["message"]
    assert wait_for_job(client, right.get_json()["id"], tiny_worker)["status"] == "succeeded"


def test_a_job_whose_upload_is_gone_fails_upload_missing(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    # Given an uploaded job queued where no worker reads, whose upload then vanished (evicted, say)
    idle = f"idle-{secrets.token_hex(4)}"
    client = api_client(redis_server.url, idle)
    response = client.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(shape_png("red")), "r")})
    job_id = response.get_json()["id"]
    assert redis_client.delete(f"blipq:upload:{job_id}") == 1
    job = JobStore(redis_client, 600).get(job_id)
    assert job is not None

    # When its message reaches a worker
    publish_job(create_celery(redis_server.url, tiny_worker.queue), job, tiny_worker.queue)

    # Then it fails with the upload's code, and says why
    ended = wait_for_job(client, job_id, tiny_worker)
    redis_client.delete(*queue_names(idle))
    assert (ended["status"], ended["error"]["code"]) == ("failed", "upload_missing")


@pytest.fixture
def slow_image() -> Iterator[str]:
    """A URL whose image arrives only once the test has ended (or after SLOW_S)."""
    released = threading.Event()

    class Slow(QuietHandler):
        def do_GET(self) -> None:
            released.wait(SLOW_S)
            self.answer(200, "image/png", shape_png("red"))

    with http_server(Slow) as port:
        yield f"http://127.0.0.1:{port}/slow.png"
        released.set()


def test_a_batch_item_still_loading_at_the_job_limit_fails_timeout(
    redis_server: RedisProcess, tiny_model_dir: Path, slow_image: str, tmp_path: Path
) -> None:
    # Given a worker whose jobs may run 5 s (a 15 s limit less its 10 s margin), and an image that never comes in time
    queue = f"limit-{secrets.token_hex(4)}"
    worker = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "w.log", BLIPQ_JOB_TIME_LIMIT_S="15")
    try:
        client = api_client(redis_server.url, queue, job_time_limit_s=15)
        response = client.post("/v1/batches", json={"images": [slow_image], "questions": ["what color?"]})
        batch_id = response.get_json()["id"]

        batch = wait_for_batch(client, batch_id, worker)
        [line] = client.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    finally:
        stop_process(worker.process)

    # Then the item fails `timeout` at the limit, not when the image finally arrives
    assert batch["errors"] == {"timeout": 1}, batch
    assert json.loads(line)["error"] == {"code": "timeout", "message": "the job ran past its time limit of 5 s"}
