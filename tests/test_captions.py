"""Captioning jobs (`"task": "caption"`): routed to the captioning workers' queue, answered with exactly the caption the
inference core gives in-process, beside VQA jobs answered by a VQA worker on the same Redis; bad requests refused with
their codes."""

from __future__ import annotations

import base64
import io
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.admission import queue_depth, queue_names
from api.settings import ApiSettings
from api.up import RedisProcess
from tests.conftest import ImageServer, WorkerProcess, api_client, wait_for_job
from tests.fixtures.images import shape_png
from tests.test_chaos import reference_answers
from worker.contract.errors import SettingsError
from worker.contract.jobs import broker_list_key, unstarted_key
from worker.contract.states import JobPriority

COLORS = ["red", "green", "blue"]
PROMPT = "a picture of"
QUESTION = "what color is the shape?"
IMAGE_URL = "https://images.example.com/dog.png"  # for requests refused before anything runs


@pytest.fixture
def api(
    redis_server: RedisProcess,
    tiny_worker: WorkerProcess,
    tiny_caption_worker: WorkerProcess,
    redis_client: redis.Redis,
) -> FlaskClient:
    """The API with both queues: VQA jobs to the tiny VQA worker, caption jobs to the tiny captioning worker."""
    return api_client(redis_server.url, tiny_worker.queue, caption_queue=tiny_caption_worker.queue)


@pytest.fixture
def idle_queues(redis_server: RedisProcess, redis_client: redis.Redis) -> Iterator[tuple[str, str]]:
    """A VQA queue and a caption queue that no worker reads: what is enqueued stays there to be counted."""
    queues = (f"idle-vqa-{secrets.token_hex(4)}", f"idle-caption-{secrets.token_hex(4)}")
    yield queues
    for queue in queues:
        redis_client.delete(*queue_names(queue))


@pytest.fixture
def images(image_server: ImageServer) -> list[str]:
    """URLs of shape images on the tests' image server, one per color."""
    for color in COLORS:
        image_server.routes[f"/caption-{color}.png"] = (200, "image/png", shape_png(color))
    return [image_server.url(f"/caption-{color}.png") for color in COLORS]


def caption_of(model_dir: Path, color: str, prompt: str = "") -> str:
    """The caption the inference core gives in this process for the color's shape image."""
    return reference_answers(model_dir, [(shape_png(color), prompt)])[0]


def submitted(response: Any) -> str:
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def batch_results(client: FlaskClient, **post: Any) -> list[dict[str, Any]]:
    """Submit a caption batch (`json=` or a multipart `data=`), wait for every item, and read its results."""
    response = client.post("/v1/batches", **post)
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]

    def results() -> list[dict[str, Any]]:
        lines = client.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
        return [json.loads(line) for line in lines]

    for item in results():
        wait_for_job(client, item["job_id"])
    assert client.get(f"/v1/batches/{batch_id}").get_json()["task"] == "caption"
    return results()


def test_a_caption_job_by_url_and_by_upload_is_the_models_caption(
    api: FlaskClient, images: list[str], tiny_caption_model_dir: Path, tiny_caption_worker: WorkerProcess
) -> None:
    # Given: a red shape, by URL and uploaded; when: each is sent as a caption job with no prompt...
    by_url = submitted(api.post("/v1/jobs", json={"task": "caption", "image_url": images[0]}))
    upload = {"task": "caption", "image": (io.BytesIO(shape_png("red")), "red.png", "image/png")}
    by_upload = submitted(api.post("/v1/jobs", data=upload))

    # ...then: both end with the caption the checkpoint gives in-process, shown as a caption job.
    expected = caption_of(tiny_caption_model_dir, "red")
    for job_id in (by_url, by_upload):
        job = wait_for_job(api, job_id, tiny_caption_worker)
        assert job["status"] == "succeeded", job
        assert job["answer"] == expected
        assert (job["task"], job["question"], job["prompt"]) == ("caption", None, None)
        assert job["model"] == str(tiny_caption_model_dir)


def test_a_prompted_caption_continues_the_prompt(
    api: FlaskClient, images: list[str], tiny_caption_model_dir: Path, tiny_caption_worker: WorkerProcess
) -> None:
    job_id = submitted(api.post("/v1/jobs", json={"task": "caption", "image_url": images[1], "prompt": PROMPT}))

    job = wait_for_job(api, job_id, tiny_caption_worker)

    assert job["status"] == "succeeded", job
    assert job["answer"] == caption_of(tiny_caption_model_dir, "green", PROMPT)
    assert job["answer"] != caption_of(tiny_caption_model_dir, "green"), "the prompt must change the caption"
    assert (job["task"], job["question"], job["prompt"]) == ("caption", None, PROMPT)


def test_a_vqa_job_beside_is_answered_by_the_vqa_worker(
    api: FlaskClient, images: list[str], tiny_model_dir: Path, tiny_worker: WorkerProcess
) -> None:
    job_id = submitted(api.post("/v1/jobs", json={"image_url": images[2], "question": QUESTION}))

    job = wait_for_job(api, job_id, tiny_worker)

    assert job["status"] == "succeeded", job
    assert job["answer"] == reference_answers(tiny_model_dir, [(shape_png("blue"), QUESTION)])[0]
    assert (job["task"], job["question"], job["prompt"], job["model"]) == ("vqa", QUESTION, None, str(tiny_model_dir))


def test_a_caption_batch_of_images_captions_each_as_in_process(
    api: FlaskClient, images: list[str], tiny_caption_model_dir: Path
) -> None:
    plain = batch_results(api, json={"task": "caption", "images": images})
    prompted = batch_results(api, json={"task": "caption", "images": images, "prompt": PROMPT})

    for results, prompt in ((plain, ""), (prompted, PROMPT)):
        assert [item["status"] for item in results] == ["succeeded"] * len(COLORS), results
        assert [(item["task"], item["question"], item["prompt"]) for item in results] == [
            ("caption", None, prompt or None)
        ] * len(COLORS)
        assert [item["image_url"] for item in results] == images
        assert [item["answer"] for item in results] == [
            caption_of(tiny_caption_model_dir, color, prompt) for color in COLORS
        ]


def test_caption_batch_items_take_their_own_prompt_or_the_batchs(
    api: FlaskClient, images: list[str], tiny_caption_model_dir: Path
) -> None:
    items = [
        {"image_url": images[0], "prompt": "the"},
        {"image_url": images[1]},
        {"image_url": images[2], "prompt": ""},
    ]

    results = batch_results(api, json={"task": "caption", "items": items, "prompt": PROMPT})

    assert [item["prompt"] for item in results] == ["the", PROMPT, None]
    assert [item["answer"] for item in results] == [
        caption_of(tiny_caption_model_dir, "red", "the"),
        caption_of(tiny_caption_model_dir, "green", PROMPT),
        caption_of(tiny_caption_model_dir, "blue"),
    ]


def test_a_caption_batch_of_uploads_captions_each_as_in_process(api: FlaskClient, tiny_caption_model_dir: Path) -> None:
    files = [(io.BytesIO(shape_png(color)), f"{color}.png", "image/png") for color in COLORS]

    results = batch_results(api, data={"task": "caption", "prompt": PROMPT, "images": files})

    assert [(item["image_name"], item["image_url"], item["status"]) for item in results] == [
        (f"{color}.png", None, "succeeded") for color in COLORS
    ]
    assert [item["answer"] for item in results] == [
        caption_of(tiny_caption_model_dir, color, PROMPT) for color in COLORS
    ]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"task": "caption", "question": QUESTION, "image_url": IMAGE_URL}, "question_not_allowed"),
        ({"task": "caption", "question": None, "prompt": PROMPT}, "image_missing"),  # null: no question
        ({"question": QUESTION, "prompt": PROMPT, "image_url": IMAGE_URL}, "prompt_not_allowed"),
        ({"task": "vqa", "prompt": PROMPT, "image_url": IMAGE_URL}, "question_missing"),
        ({"task": "summary", "question": QUESTION, "image_url": IMAGE_URL}, "task_invalid"),
        ({"task": None, "question": QUESTION, "image_url": IMAGE_URL}, "task_invalid"),
        ({"task": "caption", "prompt": "x" * 101, "image_url": IMAGE_URL}, "prompt_too_long"),
        ({"task": "caption", "prompt": 7, "image_url": IMAGE_URL}, "prompt_invalid"),
        ({"task": "caption"}, "image_missing"),
    ],
)
def test_a_bad_caption_job_is_refused_with_its_code(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str], body: Any, code: str
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1], max_question_chars=100)

    response = api.post("/v1/jobs", json=body)

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert [queue_depth(redis_client, queue) for queue in idle_queues] == [0, 0]


def test_a_question_uploaded_with_a_caption_job_is_refused(
    redis_server: RedisProcess, idle_queues: tuple[str, str]
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1])
    form = {"task": "caption", "question": QUESTION, "image": (io.BytesIO(shape_png("red")), "red.png", "image/png")}

    response = api.post("/v1/jobs", data=form)

    assert (response.status_code, response.get_json()["error"]["code"]) == (422, "question_not_allowed")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"task": "caption", "images": [IMAGE_URL], "questions": [QUESTION]}, "question_not_allowed"),
        ({"images": [IMAGE_URL], "questions": [QUESTION], "prompt": PROMPT}, "prompt_not_allowed"),
        ({"task": "caption", "items": [{"image_url": IMAGE_URL, "question": QUESTION}]}, "question_not_allowed"),
        ({"items": [{"image_url": IMAGE_URL, "prompt": PROMPT}]}, "prompt_not_allowed"),
        ({"items": [{"image_url": IMAGE_URL}]}, "question_missing"),
        ({"images": [IMAGE_URL]}, "batch_invalid"),  # vqa: images without questions
        ({"task": "caption", "images": [IMAGE_URL], "items": [{"image_url": IMAGE_URL}]}, "batch_invalid"),
        ({"task": "caption", "prompt": PROMPT}, "batch_empty"),
        ({"task": "caption", "images": []}, "batch_empty"),
        ({"task": "caption", "images": [IMAGE_URL] * 10_001}, "batch_too_large"),
        ({"task": "tags", "images": [IMAGE_URL]}, "task_invalid"),
        ({"task": "caption", "images": [IMAGE_URL], "prompt": ["a"]}, "prompt_invalid"),
    ],
)
def test_a_bad_caption_batch_is_refused_with_its_code(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str], body: Any, code: str
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1])

    response = api.post("/v1/batches", json=body)

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert [queue_depth(redis_client, queue) for queue in idle_queues] == [0, 0]


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"task": "caption", "questions": json.dumps([QUESTION])}, "question_not_allowed"),
        ({"questions": json.dumps([QUESTION]), "prompt": PROMPT}, "prompt_not_allowed"),
        ({"task": "tags", "questions": json.dumps([QUESTION])}, "task_invalid"),
        ({"task": "tags"}, "task_invalid"),
        ({}, "questions_invalid"),  # vqa: the questions are needed
    ],
)
def test_a_bad_caption_batch_upload_is_refused_with_its_code(
    redis_server: RedisProcess, idle_queues: tuple[str, str], form: dict[str, Any], code: str
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1])
    data = {**form, "images": [(io.BytesIO(shape_png("red")), "red.png", "image/png")]}

    response = api.post("/v1/batches", data=data)

    assert (response.status_code, response.get_json()["error"]["code"]) == (422, code), response.get_json()


def queued_payloads(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The task payloads waiting at normal priority on `queue`, oldest first, as kombu's Redis transport keeps them."""
    messages = client.lrange(broker_list_key(queue, JobPriority.NORMAL), 0, -1)
    payloads = []
    for raw in reversed(messages):  # pushed on the left, taken from the right
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        payloads.append(args[0])
    return payloads


def test_caption_jobs_wait_on_the_caption_queue_with_their_task(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str]
) -> None:
    vqa_queue, caption_queue = idle_queues
    api = api_client(redis_server.url, vqa_queue, caption_queue=caption_queue)

    caption_id = submitted(api.post("/v1/jobs", json={"task": "caption", "image_url": IMAGE_URL, "prompt": PROMPT}))
    vqa_id = submitted(api.post("/v1/jobs", json={"question": QUESTION, "image_url": IMAGE_URL}))
    submitted(api.post("/v1/batches", json={"task": "caption", "images": [IMAGE_URL, IMAGE_URL + "?2"]}))

    job = {"job_id": caption_id, "question": PROMPT, "image_url": IMAGE_URL, "priority": "normal", "task": "caption"}
    captions = queued_payloads(redis_client, caption_queue)
    assert captions[0] == job  # the prompt travels as the question, the task says what it is
    assert captions[1]["task"] == "caption"
    assert [text for image in captions[1]["images"] for _, text in image["items"]] == ["", ""]
    assert [payload["task"] for payload in queued_payloads(redis_client, vqa_queue)] == ["vqa"]
    assert redis_client.zscore(unstarted_key(caption_queue), caption_id) is not None  # watched by its queue's reaper
    assert redis_client.zscore(unstarted_key(vqa_queue), vqa_id) is not None


def test_a_queued_caption_job_and_batch_cancel_on_their_queue(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str]
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1])
    job_id = submitted(api.post("/v1/jobs", json={"task": "caption", "image_url": IMAGE_URL}))
    batch = api.post("/v1/batches", json={"task": "caption", "images": [IMAGE_URL]}).get_json()

    canceled = api.post(f"/v1/jobs/{job_id}/cancel").get_json()
    batch_canceled = api.post(f"/v1/batches/{batch['id']}/cancel").get_json()

    assert canceled["status"] == "canceled" and canceled["task"] == "caption"
    assert batch_canceled == {"canceled": 1, "cancel_requested": 0, "already_ended": 0}
    # The canceled job is no longer watched as queued; the batch's chunk is, until a worker takes (and skips) it.
    watched = [member.decode() for member in redis_client.zrange(unstarted_key(idle_queues[1]), 0, -1)]
    assert watched == [f"chunk:{batch['id']}:0:1"]


def test_back_pressure_counts_the_queue_the_job_goes_to(
    redis_server: RedisProcess, idle_queues: tuple[str, str]
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1], max_queue_depth=1)

    first = api.post("/v1/jobs", json={"task": "caption", "image_url": IMAGE_URL})
    second = api.post("/v1/jobs", json={"task": "caption", "image_url": IMAGE_URL})
    caption_batch = api.post("/v1/batches", json={"task": "caption", "images": [IMAGE_URL]})
    vqa = api.post("/v1/jobs", json={"question": QUESTION, "image_url": IMAGE_URL})

    assert first.status_code == 202
    assert (second.status_code, second.get_json()["error"]["code"]) == (503, "queue_full")
    assert (caption_batch.status_code, caption_batch.get_json()["error"]["code"]) == (503, "queue_full")
    assert vqa.status_code == 202, "the VQA queue is empty: its jobs are still taken"


def test_the_caption_queue_is_a_setting_of_its_own() -> None:
    assert ApiSettings.from_env({}).caption_queue == "blipq-caption"
    assert ApiSettings.from_env({"BLIPQ_CAPTION_QUEUE": "captions-gpu"}).caption_queue == "captions-gpu"
    with pytest.raises(SettingsError, match="BLIPQ_CAPTION_QUEUE"):
        ApiSettings.from_env({"BLIPQ_QUEUE": "shared", "BLIPQ_CAPTION_QUEUE": "shared"})
