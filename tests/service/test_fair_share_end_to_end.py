"""Fair share between API keys, end to end: real workers on the tiny model, the API with two keys, a real image
server. A small batch of one key ends while another key's backlog still waits; a higher priority still goes first;
and the promises hold under fair share: a worker killed mid-run loses nothing, a key that cancels its backlog or a
batch past its deadline leaves the other key's work to run to its end. (The Redis primary killed under fair share:
tests/service/test_failover.py, whose submissions come from two keys.)
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess, stop_process
from contract.fair_share import key_shares
from contract.keys import held_key, holders_key
from contract.states import JobPriority
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    QUICK_RECOVERY,
    HeldImage,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_worker_record,
)

ALICE, BOB = new_api_key(), new_api_key()
KEYS = (ApiKey("alice", hash_api_key(ALICE)), ApiKey("bob", hash_api_key(BOB)))
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is it?", "is it red?", "is it big?"]
# The answer cache off: each backlog answer runs the model, so that a backlog takes the time it would.
WORKER_ENV = {"BLIPQ_ANSWER_CACHE": "off", **QUICK_RECOVERY}


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def queue() -> str:
    return f"fair-{secrets.token_hex(4)}"


@pytest.fixture
def pictures(image_server: ImageServer) -> Callable[[str, int], list[str]]:
    """`count` distinct image URLs (each its own path, so that none is answered from another's fetch) of a colour."""
    image = shape_png("red")

    def urls(name: str, count: int) -> list[str]:
        paths = [f"/fair/{name}/{number}.png" for number in range(count)]
        for path in paths:
            image_server.routes[path] = (200, "image/png", image)
        return [image_server.url(path) for path in paths]

    return urls


@pytest.fixture
def worker(redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path, queue: str) -> Iterator[WorkerProcess]:
    process = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "worker.log", **WORKER_ENV)
    wait_for_worker_record(redis_server.url, queue, 1, process)
    yield process
    stop_process(process.process)


def submit(api: FlaskClient, key: str, images: list[str], questions: int = 5, **extra: Any) -> str:
    body = {"images": images, "questions": QUESTIONS[:questions], **extra}
    response = api.post("/v1/batches", json=body, headers=as_key(key))
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def read(api: FlaskClient, key: str, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = api.get(f"/v1/batches/{batch_id}", headers=as_key(key)).get_json()
    return body


def wait_for(condition: Callable[[], bool], worker: WorkerProcess, what: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}\n{worker.log_tail()}"
        time.sleep(0.02)


def test_a_small_batch_ends_while_another_keys_backlog_waits_and_a_higher_priority_goes_first(
    redis_server: RedisProcess, worker: WorkerProcess, queue: str, pictures: Callable[[str, int], list[str]]
) -> None:
    api = api_client(redis_server.url, queue, api_keys=KEYS)
    # Given: alice's backlog of 1,000 answers, the worker at work on it
    backlog = submit(api, ALICE, pictures("backlog", 200))
    wait_for(lambda: read(api, ALICE, backlog)["ended"] > 0, worker, "the worker never started alice's backlog")

    # When: bob submits 50 answers at the normal level, and alice 10 at the high level
    small = submit(api, BOB, pictures("small", 10))
    urgent = submit(api, ALICE, pictures("urgent", 2), priority="high")

    # Then: alice's high batch ends first, then bob's, each while most of alice's backlog still waits
    wait_for(lambda: read(api, ALICE, urgent)["ended"] == 10, worker, "alice's high batch never ended")
    at_urgent_end = read(api, ALICE, backlog)["ended"]
    wait_for(lambda: read(api, BOB, small)["ended"] == 50, worker, "bob's batch never ended")
    at_small_end = read(api, ALICE, backlog)["ended"]
    assert at_urgent_end <= at_small_end < 500, (at_urgent_end, at_small_end)
    wait_for(lambda: read(api, ALICE, backlog)["ended"] == 1000, worker, "alice's backlog never ended")
    assert read(api, ALICE, backlog)["counts"]["succeeded"] == 1000
    assert read(api, BOB, small)["counts"]["succeeded"] == 50


def test_under_fair_share_a_worker_killed_mid_run_loses_nothing(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    tiny_model_dir: Path,
    tmp_path: Path,
    queue: str,
    pictures: Callable[[str, int], list[str]],
) -> None:
    # Given: two workers, and two keys' backlogs held in their lines and running
    workers = [
        start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / f"worker-{n}.log", **WORKER_ENV)
        for n in range(2)
    ]
    try:
        wait_for_worker_record(redis_server.url, queue, 2, workers[0])
        api = api_client(redis_server.url, queue, api_keys=KEYS)
        alices = submit(api, ALICE, pictures("alice", 120))
        bobs = submit(api, BOB, pictures("bob", 40))

        # When: a worker that holds messages is SIGKILLed
        def holding() -> list[bytes]:
            return [
                worker
                for worker in redis_client.smembers(holders_key(queue))
                if redis_client.scard(held_key(queue, worker.decode()))
            ]

        wait_for(lambda: bool(holding()), workers[0], "no worker ever held a message")
        pid = int(holding()[0].decode().rpartition(":")[2])
        victim = next(worker for worker in workers if worker.process.pid == pid)
        os.kill(pid, signal.SIGKILL)
        victim.process.wait()
        survivor = next(worker for worker in workers if worker is not victim)

        # Then: every item of both keys ends, answered (the reaper publishes again what the dead worker held, and
        # the survivor releases the rest), and both lines empty
        wait_for(lambda: read(api, ALICE, alices)["ended"] == 600, survivor, "alice's batch never ended")
        wait_for(lambda: read(api, BOB, bobs)["ended"] == 200, survivor, "bob's batch never ended")
        assert read(api, ALICE, alices)["counts"]["succeeded"] == 600
        assert read(api, BOB, bobs)["counts"]["succeeded"] == 200
        assert key_shares(redis_client, queue, JobPriority.NORMAL) == []
    finally:
        for worker in workers:
            stop_process(worker.process)


def test_a_key_that_cancels_its_backlog_and_a_batch_past_its_deadline_leave_the_other_keys_work_to_end(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    worker: WorkerProcess,
    queue: str,
    pictures: Callable[[str, int], list[str]],
    held_image: HeldImage,
) -> None:
    api = api_client(redis_server.url, queue, api_keys=KEYS)
    held = held_image
    # Given: the worker's hands full of work on a held image (alice's, and bob's batch with a deadline of 2 s), and
    # behind it the rest of alice's backlog and bob's other batch, in their lines
    first = submit(api, ALICE, [held.url], questions=1)
    assert held.requested.wait(JOB_TIMEOUT_S), worker.log_tail()
    backlog = submit(api, ALICE, [held.url] * 200)
    late = submit(api, BOB, [held.url] * 10, deadline_s=2)
    kept = submit(api, BOB, pictures("kept", 10))

    # When: alice cancels her backlog, bob's first batch passes its deadline, and the image comes
    canceled = api.post(f"/v1/batches/{backlog}/cancel", headers=as_key(ALICE)).get_json()
    wait_for(lambda: read(api, BOB, late)["ended"] == 50, worker, "bob's batch never expired")
    held.release.set()

    # Then: alice's canceled items never run, bob's late ones expired, and his other batch runs to its end
    wait_for(lambda: read(api, BOB, kept)["ended"] == 50, worker, "bob's other batch never ended")
    assert read(api, BOB, kept)["counts"]["succeeded"] == 50
    backlog_read = read(api, ALICE, backlog)
    assert backlog_read["counts"]["canceled"] + backlog_read["counts"]["succeeded"] == 1000, backlog_read
    assert backlog_read["counts"]["canceled"] >= 1000 - 200, (canceled, backlog_read)  # at most its hands' ran
    assert read(api, BOB, late)["counts"]["expired"] == 50, read(api, BOB, late)
    assert read(api, ALICE, first)["counts"]["succeeded"] == 1
    wait_for(lambda: key_shares(redis_client, queue, JobPriority.NORMAL) == [], worker, "a line never emptied")
