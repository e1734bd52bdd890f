"""A job's life beyond queued -> running -> ended: cancels, idempotent submissions, priorities and deadlines."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from api.admission import queue_depth
from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess, stop_process
from contract.broker import TASK_VQA
from contract.job_store import JobStore
from contract.keys import broker_list_key, deadlines_key, job_key, unstarted_key, upload_key
from contract.states import JobPriority
from tests.support.images import shape_png
from tests.support.service import (
    HeldImage,
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    start_worker,
    wait_for_job,
    wait_for_status,
)
from worker.reaper import expire_overdue

WORKER_QUEUE = "lifecycle"
BACKLOG_IMAGE_S = 0.15  # each backlog job's image delay: 60 of them, 4 at a time, keep the worker busy for 2 s or more
CONCURRENCY = 4  # messages the worker holds at once: priorities order the queue, not what a worker already holds
LOW_JOBS, HIGH_JOBS = 60, 3
IMAGE_URL = "https://images.example.com/dog.png"  # never fetched: no worker reads the idle queue
JOB = {"question": "what is it?", "image_url": IMAGE_URL}


@pytest.fixture(scope="module")
def slow_images() -> Iterator[str]:
    """A server whose /<seconds>/<color>.png arrives after that many seconds; yields its base URL."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            _, delay, name = self.path.split("/")
            time.sleep(float(delay))
            self.answer(200, "image/png", shape_png(name.removesuffix(".png")))

    with http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker of this module's own; its reaper never looks, so what ends a job unrun is the start script."""
    log_path = tmp_path_factory.mktemp("lifecycle") / "worker.log"
    process = start_worker(
        redis_server.url,
        tiny_model_dir,
        WORKER_QUEUE,
        log_path,
        BLIPQ_REAPER_INTERVAL_S="3600",
        BLIPQ_WORKER_CONCURRENCY=str(CONCURRENCY),
    )
    yield process
    stop_process(process.process)


@pytest.fixture
def api(redis_server: RedisProcess, worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    """The API in front of the module's worker."""
    return api_client(redis_server.url, WORKER_QUEUE)


def submit(client: FlaskClient, body: dict[str, Any], **headers: str) -> str:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def assert_error(response: TestResponse, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]


# Cancels


def occupy(api: FlaskClient, worker: WorkerProcess, held_image: HeldImage) -> list[str]:
    """Give the worker a held job for each message it can hold, and wait until all run: until the test releases
    them, the next job waits queued."""
    busy = [submit(api, {"question": "what color?", "image_url": held_image.url}) for _ in range(CONCURRENCY)]
    for job_id in busy:
        wait_for_status(api, job_id, "running", worker)
    return busy


def test_a_queued_job_that_is_canceled_never_runs(
    api: FlaskClient, worker: WorkerProcess, slow_images: str, held_image: HeldImage, redis_client: redis.Redis
) -> None:
    # Given: the worker busy with held jobs, and a job queued behind them.
    busy = occupy(api, worker, held_image)
    queued = submit(api, {"question": "what color?", "image_url": f"{slow_images}/0/blue.png"})

    # When: the queued job is canceled...
    response = api.post(f"/v1/jobs/{queued}/cancel")

    # Then: it ends canceled at once, and when the worker reaches its message, it does not run it.
    assert response.status_code == 200, response.get_json()
    canceled = response.get_json()
    assert canceled["status"] == "canceled" and canceled["cancel_requested"] is True
    assert canceled["error"]["code"] == "canceled" and canceled["finished_at"]
    held_image.release.set()
    after = submit(api, {"question": "what color?", "image_url": f"{slow_images}/0/green.png"})
    assert wait_for_job(api, after, worker)["status"] == "succeeded"
    assert all(wait_for_job(api, job_id, worker)["status"] == "succeeded" for job_id in busy)
    # (its message went before `after`'s, on a first-in first-out queue; the start script counted no attempt)
    assert redis_client.hget(f"blipq:job:{queued}", "attempts") is None
    job = api.get(f"/v1/jobs/{queued}").get_json()
    assert job == canceled, "a canceled job never changes"
    assert job["started_at"] is None and job["model"] is None and job["answer"] is None
    assert api.get("/v1/stats").get_json()["executions"] == CONCURRENCY + 1, "the model ran for the other jobs only"


def test_a_running_job_that_is_canceled_ends_as_it_would_with_its_cancel_reported(
    api: FlaskClient, worker: WorkerProcess, held_image: HeldImage
) -> None:
    job_id = submit(api, {"question": "what color?", "image_url": held_image.url})
    wait_for_status(api, job_id, "running", worker)

    response = api.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "running" and response.get_json()["cancel_requested"] is True
    held_image.release.set()
    job = wait_for_job(api, job_id, worker)
    assert job["status"] == "succeeded" and job["answer"], job
    assert job["cancel_requested"] is True


def test_cancelling_an_ended_job_is_a_409_and_another_keys_job_a_404(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queue: str
) -> None:
    keys = {"alice": new_api_key(), "bob": new_api_key()}
    api_keys = tuple(ApiKey(name, hash_api_key(key)) for name, key in keys.items())
    client = api_client(redis_server.url, idle_queue, api_keys=api_keys)
    alice, bob = ({"Authorization": f"Bearer {keys[name]}"} for name in ("alice", "bob"))
    job_id = submit(client, JOB, **alice)

    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=bob), 404, "job_not_found")
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).get_json()["status"] == "queued", "bob changed nothing"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).get_json()["status"] == "canceled"
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=alice), 409, "job_ended")
    assert_error(client.post("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA/cancel", headers=alice), 404, "job_not_found")
    assert redis_client.zscore(unstarted_key(idle_queue), job_id) is None, "the reaper has nothing to look at"


# Idempotency


def test_the_same_idempotent_request_twice_makes_one_job(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    first = idle_api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "order-17"})
    again = idle_api.post("/v1/jobs", json=dict(reversed(JOB.items())), headers={"Idempotency-Key": "order-17"})

    assert first.status_code == again.status_code == 202
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert queue_depth(redis_client, idle_queue) == 1
    assert len(list(redis_client.scan_iter("blipq:job:*"))) == 1
    key_ttl = max(redis_client.ttl(key) for key in redis_client.scan_iter("blipq:idempotency:*"))
    assert 500 < key_ttl <= 600, "the key lives as long as its job"


def test_an_idempotency_key_reused_with_another_body_is_a_409(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    submit(idle_api, JOB, **{"Idempotency-Key": "order-18"})

    other = idle_api.post("/v1/jobs", json={**JOB, "priority": "high"}, headers={"Idempotency-Key": "order-18"})

    assert_error(other, 409, "idempotency_conflict")
    assert queue_depth(redis_client, idle_queue) == 1
    assert_error(
        idle_api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "has space"}), 400, "idempotency_key_invalid"
    )


def test_idempotency_keys_belong_to_their_owner(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queue: str
) -> None:
    keys = {"alice": new_api_key(), "bob": new_api_key()}
    client = api_client(
        redis_server.url, idle_queue, api_keys=tuple(ApiKey(n, hash_api_key(k)) for n, k in keys.items())
    )
    ids = {
        name: submit(client, JOB, **{"Authorization": f"Bearer {key}", "Idempotency-Key": "same"})
        for name, key in keys.items()
    }
    assert ids["alice"] != ids["bob"]
    assert queue_depth(redis_client, idle_queue) == 2


def test_an_idempotent_upload_is_recognised_by_its_question_and_bytes(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    def post(image: bytes, question: str = "what color?") -> TestResponse:
        form = {"question": question, "priority": "low", "image": (io.BytesIO(image), "i.png", "image/png")}
        return idle_api.post("/v1/jobs", data=form, headers={"Idempotency-Key": "upload-1"})

    first, same = post(shape_png("red")), post(shape_png("red"))
    other_image, other_question = post(shape_png("blue")), post(shape_png("red"), "what shape?")

    assert first.status_code == same.status_code == 202
    assert same.get_json()["id"] == first.get_json()["id"]
    assert_error(other_image, 409, "idempotency_conflict")
    assert_error(other_question, 409, "idempotency_conflict")
    assert queue_depth(redis_client, idle_queue) == 1
    assert idle_api.get(f"/v1/jobs/{first.get_json()['id']}").get_json()["priority"] == "low"


def test_concurrent_duplicates_all_get_the_one_job(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queue: str
) -> None:
    app = api_client(redis_server.url, idle_queue).application
    start = threading.Barrier(8)
    answers: list[TestResponse] = []

    def post() -> None:
        client = app.test_client()
        start.wait()
        answers.append(client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [answer.status_code for answer in answers] == [202] * 8
    assert len({answer.get_json()["id"] for answer in answers}) == 1
    assert queue_depth(redis_client, idle_queue) == 1
    assert len(list(redis_client.scan_iter("blipq:job:*"))) == 1


# Priorities


def test_each_priority_level_has_its_own_broker_list_and_an_unmarked_message_waits_as_normal(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    ids = {level: submit(idle_api, {**JOB, "priority": str(level)}) for level in JobPriority}
    idle_api.application.extensions["blipq"].celery.send_task(TASK_VQA, args=[{}], queue=idle_queue)

    lengths = {level: redis_client.llen(broker_list_key(idle_queue, level)) for level in JobPriority}
    assert lengths == {JobPriority.HIGH: 1, JobPriority.NORMAL: 2, JobPriority.LOW: 1}
    assert broker_list_key(idle_queue, JobPriority.HIGH) == idle_queue, "kombu pops this one first"
    for level, job_id in ids.items():
        assert idle_api.get(f"/v1/jobs/{job_id}").get_json()["priority"] == level
        assert redis_client.zscore(unstarted_key(idle_queue, level), job_id) is not None


def test_high_priority_jobs_overtake_a_backlog_of_low_priority_ones(
    api: FlaskClient, worker: WorkerProcess, slow_images: str
) -> None:
    # Given: a worker working through a backlog of low-priority jobs, each a little slow.
    image = f"{slow_images}/{BACKLOG_IMAGE_S}/red.png"
    low = [submit(api, {"question": "what color?", "image_url": image, "priority": "low"}) for _ in range(LOW_JOBS)]
    wait_for_job(api, low[2], worker)
    # When: a few high-priority jobs arrive after them...
    high = [submit(api, {"question": "what color?", "image_url": image, "priority": "high"}) for _ in range(HIGH_JOBS)]
    # Then: they finish before most of the backlog (the worker takes them as soon as its current job ends).
    finished = {job_id: wait_for_job(api, job_id, worker)["finished_at"] for job_id in high + low}
    for job_id in high:
        low_after = sum(
            datetime.fromisoformat(finished[other]) > datetime.fromisoformat(finished[job_id]) for other in low
        )
        assert low_after >= LOW_JOBS * 2 // 3, f"a high job finished before only {low_after} of {LOW_JOBS} low ones"


# Deadlines


def pass_deadline(redis_client: redis.Redis, queue: str, job_id: str) -> None:
    """Move a queued job's deadline a minute into the past, in its record and its queue's set of deadlines: as if
    the test had waited for it, with no race against the clock."""
    past = time.time() - 60
    redis_client.hset(job_key(job_id), "deadline_at", str(past))
    redis_client.zadd(deadlines_key(queue), {job_id: past})


def test_a_job_still_queued_at_its_deadline_expires_unrun_when_the_worker_reaches_it(
    api: FlaskClient, worker: WorkerProcess, slow_images: str, held_image: HeldImage, redis_client: redis.Redis
) -> None:
    # Given: the worker busy with held jobs, and a job queued behind them whose deadline passed.
    occupy(api, worker, held_image)
    hurried = submit(api, {"question": "what color?", "image_url": f"{slow_images}/0/blue.png", "deadline_s": 300})
    pass_deadline(redis_client, WORKER_QUEUE, hurried)
    after = submit(api, {"question": "what color?", "image_url": f"{slow_images}/0/green.png"})

    # When: the worker gets to it, past its deadline (the test reads Redis, not the API, which would expire it too)...
    held_image.release.set()
    assert wait_for_job(api, after, worker)["status"] == "succeeded"

    # Then: the start script ended it expired, and the model never ran for it.
    # (its message went before `after`'s, on a first-in first-out queue; the start script counted no attempt)
    assert redis_client.hget(f"blipq:job:{hurried}", "attempts") is None
    job = JobStore(redis_client, 600).get(hurried)
    assert job is not None
    public = job.to_public()
    assert public["status"] == "expired" and public["error"]["code"] == "deadline_exceeded", public
    assert public["started_at"] is None and public["model"] is None and public["answer"] is None
    assert datetime.fromisoformat(public["deadline_at"]) <= datetime.fromisoformat(public["finished_at"])
    assert api.get("/v1/stats").get_json()["executions"] == CONCURRENCY + 1, "the model ran for the other jobs only"


def test_a_read_past_the_deadline_shows_the_job_expired(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    form = {"question": "what?", "deadline_s": "300", "image": (io.BytesIO(shape_png("red")), "i.png", "image/png")}
    job_id = idle_api.post("/v1/jobs", data=form).get_json()["id"]
    queued = idle_api.get(f"/v1/jobs/{job_id}").get_json()
    assert queued["status"] == "queued" and queued["deadline_at"] and queued["error"] is None

    pass_deadline(redis_client, idle_queue, job_id)
    job = idle_api.get(f"/v1/jobs/{job_id}").get_json()

    assert job["status"] == "expired" and job["error"]["code"] == "deadline_exceeded", job
    assert job["finished_at"] and job["started_at"] is None
    assert not redis_client.exists(upload_key(job_id)), "an ended job's upload is deleted"
    assert redis_client.zscore(unstarted_key(idle_queue), job_id) is None
    assert redis_client.zscore(deadlines_key(idle_queue), job_id) is None
    assert_error(idle_api.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_ended")


def test_the_reaper_expires_jobs_whose_deadline_passed_and_only_those(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    hurried = submit(idle_api, {**JOB, "deadline_s": 300})
    patient = submit(idle_api, {**JOB, "deadline_s": 300})
    store = JobStore(redis_client, 600)
    pass_deadline(redis_client, idle_queue, hurried)

    assert expire_overdue(store, idle_queue) == 1

    statuses = {job_id: store.get(job_id).status for job_id in (hurried, patient)}  # type: ignore[union-attr]
    assert statuses == {hurried: "expired", patient: "queued"}
    assert_error(idle_api.post(f"/v1/jobs/{hurried}/cancel"), 409, "job_ended")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"priority": "urgent"}, "priority_invalid"),
        ({"priority": 1}, "priority_invalid"),
        ({"deadline_s": 0}, "deadline_invalid"),
        ({"deadline_s": -5}, "deadline_invalid"),
        ({"deadline_s": "soon"}, "deadline_invalid"),
        ({"deadline_s": True}, "deadline_invalid"),
        ({"deadline_s": 601}, "deadline_invalid"),
        ({"webhook": "ftp://hooks.example.com/x"}, "webhook_invalid"),
        ({"webhook": "https://hooks.example.com/x"}, "webhook_unavailable"),
    ],
)
def test_bad_lifecycle_fields_are_refused_with_their_code(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str, fields: dict[str, Any], code: str
) -> None:
    assert_error(idle_api.post("/v1/jobs", json={**JOB, **fields}), 422, code)
    assert queue_depth(redis_client, idle_queue) == 0
