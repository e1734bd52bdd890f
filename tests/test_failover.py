"""Redis high availability through Sentinel: the primary dies with jobs in flight, and the promise of a 202 holds.

A real primary, a real replica and three real sentinels (the same redis-server binary, on free ports); the API and a
worker find the primary through the sentinels (BLIPQ_REDIS_SENTINELS) and the API answers 202 only once a replica
holds the job (BLIPQ_MIN_REPLICAS_ACK=1). Each submission fetches its image from a URL of its own, so that the image
server's log says which submissions ran.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
import redis

from api.up import SentinelGroup, start_sentinel_group, stop_process
from tests.conftest import QuietHandler, api_client, http_server, start_worker
from tests.fixtures.images import shape_png
from worker.contract.images import decode_image
from worker.contract.jobs import JobStore
from worker.contract.redis_target import RedisTarget
from worker.inference import answer_questions, load_model

QUEUE = "failover"
JOB_COUNT = 300
COLORS = ["red", "green", "blue", "black", "yellow", "teal"]
QUESTIONS = ["what color is the shape?", "is there a circle?"]
END_TIMEOUT_S = 240.0  # for every accepted job to end, a message restored after its visibility timeout included
DURING_FAILOVER_S = 8.0  # submissions go on this long after the primary is killed: before, during and after failover
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
    client = api_client(UNUSED_URL, QUEUE, job_time_limit_s=15, min_replicas_ack=1, **sentinels)
    target = RedisTarget(UNUSED_URL, sentinels["redis_sentinels"], sentinel_group.master)
    store = JobStore.connect(target, 3600, outage_s=30)
    accepted: dict[str, tuple[str, str]] = {}  # job id -> (color, question)
    refused: dict[int, str] = {}  # submission number -> error code, of those answered 503
    other: list[tuple[int, object]] = []
    with http_server(fetches.handler()) as port:

        def submit(number: int) -> None:
            color, question = COLORS[number % len(COLORS)], QUESTIONS[number % len(QUESTIONS)]
            body = {"image_url": f"http://127.0.0.1:{port}/{color}.png?n={number}", "question": question}
            response = client.post("/v1/jobs", json=body)
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
            assert sentinel_group.primary_port() != old_primary.port

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
