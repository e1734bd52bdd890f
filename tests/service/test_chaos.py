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
from contract.keys import held_key
from tests.support.answers import reference_answers
from tests.support.images import shape_png
from tests.support.service import QUICK_RECOVERY, WorkerProcess, api_client, start_worker

QUEUE = "chaos"
JOB_COUNT = 320
COLORS = ["red", "green", "blue", "black", "yellow", "teal"]
SHAPES = ["circle", "square"]
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is in the image?", "how many?"]
CHAOS_TIMEOUT_S = 240.0  # for every job to end, kills and restarts included, on a busy 2-core machine
STOP_TIMEOUT_S = 120  # for the SIGTERMed worker to exit: its grace is 5 s, but a loaded CI machine is slow
WAVE_JOBS = 80  # jobs submitted before each of the four blows: more than one worker takes at once (64 answers)


def job_inputs() -> list[tuple[bytes, str]]:
    """(image, question) pairs, cycling through a few images and questions."""
    images = [shape_png(color, shape=shape) for color, shape in itertools.product(COLORS, SHAPES)]
    pairs = itertools.cycle(itertools.product(images, QUESTIONS))
    return [next(pairs) for _ in range(JOB_COUNT)]


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
        logs = "\n".join(w.log_tail() for w in workers)
        assert time.monotonic() < deadline, f"no progress: {ended_count(store, job_ids)} jobs ended\n{logs}"
        time.sleep(0.1)


def test_no_job_is_lost_and_no_answer_changes_under_kills_and_a_redis_restart(
    chaos_redis: list[RedisProcess], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: two workers. Before each blow a wave of jobs is submitted, and the blow waits until its target holds
    # some, so that it hits work however fast or slow the workers got through the waves before.
    server = chaos_redis[0]
    inputs = job_inputs()
    expected = reference_answers(tiny_model_dir, inputs)
    waves = iter([inputs[start : start + WAVE_JOBS] for start in range(0, len(inputs), WAVE_JOBS)])
    # The answer cache is off: every job runs the model, so that the blows hit work and no answer comes from a store.
    env = {"BLIPQ_SHUTDOWN_GRACE_S": "5", "BLIPQ_ANSWER_CACHE": "off", **QUICK_RECOVERY}
    logs = (tmp_path / f"worker{i}.log" for i in itertools.count())
    workers = [start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env) for _ in (0, 1)]
    client = api_client(server.url, QUEUE)
    store = JobStore.connect(server.url, 3600, outage_s=30)
    job_ids: list[str] = []

    def submit_wave_to(target: WorkerProcess) -> None:
        wait_until_ready(target)
        job_ids.extend(submit(client, image, question) for image, question in next(waves))
        assert_holds_jobs(store, target)

    try:
        # When: a worker holding jobs is killed outright, twice (the OOM killer), and started again (its supervisor)...
        for index in (0, 1):
            submit_wave_to(workers[index])
            os.kill(workers[index].process.pid, signal.SIGKILL)
            workers[index].process.wait()
            workers[index] = start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env)

        # ...a worker at work is told to stop (a deploy) and a new one takes its place...
        submit_wave_to(workers[0])
        workers[0].process.send_signal(signal.SIGTERM)
        assert workers[0].process.wait(STOP_TIMEOUT_S) == 0, workers[0].log_tail()
        workers[0] = start_worker(server.url, tiny_model_dir, QUEUE, next(logs), **env)

        # ...and Redis restarts while a worker holds jobs; while it is away the API answers 503, never 500 or a 202.
        submit_wave_to(workers[1])
        server.stop()
        image, question = inputs[0]
        away = client.post("/v1/jobs", data={"question": question, "image": (io.BytesIO(image), "a.png")})
        assert away.status_code == 503, away.get_json()
        assert away.get_json()["error"]["code"] == "broker_unavailable"
        reading = client.get(f"/v1/jobs/{job_ids[0]}")
        assert reading.status_code == 503, reading.get_json()
        server = start_redis(server.data_dir, port=server.port)
        chaos_redis.append(server)
        job_ids.extend(submit(client, image, question) for image, question in inputs[:4])  # the API reconnects
        expected += expected[:4]

        # Then: every job ends, each with the answer an undisturbed run gives.
        assert next(waves, None) is None, "every wave was submitted"
        wait_for_progress(store, job_ids, len(job_ids), workers)
        jobs = [client.get(f"/v1/jobs/{job_id}").get_json() for job_id in job_ids]
        failed = [job for job in jobs if job["status"] != "succeeded"]
        assert not failed, failed[:3]
        changed = [i for i, job in enumerate(jobs) if job["answer"] != expected[i]]
        assert not changed, f"{len(changed)} answers differ from an undisturbed run"
        print("chaos stats:", store.stats())
    finally:
        for worker in workers:
            stop_process(worker.process)


def assert_holds_jobs(store: JobStore, worker: WorkerProcess) -> None:
    """Wait until the worker holds messages (received and not finished), so that a blow to it hits work; fail if it
    holds none within a minute (a ready worker does within moments of a wave)."""
    key = held_key(QUEUE, f"{socket.gethostname()}:{worker.process.pid}")
    deadline = time.monotonic() + 60
    while not (held := store.client.scard(key)):
        assert time.monotonic() < deadline, f"the worker holds no message: no work to hit\n{worker.log_tail()}"
        time.sleep(0.01)
    print(f"a blow to a worker holding {held} messages")


def wait_until_ready(worker: WorkerProcess) -> None:
    """Wait until the worker's log says it is ready (its model loaded, it takes messages)."""
    deadline = time.monotonic() + 120
    while " ready." not in worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.1)
