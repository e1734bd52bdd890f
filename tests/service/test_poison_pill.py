"""A poison pill: a job that kills its worker each time it runs fails `worker_lost` once it used its attempts, and is
not run again; the worker started after it goes on with other jobs."""

from __future__ import annotations

import io
import itertools
import os
import queue
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from blipq.up_redis import RedisProcess, stop_process
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    start_worker,
    wait_for_status,
)

QUEUE = "poison"
# A worker whose record (refreshed every second) is gone 3 s after it died, and a reaper that looks every 2 s: the job
# a killed worker held is published again within seconds, not after the visibility timeout.
QUICK_RECOVERY = {"BLIPQ_ANNOUNCE_INTERVAL_S": "1", "BLIPQ_REAPER_INTERVAL_S": "2"}


@dataclass
class HeldImage:
    """An image whose server reports each request for it and never answers: a job fetching it is running, and stays
    so until its worker dies."""

    url: str
    requests: queue.Queue[str]

    def wait_for_request(self, worker: WorkerProcess) -> None:
        """Wait until a worker asks for the image (the job's run has started and fetches it)."""
        try:
            self.requests.get(timeout=JOB_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"no worker asked for the image\n{worker.log_tail()}") from None


@pytest.fixture
def held_image() -> Iterator[HeldImage]:
    requests: queue.Queue[str] = queue.Queue()
    over = threading.Event()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests.put(self.path)
            over.wait()  # then closes the connection unanswered: its worker was killed long ago

    with http_server(Handler) as port:
        yield HeldImage(f"http://127.0.0.1:{port}/held.png", requests)
        over.set()


def test_a_job_that_kills_its_worker_every_time_fails_worker_lost(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path, held_image: HeldImage
) -> None:
    # Given: workers allowed two attempts per job, and a job whose image its server holds
    logs = (tmp_path / f"w{i}.log" for i in itertools.count())
    env = {"BLIPQ_MAX_ATTEMPTS": "2", **QUICK_RECOVERY}
    worker = start_worker(redis_server.url, tiny_model_dir, QUEUE, next(logs), **env)
    client = api_client(redis_server.url, QUEUE)
    try:
        response = client.post("/v1/jobs", json={"image_url": held_image.url, "question": "what color is the shape?"})
        assert response.status_code == 202, response.get_json()
        job_id = response.get_json()["id"]

        # When: its worker dies while it runs the job (a poison pill), each time, and is started again
        for attempt in (1, 2):
            held_image.wait_for_request(worker)
            assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "running"
            assert redis_client.hget(f"blipq:job:{job_id}", "attempts") == str(attempt).encode()
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
            worker = start_worker(redis_server.url, tiny_model_dir, QUEUE, next(logs), **env)

        # Then: the next delivery gives up on it without running it, and the worker goes on with other jobs
        job = wait_for_status(client, job_id, "failed", worker)
        assert job["error"]["code"] == "worker_lost", job
        assert held_image.requests.empty(), "the job ran a third time"
        image = {"image": (io.BytesIO(shape_png("blue")), "blue.png", "image/png")}
        next_id = client.post("/v1/jobs", data={"question": "what color?", **image}).get_json()["id"]
        assert wait_for_status(client, next_id, "succeeded", worker)["answer"]
        assert client.get("/v1/stats").get_json()["worker_lost"] == 1
    finally:
        stop_process(worker.process)
