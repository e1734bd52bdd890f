"""End estimates on jobs and batches: answers ahead from each level's line, over the live workers' measured rate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
import redis
from flask.testing import FlaskClient

from api.estimates import NO_RATE, NO_WORKER
from contract.fleet import Announcer, WorkerRecord
from contract.job_store import JobStore
from contract.keys import kept_rate_key, worker_key, workers_key
from contract.states import JobPriority

JOB = {"question": "what color?", "image_url": "https://images.example.com/a.png"}
RATE = 4.0  # the announced worker's answers per busy second


@pytest.fixture(autouse=True)
def fresh_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read looks at the workers again: the tests announce and withdraw them between requests."""
    monkeypatch.setattr("api.estimates.RATE_CHECK_S", -1.0)


@pytest.fixture
def announced(redis_client: redis.Redis, idle_queue: str) -> Iterator[WorkerRecord]:
    """A live worker record of the idle queue that measured `RATE` answers per busy second (no process reads it)."""
    record = WorkerRecord(
        id=f"estimate:{idle_queue}", host="estimate", pid=1, queue=idle_queue, model="m", device="cpu",
        dtype="float32", loaded_at="", load_seconds=0.0, metrics_port=0,
    )  # fmt: skip
    Announcer(redis_client, record, 60, rates=lambda: (RATE / 2, RATE)).announce()
    yield record
    redis_client.delete(worker_key(record.id), kept_rate_key(idle_queue))
    redis_client.zrem(workers_key(idle_queue), record.id)


def submit_job(api: FlaskClient, priority: str = "normal") -> dict[str, object]:
    response = api.post("/v1/jobs", json={**JOB, "priority": priority})
    assert response.status_code == 202, response.get_json()
    body: dict[str, object] = response.get_json()
    return body


def estimate_of(api: FlaskClient, path: str) -> dict[str, object]:
    response = api.get(path)
    assert response.status_code == 200, response.get_json()
    found: dict[str, object] = response.get_json()["estimate"]
    return found


def test_without_a_live_worker_there_is_no_estimate_but_the_answers_ahead(idle_api: FlaskClient) -> None:
    first, second = submit_job(idle_api), submit_job(idle_api)

    assert first["estimate"] == {
        "ends_in_s": None,
        "ends_at": None,
        "answers_ahead": 0,
        "answers_per_s": None,
        "reason": NO_WORKER,
    }
    assert second["estimate"]["answers_ahead"] == 1  # type: ignore[index]
    assert estimate_of(idle_api, f"/v1/jobs/{second['id']}")["reason"] == NO_WORKER


def test_a_job_ends_its_answers_ahead_and_its_own_over_the_fleet_rate(
    idle_api: FlaskClient, announced: WorkerRecord
) -> None:
    for _ in range(3):
        submit_job(idle_api)

    accepted = submit_job(idle_api)
    estimate = accepted["estimate"]

    assert isinstance(estimate, dict)
    assert estimate["answers_ahead"] == 3
    assert estimate["answers_per_s"] == RATE
    assert estimate["ends_in_s"] == 1.0  # (3 ahead + its own) / 4 per s
    assert estimate["reason"] is None
    ends_at = datetime.fromisoformat(str(estimate["ends_at"]).replace("Z", "+00:00"))
    assert abs(ends_at.timestamp() - datetime.now().timestamp() - 1.0) < 5
    read = estimate_of(idle_api, f"/v1/jobs/{accepted['id']}")
    assert {**read, "ends_at": None} == {**estimate, "ends_at": None}, (
        "a read recomputes it: the same line, the same rate"
    )


def test_a_later_read_counts_less_ahead_as_the_fleet_starts_jobs_and_more_for_higher_arrivals(
    idle_api: FlaskClient, announced: WorkerRecord, redis_client: redis.Redis, idle_queue: str
) -> None:
    first, _ = submit_job(idle_api), submit_job(idle_api)
    job = submit_job(idle_api)
    later = submit_job(idle_api)  # behind it: never ahead
    path = f"/v1/jobs/{job['id']}"
    assert job["estimate"]["answers_ahead"] == 2  # type: ignore[index]

    store = JobStore(redis_client, ttl_s=600)
    store.begin_run(str(first["id"]), idle_queue, "m", "estimate:1", 3)  # what a worker's start does
    assert estimate_of(idle_api, path)["answers_ahead"] == 1
    assert estimate_of(idle_api, f"/v1/jobs/{later['id']}")["answers_ahead"] == 2

    submit_job(idle_api, priority="high")
    submit_job(idle_api, priority="low")
    assert estimate_of(idle_api, path)["answers_ahead"] == 2, "a high job arrived since: ahead; a low one: not"

    store.begin_run(str(job["id"]), idle_queue, "m", "estimate:1", 3)
    running = estimate_of(idle_api, path)
    assert running["answers_ahead"] == 0 and running["ends_in_s"] == 0.25  # its own answer, at 4 per s


def test_a_job_that_ended_has_no_estimate(idle_api: FlaskClient) -> None:
    job = submit_job(idle_api)

    canceled = idle_api.post(f"/v1/jobs/{job['id']}/cancel").get_json()

    assert canceled["status"] == "canceled" and canceled["estimate"] is None
    assert estimate_of(idle_api, f"/v1/jobs/{job['id']}") is None


def test_a_batch_ends_with_its_last_item(idle_api: FlaskClient, announced: WorkerRecord) -> None:
    submit_job(idle_api)
    submit_job(idle_api, priority="low")  # below it: never ahead
    body = {"images": [JOB["image_url"], "https://images.example.com/b.png"], "questions": ["a?", "b?", "c?"]}

    response = idle_api.post("/v1/batches", json=body)
    accepted = response.get_json()
    batch = estimate_of(idle_api, f"/v1/batches/{accepted['id']}")
    item = estimate_of(idle_api, f"/v1/jobs/{accepted['id']}.0")

    assert response.status_code == 202
    assert accepted["estimate"]["answers_ahead"] == 1
    assert accepted["estimate"]["ends_in_s"] == 1.75  # (1 ahead + 6 of its own) / 4 per s
    assert batch["answers_ahead"] == 1 and batch["ends_in_s"] == 1.75
    assert item["ends_in_s"] == 1.75, "an item shows its batch's end"


def test_live_workers_that_measured_no_rate_say_so(
    idle_api: FlaskClient, redis_client: redis.Redis, idle_queue: str
) -> None:
    record = WorkerRecord(
        id=f"unmeasured:{idle_queue}", host="u", pid=2, queue=idle_queue, model="m", device="cpu", dtype="float32",
        loaded_at="", load_seconds=0.0, metrics_port=0,
    )  # fmt: skip
    Announcer(redis_client, record, 60).announce()
    try:
        estimate = submit_job(idle_api)["estimate"]
    finally:
        redis_client.delete(worker_key(record.id))
        redis_client.zrem(workers_key(idle_queue), record.id)

    assert estimate == {
        "ends_in_s": None,
        "ends_at": None,
        "answers_ahead": 0,
        "answers_per_s": None,
        "reason": NO_RATE,
    }


def test_a_high_job_is_not_behind_normal_ones(idle_api: FlaskClient, announced: WorkerRecord) -> None:
    for _ in range(3):
        submit_job(idle_api)

    estimate = submit_job(idle_api, priority=str(JobPriority.HIGH))["estimate"]

    assert estimate["answers_ahead"] == 0 and estimate["ends_in_s"] == 0.25  # type: ignore[index]


def test_an_answer_takes_at_least_the_workers_fixed_latency(
    idle_api: FlaskClient, announced: WorkerRecord, redis_client: redis.Redis
) -> None:
    # Given: the worker's single jobs take 1.5 s from their start to their end (a slow fetch, say), at 4 answers/s
    Announcer(redis_client, announced, 60, rates=lambda: (RATE / 2, RATE), job_run_s=lambda: 1.5).announce()

    # When: a job meets no line
    first = submit_job(idle_api)["estimate"]

    # Then: it ends in its fixed latency, not in 1/4 s; one behind three others in 3/4 s more
    for _ in range(2):
        submit_job(idle_api)
    fourth = submit_job(idle_api)["estimate"]
    assert first["ends_in_s"] == 1.5, first  # type: ignore[index]
    assert fourth["answers_ahead"] == 3 and fourth["ends_in_s"] == 0.75 + 1.5, fourth  # type: ignore[index]
