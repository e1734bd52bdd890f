"""Given a real worker with a resident model, a submitted job ends with the model's own answer."""

from __future__ import annotations

import io
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis
import torch
from flask.testing import FlaskClient
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

from contract.broker import TASK_VQA
from tests.support.images import shape_png, truncated_png
from tests.support.service import JOB_TIMEOUT_S, ImageServer, WorkerProcess, wait_for_job

MAX_NEW_TOKENS = 20  # the worker's default BLIPQ_MAX_NEW_TOKENS


def direct_answer(model_dir: Path, image_bytes: bytes, question: str) -> str:
    """The model card's usage, run in this process: what the service must answer."""
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForQuestionAnswering.from_pretrained(model_dir)
    raw_image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    inputs = processor(raw_image, question, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    return str(processor.decode(out[0], skip_special_tokens=True)).strip()


def test_url_job_answers_like_the_model(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess, tiny_model_dir: Path, image_server: ImageServer
) -> None:
    image = shape_png("red", (48, 40))
    image_server.routes["/red.png"] = (200, "image/png", image)
    question = "how many dogs are in the picture?"

    response = tiny_api.post("/v1/jobs", json={"image_url": image_server.url("/red.png"), "question": question})
    job = wait_for_job(tiny_api, response.get_json()["id"], tiny_worker)

    assert job["status"] == "succeeded", job
    assert job["answer"] == direct_answer(tiny_model_dir, image, question)
    assert job["error"] is None
    assert job["model"] == str(tiny_model_dir)
    created, started, finished = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished


def test_upload_job_answers_like_the_model(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess, tiny_model_dir: Path, redis_client: redis.Redis
) -> None:
    image = shape_png("blue", (30, 50), shape="square")
    question = "what color is the shape?"

    response = tiny_api.post(
        "/v1/jobs",
        data={"question": question, "image": (io.BytesIO(image), "blue.png", "image/png")},
        content_type="multipart/form-data",
    )
    job_id = response.get_json()["id"]
    job = wait_for_job(tiny_api, job_id, tiny_worker)

    assert job["status"] == "succeeded", job
    assert job["answer"] == direct_answer(tiny_model_dir, image, question)
    assert job["image_url"] is None
    assert not redis_client.exists(f"blipq:upload:{job_id}"), "an ended job's upload is deleted"


def test_answers_depend_on_the_image(tiny_api: FlaskClient, tiny_worker: WorkerProcess) -> None:
    answers = set()
    for color in ("red", "green", "blue", "black"):
        response = tiny_api.post(
            "/v1/jobs",
            data={"question": "what color is it?", "image": (io.BytesIO(shape_png(color)), "i.png", "image/png")},
            content_type="multipart/form-data",
        )
        answers.add(wait_for_job(tiny_api, response.get_json()["id"], tiny_worker)["answer"])
    assert len(answers) > 1, "every image got the same answer: the images do not reach the model"


@pytest.mark.parametrize(
    ("path", "served", "code"),
    [
        ("/missing.png", None, "image_fetch_failed"),
        ("/server-error.png", (503, "text/plain", b"busy"), "image_fetch_failed"),
        ("/page.html", (200, "text/html", b"<html>not an image</html>"), "image_invalid"),
        ("/truncated.png", (200, "image/png", truncated_png()), "image_invalid"),
    ],
)
def test_bad_image_fails_its_job_and_the_worker_goes_on(
    tiny_api: FlaskClient,
    tiny_worker: WorkerProcess,
    image_server: ImageServer,
    path: str,
    served: tuple[int, str, bytes] | None,
    code: str,
) -> None:
    if served:
        image_server.routes[path] = served
    image_server.routes["/good.png"] = (200, "image/png", shape_png("green"))

    bad = tiny_api.post("/v1/jobs", json={"image_url": image_server.url(path), "question": "what is it?"})
    good = tiny_api.post("/v1/jobs", json={"image_url": image_server.url("/good.png"), "question": "what is it?"})
    bad_job = wait_for_job(tiny_api, bad.get_json()["id"], tiny_worker)
    good_job = wait_for_job(tiny_api, good.get_json()["id"], tiny_worker)

    assert bad_job["status"] == "failed"
    assert bad_job["answer"] is None
    assert bad_job["error"]["code"] == code
    assert bad_job["error"]["message"]
    assert good_job["status"] == "succeeded"
    assert tiny_worker.process.poll() is None


def test_a_job_delivered_again_after_it_ended_is_not_run_again(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess, image_server: ImageServer
) -> None:
    image_server.routes["/again.png"] = (200, "image/png", shape_png("red"))
    question = "what color?"
    response = tiny_api.post("/v1/jobs", json={"image_url": image_server.url("/again.png"), "question": question})
    job_id = response.get_json()["id"]
    first = wait_for_job(tiny_api, job_id, tiny_worker)
    image_server.routes["/again.png"] = (200, "image/png", shape_png("blue"))  # a rerun would answer differently

    store = tiny_api.application.extensions["blipq"].store
    duplicates = store.stats()["duplicate_deliveries"]
    celery = tiny_api.application.extensions["blipq"].celery
    payload = {"job_id": job_id, "question": question, "image_url": image_server.url("/again.png")}
    celery.send_task(TASK_VQA, args=[payload], task_id=job_id, queue=tiny_worker.queue)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while store.stats()["duplicate_deliveries"] == duplicates:  # the start script counts the delivery it refuses
        assert time.monotonic() < deadline, tiny_worker.log_tail()
        time.sleep(0.05)
    assert wait_for_job(tiny_api, job_id, tiny_worker) == first
