"""Nothing is lost: jobs survive killed workers, a SIGTERM'd worker and a Redis restart, answers unchanged."""

from __future__ import annotations

import io
import itertools
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, start_redis, stop_process
from contract.job_store import JobStore
from contract.keys import ANONYMOUS_SHARE, held_key, job_key, line_key, unstarted_key
from contract.states import ENDED_STATUSES, JobPriority
from tests.support.answers import reference_answers
from tests.support.images import shape_png
from tests.support.service import QUICK_RECOVERY, WorkerProcess, api_client, start_worker

QUEUE = "chaos"
COLORS = ["red", "green", "blue", "black", "yellow", "teal"]
SHAPES = ["circle", "square"]
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is in the image?", "how many?"]
CHAOS_TIMEOUT_S = 240.0  # for every job to end, kills and restarts included, on a busy 2-core machine
STOP_TIMEOUT_S = 120  # for the SIGTERMed worker to exit: its grace is 5 s, but a loaded CI machine is slow
MIN_JOBS_PER_BLOW = 40  # jobs submitted before each of the four blows, at least: the workers are at work
MAX_JOBS_PER_BLOW = 600  # and at most, until the blow's target holds some: more means it never takes any


def job_inputs() -> list[tuple[bytes, str]]:
    """The (image, question) pairs the jobs cycle through: a few images and questions."""
    images = [shape_png(color, shape=shape) for color, shape in itertools.product(COLORS, SHAPES)]
    return list(itertools.product(images, QUESTIONS))


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[list[RedisProcess]]:
    """A Redis of this test's own, with its append-only file on, that the test restarts (the list's last item)."""
    servers = [start_redis(tmp_path / "redis")]
    yield servers
    servers[-1].stop()


def submit(client: FlaskClient, image: bytes, question: str) -> str:
    response = client.post(
        "/v1/jobs", data={"question": question, "image": (io.BytesIO(image), "shape.png", "image/png")}
    )
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def ended_count(store: JobStore, job_ids: list[str]) -> int:
    with store.client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(f"blipq:job:{job_id}", "status")
        statuses = pipe.execute()
    return sum(status in (b"succeeded", b"failed") for status in statuses)


def wait_for_progress(store: JobStore, job_ids: list[str], at_least: int, workers: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + CHAOS_TIMEOUT_S
    while ended_count(store, job_ids) < min(at_least, len(job_ids)):
        if time.monotonic() >= deadline:
            logs = "\n".join(w.log_tail() for w in workers)
            stuck = unended(store, job_ids)
            raise AssertionError(f"no progress: {ended_count(store, job_ids)} jobs ended; not ended: {stuck}\n{logs}")
        time.sleep(0.1)


def unended(store: JobStore, job_ids: list[str]) -> dict[str, dict[str, object]]:
    """Where each job not ended stands: its record's state, its score in its level's never-started set (None: not in
    it; above HELD_SCORE: held in its key's line), and whether its key's line holds it."""
    client, found = store.client, {}
    line = set(client.lrange(line_key(QUEUE, JobPriority.NORMAL, ANONYMOUS_SHARE), 0, -1))
    for job_id in job_ids:
        fields = {key.decode(): value.decode() for key, value in client.hgetall(job_key(job_id)).items()}
        if fields.get("status") not in ENDED_STATUSES:
            state = {name: fields.get(name) for name in ("status", "pending", "attempts", "worker", "priority")}
            found[job_id] = {
                **state,
                "score": client.zscore(unstarted_key(QUEUE), job_id),
                "in_line": job_id.encode() in line,
            }
    return found


class Jobs:
    """The test's jobs: sent one at a time, cycling through the pairs, each with what an undisturbed run answers."""

    def __init__(self, client: FlaskClient, store: JobStore, model_dir: Path) -> None:
        self.client, self.store = client, store
        self.pairs = job_inputs()
        self.reference = reference_answers(model_dir, self.pairs)
        self.next_pair = itertools.cycle(range(len(self.pairs)))
        self.ids: list[str] = []
        self.expected: list[str] = []

    def submit_next(self) -> None:
        number = next(self.next_pair)
        self.ids.append(submit(self.client, *self.pairs[number]))
        self.expected.append(self.reference[number])

    def load_until_holding(self, target: WorkerProcess) -> None:
        """Submit jobs until the target worker holds some (received and not finished), so that a blow to it hits
        work however fast or slow the workers got through the jobs before; fail if it never takes any."""
        wait_until_ready(target)
        held = held_key(QUEUE, f"{socket.gethostname()}:{target.process.pid}")
        for count in itertools.count(1):
            self.submit_next()
            if count >= MIN_JOBS_PER_BLOW and (holding := self.store.client.scard(held)):
                print(f"a blow to a worker holding {holding} messages, after {count} jobs")
                return
            assert count < MAX_JOBS_PER_BLOW, f"the worker holds no message: no work to hit\n{target.log_tail()}"


def test_no_job_is_lost_and_no_answer_changes_under_kills_and_a_redis_restart(
    chaos_redis: list[RedisProcess], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: two workers. Before each blow jobs are submitted, one at a time, until the blow's target holds some
    # (received and not finished), so that it hits work however fast or slow the workers got through the jobs before.
    server = chaos_redis[0]
    # The answer cache is off: every job runs the model, so that the blows hit work and no answer comes from a store.
    env = {"BLIPQ_SHUTDOWN_GRACE_S": "5", "BLIPQ_ANSWER_CACHE": "off", **QUICK_RECOVERY}
    logs = (tmp_path / f"worker{i}.log" for i in itertools.count())
    workers = [start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env) for _ in (0, 1)]
    client = api_client(server.url, QUEUE)
    store = JobStore.connect(server.url, 3600, outage_s=30)
    jobs = Jobs(client, store, tiny_model_dir)

    try:
        # When: a worker holding jobs is killed outright, twice (the OOM killer), and started again (its supervisor)...
        for index in (0, 1):
            jobs.load_until_holding(workers[index])
            os.kill(workers[index].process.pid, signal.SIGKILL)
            workers[index].process.wait()
            workers[index] = start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env)

        # ...a worker at work is told to stop (a deploy) and a new one takes its place...
        jobs.load_until_holding(workers[0])
        workers[0].process.send_signal(signal.SIGTERM)
        assert workers[0].process.wait(STOP_TIMEOUT_S) == 0, workers[0].log_tail()
        workers[0] = start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env)

        # ...and Redis restarts while a worker holds jobs; while it is away the API answers 503, never 500 or a 202.
        jobs.load_until_holding(workers[1])
        server.stop()
        image, question = jobs.pairs[0]
        away = client.post("/v1/jobs", data={"question": question, "image": (io.BytesIO(image), "a.png")})
        assert away.status_code == 503, away.get_json()
        assert away.get_json()["error"]["code"] == "broker_unavailable"
        reading = client.get(f"/v1/jobs/{jobs.ids[0]}")
        assert reading.status_code == 503, reading.get_json()
        server = start_redis(server.data_dir, port=server.port)
        chaos_redis.append(server)
        for _ in range(4):  # the API reconnects
            jobs.submit_next()

        # Then: every job ends, each with the answer an undisturbed run gives.
        wait_for_progress(store, jobs.ids, len(jobs.ids), workers)
        ended = [client.get(f"/v1/jobs/{job_id}").get_json() for job_id in jobs.ids]
        failed = [job for job in ended if job["status"] != "succeeded"]
        assert not failed, failed[:3]
        changed = [i for i, job in enumerate(ended) if job["answer"] != jobs.expected[i]]
        assert not changed, f"{len(changed)} answers differ from an undisturbed run"
        print("chaos stats:", store.stats())
    finally:
        for worker in workers:
            stop_process(worker.process)


def wait_until_ready(worker: WorkerProcess) -> None:
    """Wait until the worker's log says it is ready (its model loaded, it takes messages)."""
    deadline = time.monotonic() + 120
    while " ready." not in worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.1)
