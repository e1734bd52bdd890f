"""Documented failure paths, each reached for real: a job for the wrong model, an upload gone, a job past its limit, a
model call that hangs, a deploy whose grace expires, a worker killed holding messages, a submission that fails."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.admission import queue_names
from api.app import create_app
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, stop_process
from contract.broker import create_celery, publish_job
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_now
from contract.keys import unstarted_key, waiting_answers_key
from contract.states import JobStatus
from tests.support.hanging_worker import HANGING_QUESTION
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    ImageServer,
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    start_worker,
    wait_for_batch,
    wait_for_job,
    wait_for_worker_record,
)
from worker.batching import EXIT_MODEL_HUNG
from worker.reaper import ReaperPolicy, sweep

SLOW_S = 30.0  # an image that arrives this late is still loading when a 5 s job limit ends
HANGING_MODULE = "tests.support.hanging_worker"
# Workers that refresh their record every second (gone 3 s after they die) and a reaper that looks every second.
QUICK_RECOVERY = {"BLIPQ_ANNOUNCE_INTERVAL_S": "1", "BLIPQ_REAPER_INTERVAL_S": "1"}


def test_a_caption_job_sent_to_a_vqa_worker_fails_wrong_task_and_the_worker_goes_on(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    # Given a misconfigured fleet: beside an API that sends questions to the VQA worker, another that routes captions
    # to that worker's queue
    client = api_client(redis_server.url, tiny_worker.queue)
    misrouting = api_client(redis_server.url, "questions-elsewhere", caption_queue=tiny_worker.queue)
    image = {"image": (io.BytesIO(shape_png("red")), "red.png")}

    wrong = misrouting.post("/v1/jobs", data={"task": "caption", **image}).get_json()["id"]
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


def test_a_model_call_that_hangs_fails_its_job_timeout_and_the_watchdog_ends_the_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a worker whose model hangs on one question, with a 15 s hard limit (its jobs may run 5 s)
    queue = f"hang-{secrets.token_hex(4)}"
    env = {"BLIPQ_JOB_TIME_LIMIT_S": "15"}
    hanging = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "hang.log", HANGING_MODULE, **env)
    client = api_client(redis_server.url, queue, job_time_limit_s=15)
    image = shape_png("red")
    try:
        # When a job's model call hangs
        job_id = client.post("/v1/jobs", data={"question": HANGING_QUESTION, "image": (io.BytesIO(image), "r")})
        job = wait_for_job(client, job_id.get_json()["id"], hanging)

        # Then the job fails `timeout` at its limit, and the watchdog ends the worker at the hard limit
        assert (job["status"], job["error"]["code"]) == ("failed", "timeout"), job
        assert hanging.process.wait(JOB_TIMEOUT_S) == EXIT_MODEL_HUNG, hanging.log_tail()
        assert "a model call has run for over 15 s: the worker exits" in hanging.log_tail()
    finally:
        stop_process(hanging.process)
    # And a fresh worker (a supervisor's restart) serves the queue
    fresh = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "fresh.log", **env)
    try:
        job_id = client.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(image), "r")})
        assert wait_for_job(client, job_id.get_json()["id"], fresh)["status"] == "succeeded"
    finally:
        stop_process(fresh.process)


@pytest.fixture
def held_image() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """A URL whose image arrives once the test releases it; yields (url, fetch started, release)."""
    started, released = threading.Event(), threading.Event()

    class Held(QuietHandler):
        def do_GET(self) -> None:
            started.set()
            released.wait(SLOW_S)
            self.answer(200, "image/png", shape_png("red"))

    with http_server(Held) as port:
        yield f"http://127.0.0.1:{port}/held.png", started, released
        released.set()


def test_jobs_still_held_when_a_sigterm_grace_expires_run_again_on_another_worker(
    redis_server: RedisProcess,
    tiny_model_dir: Path,
    held_image: tuple[str, threading.Event, threading.Event],
    tmp_path: Path,
) -> None:
    url, fetching, release = held_image
    queue = f"grace-{secrets.token_hex(4)}"
    env = {"BLIPQ_SHUTDOWN_GRACE_S": "1", **QUICK_RECOVERY}
    first = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "first.log", **env)
    client = api_client(redis_server.url, queue)
    second = None
    try:
        # Given a job running on a worker (its image still arriving), and a second worker ready
        job_id = client.post("/v1/jobs", json={"image_url": url, "question": "what color?"}).get_json()["id"]
        assert fetching.wait(JOB_TIMEOUT_S), first.log_tail()
        second = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "second.log", **env)
        wait_for_worker_record(redis_server.url, queue, 2, second)

        # When the first is told to stop (a deploy) and its grace expires with the job still held
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(JOB_TIMEOUT_S) == 0, first.log_tail()
        assert "the jobs still held after the 1 s shutdown grace go to other workers" in first.log_tail()
        release.set()

        # Then the job runs again on the second worker, and succeeds there
        job = wait_for_job(client, job_id, second)
        store = JobStore.connect(redis_server.url, 600)
        record = store.client.hmget(f"blipq:job:{job_id}", "worker", "attempts")
        assert job["status"] == "succeeded", job
        assert record == [f"{socket.gethostname()}:{second.process.pid}".encode(), b"2"], record
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_process(worker.process)


def test_a_message_a_killed_worker_had_received_but_not_started_runs_again_once_its_record_expires(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    queue = f"held-{secrets.token_hex(4)}"
    first = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "first.log", **QUICK_RECOVERY)
    second = None
    store = JobStore.connect(redis_server.url, 600)
    try:
        wait_for_worker_record(redis_server.url, queue, 1, first)
        # Given a worker that received a job's message and has not started it (its submission is not accepted yet,
        # so the worker asks again for a few seconds, holding the message)
        job = Job(id=new_job_id(), status=JobStatus.QUEUED, question="what color?", created_at=utc_now())
        store.create(job, queue, shape_png("red"))
        publish_job(create_celery(redis_server.url, queue), job, queue)
        held = f"blipq:held:{queue}:{socket.gethostname()}:{first.process.pid}"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not store.client.sismember(held, job.id):
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.01)

        # When that worker is killed outright, then the job is accepted, and another worker serves the queue
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        assert store.accept(job, queue) == 0
        second = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "second.log", **QUICK_RECOVERY)

        # Then the reaper publishes the message the dead worker held, once its record expired, and the job runs
        client = api_client(redis_server.url, queue)
        assert wait_for_job(client, job.id, second)["status"] == "succeeded"
        assert "is gone with 1 messages it had not finished; 1 published again" in second.log_tail(200)
        assert not store.client.exists(held)
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_process(worker.process)


def test_a_submission_whose_message_cannot_be_published_at_once_is_accepted_and_runs(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, image_server: ImageServer
) -> None:
    # Given an API whose broker is unreachable while its job store is not
    app = create_app(ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue, wait_for_workers=True))
    services = app.extensions["blipq"]
    app.extensions["blipq"] = dataclasses.replace(services, celery=create_celery("redis://127.0.0.1:1/0", "x"))

    # When a job is submitted: its acceptance holds it in its key's line, and its release (the publish) fails
    image_server.routes["/unpublished.png"] = (200, "image/png", shape_png("red"))
    body = {"image_url": image_server.url("/unpublished.png"), "question": "q?"}
    response = app.test_client().post("/v1/jobs", json=body)

    # Then it is accepted (202): it is in Redis, and the worker's reaper publishes it at its next sweep
    assert response.status_code == 202, response.get_json()
    done = wait_for_job(api_client(redis_server.url, tiny_worker.queue), response.get_json()["id"], tiny_worker)
    assert done["status"] == "succeeded", done


def test_a_pending_submission_is_started_by_no_worker_and_published_by_no_reaper(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_worker: WorkerProcess
) -> None:
    # Given a job left pending (its API lost Redis before it could accept or withdraw it), its message delivered
    store = JobStore(redis_client, 600)
    job = Job(id=new_job_id(), status=JobStatus.QUEUED, question="what color?", created_at=utc_now())
    store.create(job, tiny_worker.queue, shape_png("red"))
    publish_job(create_celery(redis_server.url, tiny_worker.queue), job, tiny_worker.queue)

    # When the worker gives up waiting for its acceptance, and the reaper sweeps with every wait at zero
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while f"job {job.id} was not accepted within" not in tiny_worker.log_tail(400):
        assert time.monotonic() < deadline, tiny_worker.log_tail()
        time.sleep(0.05)
    republished = sweep(
        store, create_celery(redis_server.url, tiny_worker.queue), tiny_worker.queue, ReaperPolicy(grace_s=0)
    )

    # Then it never ran, and nothing published it again
    assert republished == 0
    assert redis_client.hmget(f"blipq:job:{job.id}", "status", "pending") == [b"queued", b"1"]
    assert store.get(job.id) is None  # not a job anyone was promised


def test_a_job_too_few_replicas_acknowledge_is_withdrawn_and_answered_503(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given an API that needs one replica to hold each job, and a Redis with none
    queue = f"durable-{secrets.token_hex(4)}"
    client = api_client(redis_server.url, queue, min_replicas_ack=1, replica_ack_timeout_ms=50)
    jobs_before = set(redis_client.scan_iter("blipq:job:*"))

    response = client.post("/v1/jobs", json={"image_url": "http://127.0.0.1:9/a.png", "question": "q?"})

    # Then it is refused, and withdrawn: its message, which no worker has taken yet, finds no job when one does
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "replicas_unavailable"
    assert set(redis_client.scan_iter("blipq:job:*")) == jobs_before
    assert not redis_client.zcard(unstarted_key(queue))
    assert int(redis_client.hget(waiting_answers_key(), unstarted_key(queue)) or 0) == 0
    redis_client.delete(*queue_names(queue))
