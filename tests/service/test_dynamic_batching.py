"""A real worker answers single jobs from many clients, and a batch's chunks, together in few `generate` calls,
with exactly the answers of the model card's one-at-a-time usage."""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from blipq.up_redis import RedisProcess, free_port, stop_process
from contract.images import decode_image
from tests.support.answers import model_card_answer
from tests.support.images import shape_png
from tests.support.metrics import value
from tests.support.service import WorkerProcess, api_client, start_worker, wait_for_batch, wait_for_job
from worker.inference import load_model

QUEUE = "dynamic"
QUESTIONS = ["what color?", "is there a red circle in the image?", "how many?", "what shape is on the left side?"]
COLORS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def batching_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, int]]:
    """A worker whose batches wait up to 400 ms to fill, serving its metrics on a free port."""
    port = free_port()
    env = {
        "BLIPQ_BATCH_MAX_WAIT_MS": "400",
        "BLIPQ_BATCH_MAX_SIZE": "64",
        "BLIPQ_METRICS_PORT": str(port),
        "BLIPQ_METRICS_ADDR": "127.0.0.1",
    }
    log_path = tmp_path_factory.mktemp("logs") / "dynamic-worker.log"
    worker = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, **env)
    yield worker, port
    stop_process(worker.process)


def model_calls(port: int, worker: WorkerProcess) -> tuple[float, float]:
    """(generate calls, texts answered) so far, from the worker's metrics."""
    deadline = time.monotonic() + 120
    while True:
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            calls, texts = (value(text, f"blipq_worker_batch_size_{part}") or 0.0 for part in ("count", "sum"))
            return calls, texts
        except requests.ConnectionError:  # the model is still loading
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.2)


def test_single_jobs_and_a_batch_share_generate_calls_and_answer_like_the_model_card(
    redis_server: RedisProcess, batching_worker: tuple[WorkerProcess, int], tiny_model_dir: Path
) -> None:
    worker, port = batching_worker
    api = api_client(redis_server.url, QUEUE, batch_chunk_size=8)
    calls_before, texts_before = model_calls(port, worker)
    pairs = list(itertools.product(COLORS, QUESTIONS))

    # Sixteen single jobs (different images, questions of different lengths) and a 16-item batch, sent at once.
    job_ids = []
    for color, question in pairs:
        form = {"question": question, "image": (io.BytesIO(shape_png(color)), "shape.png", "image/png")}
        response = api.post("/v1/jobs", data=form)
        assert response.status_code == 202, response.get_json()
        job_ids.append(response.get_json()["id"])
    batch = api.post(
        "/v1/batches",
        data={
            "questions": '["' + '", "'.join(QUESTIONS) + '"]',
            "images": [(io.BytesIO(shape_png(color, shape="square")), f"{color}.png", "image/png") for color in COLORS],
        },
    )
    assert batch.status_code == 202, batch.get_json()
    answers = [wait_for_job(api, job_id, worker)["answer"] for job_id in job_ids]
    batch_id = batch.get_json()["id"]
    wait_for_batch(api, batch_id, worker)
    lines = [line for line in api.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines() if line]

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert answers == [
        model_card_answer(loaded, decode_image(shape_png(color), 10**6), question) for color, question in pairs
    ]
    expected_batch = [
        model_card_answer(loaded, decode_image(shape_png(color, shape="square"), 10**6), question)
        for color in COLORS
        for question in QUESTIONS
    ]
    assert [json.loads(line)["answer"] for line in lines] == expected_batch
    calls, texts = model_calls(port, worker)
    assert texts - texts_before == 32
    assert calls - calls_before <= 8, f"{calls - calls_before} generate calls for 32 texts: not batched"
