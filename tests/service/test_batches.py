"""Batches: many questions about many images in one request, answered as single jobs are, sent in chunks."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.admission import queue_depth, queue_names
from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess, start_redis, stop_process
from contract.batch_scripts import SKIPPED
from contract.batch_store import BatchStore
from contract.batches import outcome_value
from contract.broker import create_celery, publish_chunk
from contract.job_store import JobStore
from contract.keys import batch_keys, batch_outcomes_key, running_key, webhook_outbox_key
from contract.states import JobStatus
from contract.transitions import CANCELED_RERUN_MESSAGE
from tests.support.answers import reference_answers
from tests.support.holding_worker import HOLDING_QUESTION, RELEASE_KEY
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    QUICK_RECOVERY,
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    start_worker,
    wait_for_batch,
    wait_for_job,
    wait_for_status,
)
from tests.support.webhooks import QUICK_WEBHOOKS, SECRET, Receiver, serve, verify_signature
from worker.reaper import ReaperPolicy, sweep
from worker.webhooks import SIGNATURE_HEADER

QUEUE = "batches"
COLORS = ["red", "green", "blue"]
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is in the image?", "how many?"]
SLOW_S = 0.4  # each image of the SIGKILL test arrives this late: its chunk surely runs when the pool process dies
PRIORITY_IMAGE_S = 0.05  # each image of the large low batch: 50 of them keep the worker busy for seconds
PRIORITY_IMAGES, HIGH_JOBS = 50, 3


class Images:
    """A real HTTP server of shape images, counting the requests for each path.

    `/<delay>/<color>-<shape>.png` arrives after `delay` seconds; any other path is a 404.
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.port = 0

    def url(self, color: str, shape: str = "circle", delay: float = 0.0) -> str:
        return f"http://127.0.0.1:{self.port}/{delay:g}/{color}-{shape}.png"

    def image(self, color: str, shape: str = "circle") -> bytes:
        return shape_png(color, shape=shape)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    served = Images()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            served.requests[self.path] += 1
            try:
                _, delay, name = self.path.split("/")
                color, shape = name.removesuffix(".png").split("-")
                time.sleep(float(delay))
                self.answer(200, "image/png", shape_png(color, shape=shape))
            except ValueError:
                self.answer(404, "text/plain", b"not found")

    with http_server(Handler) as port:
        served.port = port
        yield served


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker of this module's own that signs webhooks; its reaper never looks."""
    log_path = tmp_path_factory.mktemp("batches") / "worker.log"
    env = {**QUICK_WEBHOOKS, "BLIPQ_REAPER_INTERVAL_S": "3600"}
    process = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, **env)
    yield process
    stop_process(process.process)


@pytest.fixture
def api(redis_server: RedisProcess, worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    return api_client(redis_server.url, QUEUE, webhooks_enabled=True)


@pytest.fixture
def idle_api(redis_server: RedisProcess, idle_queue: str) -> FlaskClient:
    """The API in front of a queue that no worker reads, with the default job TTL."""
    return api_client(redis_server.url, idle_queue)


@pytest.fixture
def quiet_redis() -> Iterator[RedisProcess]:
    """A Redis of the test's own, which no worker of the session writes to: every command it counts is the test's."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def quiet_api(quiet_redis: RedisProcess) -> FlaskClient:
    """The API in front of a queue of `quiet_redis` that no worker reads."""
    return api_client(quiet_redis.url, "idle")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    httpd, receiver = serve("127.0.0.1")
    yield receiver
    httpd.shutdown()


def submit_batch(client: FlaskClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 202, response.get_json()
    batch_id: str = response.get_json()["id"]
    assert response.headers["Location"] == f"/v1/batches/{batch_id}"
    return batch_id


def results(client: FlaskClient, batch_id: str, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"/v1/batches/{batch_id}/results{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def tagging_body(images: Images, **extra: Any) -> dict[str, Any]:
    return {"images": [images.url(color) for color in COLORS], "questions": QUESTIONS, **extra}


def test_a_tagging_batch_answers_every_question_about_every_image_as_single_jobs_do(
    api: FlaskClient, worker: WorkerProcess, images: Images
) -> None:
    images.requests.clear()
    response = api.post("/v1/batches", json=tagging_body(images))
    assert response.status_code == 202, response.get_json()
    batch_id, count = response.get_json()["id"], response.get_json()["count"]

    batch = wait_for_batch(api, batch_id, worker)
    lines = results(api, batch_id)
    fetched = dict(images.requests)
    singles = [
        wait_for_job(
            api,
            api.post("/v1/jobs", json={"image_url": line["image_url"], "question": line["question"]}).get_json()["id"],
            worker,
        )
        for line in lines
    ]

    assert count == len(COLORS) * len(QUESTIONS)
    assert batch["counts"] == {**dict.fromkeys(map(str, JobStatus), 0), "succeeded": count}
    assert (batch["ended"], batch["progress"], batch["priority"]) == (count, 1.0, "normal")
    assert fetched == {f"/0/{color}-circle.png": 1 for color in COLORS}, "each image is fetched once for all"
    expected = [(images.url(color), question) for color, question in itertools.product(COLORS, QUESTIONS)]
    assert [(line["index"], line["image_url"], line["question"]) for line in lines] == [
        (index, *pair) for index, pair in enumerate(expected)
    ]
    assert [line["answer"] for line in lines] == [single["answer"] for single in singles]
    assert all(line["status"] == "succeeded" and line["error"] is None for line in lines)
    job = api.get(f"/v1/jobs/{lines[5]['job_id']}").get_json()
    assert (job["batch_id"], job["answer"]) == (batch_id, lines[5]["answer"])
    assert singles[0]["batch_id"] is None
    client = api.application.extensions["blipq"].store.client
    kept = [key for key in batch_keys(batch_id) if client.exists(key)]
    assert batch_outcomes_key(batch_id) in kept and all(client.ttl(key) > 0 for key in kept), "every key expires"


def test_results_are_paginated_in_item_order(api: FlaskClient, worker: WorkerProcess, images: Images) -> None:
    batch_id = submit_batch(api, tagging_body(images))
    wait_for_batch(api, batch_id, worker)

    everything = results(api, batch_id)
    page = results(api, batch_id, "?offset=5&limit=4")
    tail = results(api, batch_id, "?offset=10")
    beyond = results(api, batch_id, "?offset=99")

    assert [line["index"] for line in everything] == list(range(12))
    assert page == everything[5:9]
    assert tail == everything[10:]
    assert beyond == []
    assert api.get(f"/v1/batches/{batch_id}/results?limit=-1").get_json()["error"]["code"] == "pagination_invalid"


def test_an_item_whose_image_is_missing_fails_alone(api: FlaskClient, worker: WorkerProcess, images: Images) -> None:
    missing = images.url("red").replace("/0/", "/missing/")
    items = [
        {"image_url": images.url("blue"), "question": QUESTIONS[0]},
        {"image_url": missing, "question": QUESTIONS[0]},
        {"image_url": images.url("green"), "question": QUESTIONS[1]},
        {"image_url": missing, "question": QUESTIONS[1]},
    ]
    batch_id = submit_batch(api, {"items": items})

    batch = wait_for_batch(api, batch_id, worker)
    lines = results(api, batch_id)

    assert (batch["counts"]["succeeded"], batch["counts"]["failed"]) == (2, 2)
    assert [line["status"] for line in lines] == ["succeeded", "failed", "succeeded", "failed"]
    assert [line["error"]["code"] for line in lines if line["error"]] == ["image_fetch_failed"] * 2
    assert lines[0]["answer"] and lines[1]["answer"] is None


def test_a_batch_over_the_limit_empty_or_with_an_unknown_field_is_refused(idle_api: FlaskClient) -> None:
    urls = [f"https://images.example.com/{n}.png" for n in range(101)]
    refusals = {
        "batch_too_large": {"images": urls, "questions": [f"q{n}" for n in range(100)]},
        "batch_empty": {"items": []},
        "batch_empty ": {"items": None, "images": None, "questions": None},
        "unknown_field": {"items": [{"image_url": urls[0], "question": "what?"}], "tags": ["x"]},
        "question_empty": {"images": urls[:1], "questions": [" "]},
        "image_url_invalid": {"items": [{"image_url": "ftp://x/y.png", "question": "what?"}]},
        "batch_invalid": {"images": urls[:1]},
        "webhook_unavailable": {"images": urls[:1], "questions": ["what?"], "webhook": "https://hooks.example.com/"},
    }
    for code, body in refusals.items():
        response = idle_api.post("/v1/batches", json=body)
        assert (response.status_code, response.get_json()["error"]["code"]) == (422, code.strip()), body
    assert idle_api.post("/v1/batches", json={"images": [], "questions": ["what?"]}).get_json()["error"]["code"] == (
        "batch_empty"
    )
    accepted = idle_api.post("/v1/batches", json={"images": urls[:100], "questions": [f"q{n}" for n in range(100)]})
    assert (accepted.status_code, accepted.get_json()["count"]) == (202, 10_000)


def test_another_api_key_does_not_see_the_batch(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    alice, bob = new_api_key(), new_api_key()
    keys = (ApiKey("alice", hash_api_key(alice)), ApiKey("bob", hash_api_key(bob)))
    client = api_client(redis_server.url, f"idle-{secrets.token_hex(4)}", api_keys=keys)
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    body = {"images": ["https://images.example.com/a.png"], "questions": ["what?"]}
    batch_id = client.post("/v1/batches", json=body, headers=as_alice).get_json()["id"]

    for path in ("", "/results"):
        assert client.get(f"/v1/batches/{batch_id}{path}", headers=as_alice).status_code == 200
        response = client.get(f"/v1/batches/{batch_id}{path}", headers=as_bob)
        assert (response.status_code, response.get_json()["error"]["code"]) == (404, "batch_not_found")
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=as_bob).status_code == 404


def test_a_queued_batch_that_is_canceled_never_runs(idle_api: FlaskClient) -> None:
    body = {"images": [f"https://images.example.com/{n}.png" for n in range(10)], "questions": ["a?", "b?", "c?"]}
    batch_id = submit_batch(idle_api, body)

    canceled = idle_api.post(f"/v1/batches/{batch_id}/cancel")
    again = idle_api.post(f"/v1/batches/{batch_id}/cancel")
    batch = idle_api.get(f"/v1/batches/{batch_id}").get_json()

    assert canceled.status_code == 200
    assert canceled.get_json() == {"canceled": 30, "cancel_requested": 0, "already_ended": 0}
    assert (again.status_code, again.get_json()["error"]["code"]) == (409, "batch_ended")
    assert (batch["counts"]["canceled"], batch["ended"], batch["progress"]) == (30, 30, 1.0)
    assert {line["error"]["code"] for line in results(idle_api, batch_id)} == {"canceled"}


def test_a_chunk_whose_message_was_lost_is_published_again_by_the_reaper_and_answered(
    redis_server: RedisProcess, redis_client: redis.Redis, worker: WorkerProcess, idle_api: FlaskClient, images: Images
) -> None:
    # Given a batch whose chunk message vanished from its queue (a worker killed between BRPOP and its bookkeeping)
    batch_id = submit_batch(idle_api, {"items": [{"image_url": images.url("red"), "question": QUESTIONS[0]}]})
    idle_queue = idle_api.application.extensions["blipq"].settings.queue
    redis_client.delete(*queue_names(idle_queue))
    store = JobStore.connect(redis_server.url, ttl_s=600)

    # When the reaper sweeps that queue (a message found nowhere at one look counts as lost: no grace)
    republished = sweep(store, create_celery(redis_server.url, idle_queue), idle_queue, ReaperPolicy(grace_s=0))

    # Then the chunk is on its queue again, as stored with the batch; published where a worker reads, it is answered
    assert (republished, queue_depth(redis_client, idle_queue)) == (1, 1)
    payload = BatchStore(store).chunk_payload(batch_id, 0)
    assert payload is not None
    publish_chunk(create_celery(redis_server.url, QUEUE), QUEUE, payload)
    [line] = results(idle_api, batch_id)
    ended = wait_for_job(idle_api, line["job_id"], worker)
    assert (ended["status"], ended["batch_id"]) == ("succeeded", batch_id)
    assert idle_api.get(f"/v1/batches/{batch_id}").get_json()["progress"] == 1.0


def test_a_worker_killed_mid_batch_changes_no_answer(
    redis_server: RedisProcess, redis_client: redis.Redis, images: Images, tiny_model_dir: Path, tmp_path: Path
) -> None:
    queue = "batches-killed"
    # Every chunk the worker held when it died, started or not, is published again once its record expired.
    doomed = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "doomed.log", **QUICK_RECOVERY)
    client = api_client(redis_server.url, queue, batch_chunk_size=8)
    shapes = list(itertools.product(COLORS, ["circle", "square"]))
    body = {"images": [images.url(c, s, delay=SLOW_S) for c, s in shapes], "questions": QUESTIONS}
    expected = reference_answers(
        tiny_model_dir, [(images.image(c, s), question) for c, s in shapes for question in QUESTIONS]
    )
    batch_id = submit_batch(client, body)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while client.get(f"/v1/batches/{batch_id}").get_json()["counts"]["running"] == 0:
        assert time.monotonic() < deadline, doomed.log_tail()
        time.sleep(0.02)

    os.kill(doomed.process.pid, signal.SIGKILL)  # its chunks are held, unacknowledged, by a dead worker
    doomed.process.wait()
    successor = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "successor.log", **QUICK_RECOVERY)
    try:
        batch = wait_for_batch(client, batch_id, successor)
        lines = results(client, batch_id)
    finally:
        stop_process(successor.process)

    assert batch["counts"]["succeeded"] == len(expected), batch
    assert [line["answer"] for line in lines] == expected
    assert int(redis_client.hget("blipq:stats", "reruns") or 0) >= 1, "the killed chunk's jobs ran again"


def test_the_batch_webhook_is_posted_once_signed_when_the_last_item_ends(
    api: FlaskClient, worker: WorkerProcess, images: Images, receiver: Receiver, redis_client: redis.Redis
) -> None:
    batch_id = submit_batch(api, tagging_body(images, webhook=receiver.url("/batch")))

    wait_for_batch(api, batch_id, worker)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (api.get(f"/v1/batches/{batch_id}").get_json()["webhook_delivery"] or {}).get("status") != "delivered":
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.05)
    # Every item has ended (nothing can add it to the outbox again) and nothing of the batch is left there: no sender
    # holds a claim on it, nor will find it due, so no delivery can come after the one recorded.
    outbox = [member.decode() for member in redis_client.zrange(webhook_outbox_key(), 0, -1)]
    assert [member for member in outbox if batch_id in member] == []

    [delivery] = receiver.to("/batch")
    summary = json.loads(delivery.body)
    assert verify_signature(SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body)
    assert (summary["id"], summary["ended"], summary["counts"]["succeeded"]) == (batch_id, 12, 12)
    assert "webhook_delivery" not in summary
    assert len(receiver.received) == 1, "the items themselves are not posted without webhook_items"


def test_high_priority_jobs_overtake_a_large_low_priority_batch(
    api: FlaskClient, worker: WorkerProcess, images: Images
) -> None:
    wait_for_job(api, api.post("/v1/jobs", json={"image_url": images.url("red"), "question": "warm?"}).get_json()["id"])
    colors = ["red", "green", "blue", "black", "yellow"]
    urls = [
        images.url(c, s, delay=PRIORITY_IMAGE_S + n / 1000)
        for n, (c, s) in enumerate(
            itertools.islice(itertools.cycle(itertools.product(colors, ["circle", "square"])), PRIORITY_IMAGES)
        )
    ]
    batch_id = submit_batch(api, {"images": urls, "questions": QUESTIONS, "priority": "low"})
    high = [
        api.post("/v1/jobs", json={"image_url": images.url("teal"), "question": f"q{n}", "priority": "high"})
        for n in range(HIGH_JOBS)
    ]

    reached = items_taken_when_started(api, batch_id, [response.get_json()["id"] for response in high], worker)
    for response in high:
        assert wait_for_job(api, response.get_json()["id"], worker)["status"] == "succeeded"
    batch = wait_for_batch(api, batch_id, worker)

    assert batch["count"] == PRIORITY_IMAGES * len(QUESTIONS) == 200
    assert reached <= 100, f"{reached} of 200 batch items reached the model before the high jobs started"
    assert batch["counts"]["succeeded"] == 200


def items_taken_when_started(api: FlaskClient, batch_id: str, job_ids: list[str], worker: WorkerProcess) -> int:
    """The batch's items the model had taken (running or ended) once every job of `job_ids` had started, read as
    often as possible (a client's back-off between two reads would let more items through and blur the count)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        statuses = [api.get(f"/v1/jobs/{job_id}").get_json()["status"] for job_id in job_ids]
        batch = api.get(f"/v1/batches/{batch_id}").get_json()
        if "queued" not in statuses:
            return int(batch["ended"]) + int(batch["counts"]["running"])
        assert time.monotonic() < deadline, worker.log_tail()


# Bookkeeping: a few Redis commands per batch, per chunk and per model call, none per item


def commands_run(client: redis.Redis, action: Any) -> int:
    """How many commands Redis ran for `action()` (scripts' own commands included), less the two INFO reads."""
    before = int(client.info("stats")["total_commands_processed"])
    action()
    return int(client.info("stats")["total_commands_processed"]) - before - 1


def test_a_batch_summary_is_one_read_whatever_the_batch_size(
    quiet_api: FlaskClient, quiet_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.estimates.RATE_CHECK_S", 3600.0)  # the look at the workers, once a second, is not counted
    quiet_client = redis.Redis.from_url(quiet_redis.url)
    small = submit_batch(
        quiet_api, {"images": [f"https://images.example.com/{n}.png" for n in range(2)], "questions": ["a?"]}
    )
    large = submit_batch(
        quiet_api, {"images": [f"https://images.example.com/{n}.png" for n in range(2000)], "questions": ["a?", "b?"]}
    )

    reads = [commands_run(quiet_client, lambda b=b: quiet_api.get(f"/v1/batches/{b}")) for b in (small, large)]

    # The batch's hash; its estimate's counts: its level's waiting answers and its fair-share counts (one round trip).
    assert reads[0] == reads[1] <= 3, reads
    assert quiet_api.get(f"/v1/batches/{large}").get_json()["counts"]["queued"] == 4000


def test_a_chunk_starts_runs_and_ends_in_one_script_call_each_and_an_ended_item_never_changes(
    quiet_api: FlaskClient, quiet_redis: RedisProcess
) -> None:
    quiet_client = redis.Redis.from_url(quiet_redis.url)
    # Given a batch of one chunk of 32 answers, as a worker receives it
    body = {"images": [f"https://images.example.com/{n}.png" for n in range(8)], "questions": QUESTIONS}
    batch_id = submit_batch(quiet_api, body)
    queue = quiet_api.application.extensions["blipq"].settings.queue
    batches = BatchStore(JobStore.connect(quiet_redis.url, ttl_s=600))
    payload = batches.chunk_payload(batch_id, 0)
    assert payload is not None
    indices = [index for image in payload["images"] for index, _ in image["items"]]
    assert len(indices) == 32

    # When it starts, its items reach the model, and it ends (every call through redis-py's scripts: one EVALSHA)
    calls = [
        commands_run(quiet_client, lambda: batches.start_chunk(payload, queue, "w1", 3, "tiny")),
        commands_run(quiet_client, lambda: batches.run_items([(batch_id, indices)])),
    ]
    outcomes = [[str(i), *outcome_value("succeeded", answer=f"a{i}")] for i in indices[:-1]]
    outcomes.append([str(indices[-1]), *outcome_value("failed", code="image_invalid", message="not an image")])
    calls.append(commands_run(quiet_client, lambda: batches.end_chunk(payload, queue, outcomes)))
    again = batches.end_chunk(payload, queue, [[str(i), *outcome_value("succeeded", answer="late")] for i in indices])

    # Then each is one call of a few commands per chunk (not per item), and the counts moved with the items
    assert all(calls_made <= 40 for calls_made in calls), calls
    summary = quiet_api.get(f"/v1/batches/{batch_id}").get_json()
    counts = {"queued": 0, "running": 0, "succeeded": 31, "failed": 1, "canceled": 0, "expired": 0}
    assert summary["counts"] == counts
    assert (summary["ended"], summary["progress"], summary["errors"]) == (32, 1.0, {"image_invalid": 1})
    assert again == 0, "an ended item is never written again"
    lines = results(quiet_api, batch_id)
    assert [line["answer"] for line in lines[:-1]] == [f"a{i}" for i in range(31)]
    assert lines[-1]["error"] == {"code": "image_invalid", "message": "not an image"}
    item = quiet_api.get(f"/v1/jobs/{batch_id}.0").get_json()
    assert (item["status"], item["answer"], item["batch_id"], item["model"]) == ("succeeded", "a0", batch_id, "tiny")


def test_a_batch_cancel_mid_run_stops_every_item_not_yet_in_a_model_call(
    redis_server: RedisProcess, worker: WorkerProcess, images: Images
) -> None:
    # Given a batch running on a worker, its images slow to arrive, so that chunks are held and fetching
    client = api_client(redis_server.url, QUEUE, batch_chunk_size=2)
    urls = [
        images.url(c, s, delay=0.2 + n / 1000)
        for n, (c, s) in enumerate(itertools.product(COLORS, ["circle", "square", "triangle"]))
    ]
    batch_id = submit_batch(client, {"images": urls * 4, "questions": QUESTIONS[:1]})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while client.get(f"/v1/batches/{batch_id}").get_json()["counts"]["succeeded"] == 0:
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.02)

    # When it is canceled after its first answers
    canceled = client.post(f"/v1/batches/{batch_id}/cancel").get_json()
    batch = wait_for_batch(client, batch_id, worker)

    # Then exactly the items the model was answering at that instant ran on; every other item was canceled
    assert canceled["canceled"] > 0, canceled
    assert batch["counts"]["succeeded"] == canceled["already_ended"] + canceled["cancel_requested"], (canceled, batch)
    assert batch["counts"]["canceled"] == canceled["canceled"] == 36 - batch["counts"]["succeeded"]


def test_the_queue_bound_counts_answers_not_requests(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    queue = f"bounded-{secrets.token_hex(4)}"
    client = api_client(redis_server.url, queue, max_queue_depth=5)
    image = "https://images.example.com/1.png"
    too_large = client.post("/v1/batches", json={"images": [image] * 3000, "questions": ["a?", "b?", "c?"]})
    four = client.post("/v1/batches", json={"images": [image] * 2, "questions": ["a?", "b?"]})
    two = client.post("/v1/batches", json={"images": [image] * 2, "questions": ["a?"]})
    fifth = client.post("/v1/jobs", json={"image_url": image, "question": "a?"})
    sixth = client.post("/v1/jobs", json={"image_url": image, "question": "a?"})
    redis_client.delete(*queue_names(queue))

    assert (too_large.status_code, too_large.get_json()["error"]["code"]) == (422, "batch_too_large")
    assert four.status_code == 202
    assert (two.status_code, two.get_json()["error"]["code"], two.headers["Retry-After"]) == (503, "queue_full", "10")
    assert fifth.status_code == 202
    assert (sixth.status_code, sixth.get_json()["error"]["code"]) == (503, "queue_full")


def test_a_worker_holds_about_its_intake_in_answers_and_a_high_job_overtakes_within_it(
    redis_server: RedisProcess, redis_client: redis.Redis, images: Images, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given a worker that holds 16 answers at most (two chunks of 8), and a large low-priority batch of slow images
    queue = f"intake-{secrets.token_hex(4)}"
    env = {"BLIPQ_WORKER_INTAKE": "16", "BLIPQ_BATCH_MAX_SIZE": "8", "BLIPQ_REAPER_INTERVAL_S": "3600"}
    worker = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "worker.log", **env)
    try:
        client = api_client(redis_server.url, queue, batch_chunk_size=8)
        wait_for_job(
            client,
            client.post("/v1/jobs", json={"image_url": images.url("red"), "question": "?"}).get_json()["id"],
            worker,
        )
        shapes = itertools.islice(itertools.cycle(itertools.product(COLORS, ["circle", "square"])), PRIORITY_IMAGES)
        urls = [images.url(c, s, delay=PRIORITY_IMAGE_S + n / 1000) for n, (c, s) in enumerate(shapes)]
        batch_id = submit_batch(client, {"images": urls, "questions": QUESTIONS, "priority": "low"})
        held = []
        while (summary := client.get(f"/v1/batches/{batch_id}").get_json())["ended"] < 40:
            held.append(redis_client.zcard(running_key(queue)))  # chunks started and not ended
            assert worker.process.poll() is None, worker.log_tail()

        # When high-priority jobs arrive behind the held chunks
        reached_before = summary["ended"] + summary["counts"]["running"]  # items the model has taken
        high = [
            client.post("/v1/jobs", json={"image_url": images.url("teal"), "question": f"q{n}", "priority": "high"})
            for n in range(HIGH_JOBS)
        ]
        high_ids = [response.get_json()["id"] for response in high]
        reached_after = items_taken_when_started(client, batch_id, high_ids, worker)
        for job_id in high_ids:
            assert wait_for_job(client, job_id, worker)["status"] == "succeeded"
        batch = wait_for_batch(client, batch_id, worker)
    finally:
        stop_process(worker.process)

    # Then the worker never held more than its intake, and the high jobs waited for about what it held
    assert max(held) <= 2, f"held up to {max(held)} chunks of 8 answers"
    # what it held (16 answers) and at most one chunk more (8) reached the model before the high jobs started
    assert reached_after - reached_before <= 24, f"{reached_after - reached_before} batch items went before them"
    assert batch["counts"]["succeeded"] == 200


def test_an_ended_batch_can_be_deleted_at_once_and_a_running_one_cannot(
    idle_api: FlaskClient, redis_client: redis.Redis
) -> None:
    batch_id = submit_batch(
        idle_api, {"images": [f"https://images.example.com/{n}.png" for n in range(3)], "questions": ["a?"]}
    )

    running = idle_api.delete(f"/v1/batches/{batch_id}")
    idle_api.post(f"/v1/batches/{batch_id}/cancel")
    deleted = idle_api.delete(f"/v1/batches/{batch_id}")

    assert (running.status_code, running.get_json()["error"]["code"]) == (409, "batch_running")
    assert deleted.status_code == 204
    assert idle_api.get(f"/v1/batches/{batch_id}").status_code == 404
    assert list(redis_client.scan_iter(f"*{batch_id}*")) == [], "no key of the batch is left"


@pytest.fixture
def holding_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[WorkerProcess]:
    """A worker whose model call for HOLDING_QUESTION waits for the test, and that answers one text per call."""
    env = {"BLIPQ_BATCH_MAX_SIZE": "1", "BLIPQ_REAPER_INTERVAL_S": "3600"}
    module = "tests.support.holding_worker"
    process = start_worker(redis_server.url, tiny_model_dir, "batches-held", tmp_path / "w.log", module, **env)
    yield process
    redis_client.lpush(RELEASE_KEY, "go")  # a call the test left held must not keep the worker from stopping
    stop_process(process.process)
    redis_client.delete(RELEASE_KEY)


def test_a_batch_item_is_canceled_as_a_job_is_whether_queued_or_running(
    redis_server: RedisProcess, redis_client: redis.Redis, holding_worker: WorkerProcess, images: Images
) -> None:
    # Given: an item the model is answering (held there), and a batch whose items wait for the model behind it
    client = api_client(redis_server.url, holding_worker.queue)
    held = submit_batch(client, {"items": [{"image_url": images.url("red"), "question": HOLDING_QUESTION}]})
    wait_for_status(client, f"{held}.0", "running", holding_worker)
    waiting = submit_batch(client, {"images": [images.url("blue")], "questions": QUESTIONS[:2]})

    # When: one waiting item is canceled, and the running one
    queued = client.post(f"/v1/jobs/{waiting}.0/cancel")
    running = client.post(f"/v1/jobs/{held}.0/cancel")

    # Then: the waiting one ends canceled at once, its cancel reported, and never runs...
    assert queued.status_code == 200, queued.get_json()
    canceled = queued.get_json()
    assert (canceled["status"], canceled["cancel_requested"]) == ("canceled", True)
    assert canceled["error"]["code"] == "canceled" and canceled["answer"] is None
    # ...and the running one runs to its end, its cancel reported from the moment it was asked
    assert running.status_code == 200, running.get_json()
    assert (running.get_json()["status"], running.get_json()["cancel_requested"]) == ("running", True)
    assert client.get(f"/v1/jobs/{held}.0").get_json()["cancel_requested"] is True
    redis_client.lpush(RELEASE_KEY, "go")
    ended = wait_for_job(client, f"{held}.0", holding_worker)
    assert (ended["status"], ended["cancel_requested"]) == ("succeeded", True) and ended["answer"], ended
    assert wait_for_batch(client, waiting, holding_worker)["counts"]["canceled"] == 1
    later = client.get(f"/v1/jobs/{waiting}.0").get_json()
    assert (later["status"], later["cancel_requested"], later["answer"]) == ("canceled", True, None)
    other = client.get(f"/v1/jobs/{waiting}.1").get_json()
    assert (other["status"], other["cancel_requested"]) == ("succeeded", False), other
    assert client.post(f"/v1/jobs/{held}.0/cancel").get_json()["error"]["code"] == "job_ended"


def test_a_running_item_whose_cancel_was_asked_is_not_run_again_after_its_worker_died(
    idle_api: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given: two chunks' items running on a worker ("w1"), and the cancel of one item of each asked meanwhile
    body = {"images": ["https://images.example.com/1.png", "https://images.example.com/2.png"], "questions": ["a?"]}
    batch_id = submit_batch(idle_api, body)
    store = BatchStore(JobStore(redis_client, 600))
    batch = store.get(batch_id)
    assert batch is not None
    payload = store.chunk_payload(batch_id, 0)
    assert payload is not None and len(payload["images"]) == 2
    assert store.start_chunk(payload, batch.queue, "w1", 2, "tiny") == 1
    assert store.run_items([(batch_id, [0, 1])]) == [{0, 1}]
    asked = idle_api.post(f"/v1/jobs/{batch_id}.0/cancel").get_json()
    assert (asked["status"], asked["cancel_requested"]) == ("running", True)

    # When: w1 dies, and the chunk is delivered again to another worker, which reports what it did not answer
    assert store.start_chunk(payload, batch.queue, "w2", 2, "tiny") == 2
    admitted = store.run_items([(batch_id, [0, 1])])
    store.end_chunk(payload, batch.queue, [["0", SKIPPED, "", ""], ["1", *outcome_value("succeeded", answer="no")]])

    # Then: the canceled item is not run again but ends canceled, as a job whose cancel was asked while it ran
    assert admitted == [{1}]
    item = idle_api.get(f"/v1/jobs/{batch_id}.0").get_json()
    assert (item["status"], item["cancel_requested"], item["answer"]) == ("canceled", True, None)
    assert item["error"] == {"code": "canceled", "message": CANCELED_RERUN_MESSAGE}
    assert idle_api.get(f"/v1/batches/{batch_id}").get_json()["counts"]["canceled"] == 1


def test_a_chunk_given_up_ends_an_item_whose_cancel_was_asked_canceled_not_worker_lost(
    idle_api: FlaskClient, redis_client: redis.Redis
) -> None:
    # Given: a chunk's two items running on a worker, and the cancel of one of them asked meanwhile
    body = {"images": ["https://images.example.com/1.png"], "questions": ["a?", "b?"]}
    batch_id = submit_batch(idle_api, body)
    store = BatchStore(JobStore(redis_client, 600))
    batch = store.get(batch_id)
    payload = store.chunk_payload(batch_id, 0)
    assert batch is not None and payload is not None
    assert store.start_chunk(payload, batch.queue, "w1", 1, "tiny") == 1
    assert store.run_items([(batch_id, [0, 1])]) == [{0, 1}]
    assert idle_api.post(f"/v1/jobs/{batch_id}.1/cancel").get_json()["cancel_requested"] is True
    lost_before = int(redis_client.hget("blipq:stats", "worker_lost") or 0)

    # When: its worker dies, and the chunk, delivered again, has used up its attempts
    assert store.start_chunk(payload, batch.queue, "w2", 1, "tiny") == -2

    # Then: the other item failed worker_lost, and the one whose cancel was asked ended canceled
    lines = results(idle_api, batch_id)
    assert [(line["status"], (line["error"] or {}).get("code")) for line in lines] == [
        ("failed", "worker_lost"),
        ("canceled", "canceled"),
    ]
    assert int(redis_client.hget("blipq:stats", "worker_lost") or 0) == lost_before + 1
