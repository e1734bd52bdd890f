"""The shipped demo model, served by a real worker, answers easy-VQA test questions it never saw in training."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from easy_vqa import get_test_image_paths, get_test_questions
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from tests.support.service import WorkerProcess, api_client, start_worker, wait_for_job
from worker.settings import DEMO_MODEL_DIR

SAMPLE_SIZE = 500
SAMPLE_SEED = 20261127  # a fixed sample: the same questions every run
MIN_ACCURACY = 0.95
EXAMPLES = DEMO_MODEL_DIR.parent / "examples"


@pytest.fixture(scope="module")
def demo_worker(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with the default model: the checkpoint the repository ships."""
    worker = start_worker(redis_server.url, DEMO_MODEL_DIR, "demo", tmp_path_factory.mktemp("logs") / "demo.log")
    yield worker
    stop_process(worker.process)


@pytest.fixture
def demo_api(redis_server: RedisProcess, demo_worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    return api_client(redis_server.url, demo_worker.queue)


def submit_upload(client: FlaskClient, image: bytes, question: str) -> str:
    response = client.post(
        "/v1/jobs",
        data={"question": question, "image": (io.BytesIO(image), "image.png", "image/png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def test_a_fixed_sample_of_the_test_split_is_answered_correctly(
    demo_api: FlaskClient, demo_worker: WorkerProcess
) -> None:
    questions, answers, image_ids = get_test_questions()
    image_paths = get_test_image_paths()
    sample = random.Random(SAMPLE_SEED).sample(range(len(questions)), SAMPLE_SIZE)

    job_ids = [submit_upload(demo_api, Path(image_paths[image_ids[i]]).read_bytes(), questions[i]) for i in sample]
    jobs = [wait_for_job(demo_api, job_id, demo_worker) for job_id in job_ids]

    assert all(job["status"] == "succeeded" for job in jobs)
    correct = sum(job["answer"] == answers[i] for job, i in zip(jobs, sample, strict=True))
    accuracy = correct / SAMPLE_SIZE
    print(f"demo model through the service: {correct}/{SAMPLE_SIZE} = {accuracy:.4f}")
    assert accuracy >= MIN_ACCURACY


@pytest.mark.parametrize(
    ("example", "question", "expected"),
    [
        ("red-circle.png", "what color is the shape?", "red"),
        ("red-circle.png", "what shape is in the image?", "circle"),
        ("blue-triangle.png", "is there a triangle?", "yes"),
        ("green-rectangle.png", "does the image not contain a green shape?", "no"),
    ],
)
def test_the_shipped_examples_are_answered(
    demo_api: FlaskClient, demo_worker: WorkerProcess, example: str, question: str, expected: str
) -> None:
    job_id = submit_upload(demo_api, (EXAMPLES / example).read_bytes(), question)
    assert wait_for_job(demo_api, job_id, demo_worker)["answer"] == expected
