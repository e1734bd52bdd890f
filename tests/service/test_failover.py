"""Redis high availability through Sentinel: the primary dies with jobs in flight, and the promise of a 202 holds.

A real primary, a real replica and three real sentinels (the same redis-server binary, on free ports); the API and a
worker find the primary through the sentinels (BLIPQ_REDIS_SENTINELS) and the API answers 202 only once a replica
holds the job (BLIPQ_MIN_REPLICAS_ACK=1). The jobs come from two API keys, held in their lines and released in fair
share. Each submission fetches its image from a URL of its own, so that the image server's log says which submissions
ran.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess, SentinelGroup, start_sentinel_group, stop_process
from contract.images import decode_image
from contract.job_store import JobStore
from contract.keys import unstarted_key
from contract.redis_target import RedisTarget
from tests.support.images import shape_png
from tests.support.service import QuietHandler, api_client, http_server, start_worker
from worker.inference import answer_questions, load_model

QUEUE = "failover"
JOB_COUNT = 300
COLORS = ["red", "green", "blue", "black", "yellow", "teal"]
QUESTIONS = ["what color is the shape?", "is there a circle?"]
END_TIMEOUT_S = 240.0  # for every accepted job to end, a message restored after its visibility timeout included
DURING_FAILOVER_S = 8.0  # submissions go on this long after the primary is killed: before, during and after failover
# Two API keys, whose submissions alternate: the primary dies while both hold work in their lines (fair share).
KEYS = [new_api_key(), new_api_key()]
UNUSED_URL = "redis://127.0.0.1:1/0"  # with Sentinel only the database number of BLIPQ_REDIS_URL is used


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    # Two replicas: one becomes the primary, and the other keeps acknowledging its writes.
    group = start_sentinel_group(tmp_path / "redis", replicas=2)
    yield group
    group.stop()


class FetchLog:
    """The image server of this test: /<color>.png?n=<submission>, each request's submission number recorded."""

    def __init__(self) -> None:
        self.fetched: set[int] = set()
        self.lock = threading.Lock()
        self.images = {color: shape_png(color) for color in COLORS}

    def handler(self) -> type[QuietHandler]:
        log = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?n=")
                with log.lock:
                    log.fetched.add(int(query))
                self.answer(200, "image/png", log.images[path.strip("/").removesuffix(".png")])

        return Handler

    def expected(self, model_dir: Path) -> dict[tuple[str, str], str]:
        """What an undisturbed run answers, by (color, question): the inference core in this process."""
        loaded = load_model(str(model_dir), device="cpu", dtype="float32")
        return {
            (color, question): answer_questions(loaded, [decode_image(self.images[color], 10**6)], [question])[0]
            for color, question in itertools.product(COLORS, QUESTIONS)
        }


def test_a_primary_killed_with_jobs_in_flight_loses_no_202_and_runs_no_503(
    sentinel_group: SentinelGroup, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fetches = FetchLog()
    expected = fetches.expected(tiny_model_dir)
    sentinels = {"redis_sentinels": tuple(("127.0.0.1", port) for port in sentinel_group.sentinel_ports)}
    env = {
        "BLIPQ_REDIS_SENTINELS": sentinel_group.sentinel_addresses,
        "BLIPQ_REDIS_MASTER": sentinel_group.master,
        "BLIPQ_JOB_TIME_LIMIT_S": "15",  # a message restored after its visibility timeout comes back in 75 s
        "BLIPQ_ANNOUNCE_INTERVAL_S": "1",
        "BLIPQ_REAPER_INTERVAL_S": "1",
    }
    worker = start_worker(UNUSED_URL, tiny_model_dir, QUEUE, tmp_path / "worker.log", **env)
    client = api_client(
        UNUSED_URL, QUEUE, job_time_limit_s=15, min_replicas_ack=1, api_keys=configured(KEYS), **sentinels
    )
    target = RedisTarget(UNUSED_URL, sentinels["redis_sentinels"], sentinel_group.master)
    store = JobStore.connect(target, 3600, outage_s=30)
    accepted: dict[str, tuple[str, str]] = {}  # job id -> (color, question)
    refused: dict[int, str] = {}  # submission number -> error code, of those answered 503
    other: list[tuple[int, object]] = []
    with http_server(fetches.handler()) as port:

        def submit(number: int) -> None:
            color, question = COLORS[number % len(COLORS)], QUESTIONS[number % len(QUESTIONS)]
            body = {"image_url": f"http://127.0.0.1:{port}/{color}.png?n={number}", "question": question}
            response = client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {KEYS[number % 2]}"})
            if response.status_code == HTTPStatus.ACCEPTED:
                accepted[response.get_json()["id"]] = (color, question)
            elif response.status_code == HTTPStatus.SERVICE_UNAVAILABLE:
                refused[number] = response.get_json()["error"]["code"]
            else:
                other.append((response.status_code, response.get_json()))

        try:
            # Given: a few hundred jobs accepted, the worker at work on them.
            numbers = itertools.count()
            for number in itertools.islice(numbers, JOB_COUNT):
                submit(number)
            assert len(accepted) == JOB_COUNT and not other, (other, refused)
            wait_until(lambda: ended(store, accepted) >= JOB_COUNT // 10, worker.log_tail)

            # When: the primary is killed outright, and submissions go on through the failover.
            old_primary = sentinel_group.servers[0]
            os.kill(old_primary.process.pid, signal.SIGKILL)
            old_primary.process.wait()
            killed_at = time.monotonic()
            while time.monotonic() - killed_at < DURING_FAILOVER_S:
                submit(next(numbers))
            wait_until(lambda: sentinel_group.primary_port() not in (None, old_primary.port), worker.log_tail)

            # Then: every job answered 202 ends, with the answer an undisturbed run gives...
            wait_until(lambda: ended(store, accepted) == len(accepted), worker.log_tail)
            jobs = {job_id: store.get(job_id) for job_id in accepted}
            wrong = {
                job_id: job.to_public() if job else None
                for job_id, job in jobs.items()
                if job is None or job.answer != expected[accepted[job_id]]
            }
            assert not wrong, list(wrong.items())[:3]
            # ...submissions during the failover were answered 202 or 503, never anything else...
            assert not other, other[:3]
            assert len(accepted) > JOB_COUNT, "no submission was accepted after the failover"
            # ...and none answered 503 ran (its image was never fetched), nor can it: any other job record left is
            # pending, which no worker starts and the reaper does not see.
            with fetches.lock:
                ghosts = refused.keys() & fetches.fetched
            assert not ghosts, f"{len(ghosts)} submissions answered 503 ran"
            others = [key for key in store.client.scan_iter("blipq:job:*") if key.decode()[10:] not in accepted]
            assert all(store.client.hget(key, "pending") == b"1" for key in others), others
            codes = Counter(refused.values())
            print(f"failover: {len(accepted)} accepted, refused {dict(codes)} while no primary (or replica) answered")
        finally:
            stop_process(worker.process)


def configured(keys: list[str]) -> tuple[ApiKey, ...]:
    return tuple(ApiKey(f"key{number}", hash_api_key(key)) for number, key in enumerate(keys))


def ended(store: JobStore, accepted: dict[str, tuple[str, str]]) -> int:
    try:
        with store.client.pipeline(transaction=False) as pipe:
            for job_id in accepted:
                pipe.hget(f"blipq:job:{job_id}", "status")
            statuses = pipe.execute()
    except redis.RedisError:  # the primary is changing: ask again
        return -1
    return sum(status in (b"succeeded", b"failed") for status in statuses)


def wait_until(done: Callable[[], bool], log_tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + END_TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, log_tail()
        time.sleep(0.2)


# A submission that too few replicas acknowledge is withdrawn (503); its withdrawal is waited for as its acceptance is.
# Two replicas and BLIPQ_MIN_REPLICAS_ACK=2: one replica lags (its writes paused with CLIENT PAUSE WRITE, and never
# promoted), the other takes the acceptance and is then paused in turn, so that it holds the acceptance and not (yet)
# the withdrawal. A replica paused so reads its primary's stream and applies none of it; when its primary dies, what
# it had not applied is gone, and the sentinels promote it once it is let go.
ACK_WINDOW_MS = 2000  # how long a submission waits for its replicas: the test pauses one meanwhile
PAUSE_MS = 600_000  # longer than any test: a paused replica is let go by the test itself
SUBMISSIONS = {
    "job": ("/v1/jobs", {"image_url": "http://127.0.0.1:9/a.png", "question": "q?"}, "blipq:job:"),
    "batch": ("/v1/batches", {"images": ["http://127.0.0.1:9/a.png"], "questions": ["q?"]}, "blipq:batch:"),
}


@pytest.fixture
def lagging_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A primary, a replica the sentinels promote, and one they never promote (it lags, in the tests below)."""
    group = start_sentinel_group(tmp_path / "redis", replicas=2, never_promoted=1)
    yield group
    group.stop()


@dataclass
class HeldSubmission:
    """A submission under way in a thread, that the promotable replica holds accepted and no longer follows."""

    future: Future[TestResponse]
    record: str  # its record's key: blipq:job:<id> or blipq:batch:<id>


def submit_and_hold(group: SentinelGroup, client: FlaskClient, kind: str, pool: ThreadPoolExecutor) -> HeldSubmission:
    """Pause the lagging replica, submit, and pause the promotable replica as soon as it holds the acceptance."""
    path, body, prefix = SUBMISSIONS[kind]
    primary, promotable, lagging = (redis.Redis(port=server.port) for server in group.servers)
    lagging.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    future = pool.submit(client.post, path, json=body, headers={"Idempotency-Key": f"{kind}-once"})
    deadline = time.monotonic() + ACK_WINDOW_MS / 1000
    while not (accepted := [k for k in promotable.scan_iter(f"{prefix}*") if not promotable.hexists(k, "pending")]):
        assert time.monotonic() < deadline, "the replica never held the acceptance"
        time.sleep(0.005)
    promotable.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    assert primary.exists(accepted[0]), "paused before the withdrawal: the acceptance wait is not over yet"
    return HeldSubmission(future, accepted[0].decode())


def fail_over_to_paused_replica(group: SentinelGroup) -> redis.Redis:
    """Kill the primary, let the paused replicas go once their link is down, and wait for the first to be promoted."""
    old_primary, promotable, lagging = group.servers
    os.kill(old_primary.process.pid, signal.SIGKILL)
    old_primary.process.wait()
    clients = [redis.Redis(port=server.port) for server in (promotable, lagging)]
    deadline = time.monotonic() + END_TIMEOUT_S
    for client in clients:
        while client.info("replication")["master_link_status"] != "down":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.execute_command("CLIENT", "UNPAUSE")
    while group.primary_port() != promotable.port or clients[0].info("replication")["role"] != "master":
        assert time.monotonic() < deadline, "the sentinels did not promote the replica"
        time.sleep(0.1)
    return clients[0]


def withdrawal_waiting(primary: redis.Redis, record: str) -> bool:
    """The primary has withdrawn the submission, and a client waits there for replicas (WAIT) since."""
    waiting = [c for c in primary.client_list() if c.get("cmd") == "wait" and "b" in c.get("flags", "")]
    return not primary.exists(record) and bool(waiting)


def sentinel_api(group: SentinelGroup) -> FlaskClient:
    sentinels = tuple(("127.0.0.1", port) for port in group.sentinel_ports)
    return api_client(
        UNUSED_URL,
        QUEUE,
        min_replicas_ack=2,
        replica_ack_timeout_ms=ACK_WINDOW_MS,
        redis_sentinels=sentinels,
        redis_master=group.master,
    )


@pytest.mark.parametrize("kind", ["job", "batch"])
def test_a_503_whose_withdrawal_the_replicas_took_in_time_holds_through_a_failover(
    lagging_group: SentinelGroup, kind: str
) -> None:
    # Given: a submission the promotable replica holds accepted, answered 503 for want of the lagging replica
    client = sentinel_api(lagging_group)
    primary = redis.Redis(port=lagging_group.servers[0].port)
    with ThreadPoolExecutor(1) as pool:
        held = submit_and_hold(lagging_group, client, kind, pool)

        # When: both replicas catch up while the API waits on the withdrawal, and the primary dies after the 503
        while not held.future.done():
            if withdrawal_waiting(primary, held.record):
                for server in lagging_group.servers[1:]:
                    redis.Redis(port=server.port).execute_command("CLIENT", "UNPAUSE")
                break
            time.sleep(0.005)
        response = held.future.result()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "replicas_unavailable"
    new_primary = fail_over_to_paused_replica(lagging_group)

    # Then: the new primary holds no trace of it: it never runs
    assert not new_primary.exists(held.record), "a submission answered 503 came back with the failover"
    assert not new_primary.zcard(unstarted_key(QUEUE))


@pytest.mark.parametrize("kind", ["job", "batch"])
def test_a_503_whose_withdrawal_no_replica_took_is_found_again_by_its_idempotency_key(
    lagging_group: SentinelGroup, kind: str
) -> None:
    # Given: a submission the promotable replica holds accepted, and neither replica takes its withdrawal in time
    client = sentinel_api(lagging_group)
    with ThreadPoolExecutor(1) as pool:
        held = submit_and_hold(lagging_group, client, kind, pool)
        response = held.future.result()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "replicas_unavailable"
    assert "Idempotency-Key" in response.get_json()["error"]["message"]

    # When: the primary dies, the replica that missed the withdrawal takes over, and the client retries with its key
    new_primary = fail_over_to_paused_replica(lagging_group)
    assert new_primary.exists(held.record), "the failover brought the submission back"
    path, body, _ = SUBMISSIONS[kind]
    retry = client.post(path, json=body, headers={"Idempotency-Key": f"{kind}-once"})

    # Then: the retry is answered as a replay of that submission: it runs once, and no second one is made
    assert retry.status_code == 202, retry.get_json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert held.record.endswith(":" + retry.get_json()["id"])
    prefix = SUBMISSIONS[kind][2]
    assert [key.decode() for key in new_primary.scan_iter(f"{prefix}*")] == [held.record]


def test_a_retry_after_a_withdrawal_no_replica_took_makes_the_job_anew(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given: an API that needs one replica, a Redis with none, and a job refused with an Idempotency-Key
    client = api_client(redis_server.url, QUEUE, min_replicas_ack=1, replica_ack_timeout_ms=50)
    body, key = {"image_url": "http://127.0.0.1:9/a.png", "question": "q?"}, {"Idempotency-Key": "again"}
    first = client.post("/v1/jobs", json=body, headers=key)
    assert first.get_json()["error"]["code"] == "replicas_unavailable"
    [claim] = [redis_client.get(k) for k in redis_client.scan_iter("blipq:idempotency:*")]
    assert claim is not None and claim.endswith(b":withdrawn"), "the key stays claimed, marked withdrawn"

    # When: the client retries with its key, on the same primary (no failover brought the job back)
    retry = client.post("/v1/jobs", json=body, headers=key)

    # Then: the retry is made anew (and refused anew), not told that the key is in use
    assert retry.status_code == 503, retry.get_json()
    assert retry.get_json()["error"]["code"] == "replicas_unavailable"
    assert not list(redis_client.scan_iter("blipq:job:*"))
