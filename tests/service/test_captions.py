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

from api.admission import queue_depth, queue_names, waiting_answers
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess
from contract.batch_store import BatchStore
from contract.batches import outcome_value
from contract.errors import SettingsError
from contract.job_store import JobStore
from contract.keys import broker_list_key, deadlines_key, unstarted_key
from contract.states import JobPriority
from tests.support.answers import reference_answers
from tests.support.images import shape_png
from tests.support.service import ImageServer, WorkerProcess, api_client, wait_for_batch, wait_for_job

COLORS = ["red", "green", "blue"]
PROMPT = "a picture of"
QUESTION = "what color is the shape?"
QUESTIONS = [QUESTION, "is there a circle?"]
UPLOADS = "blipq:batch-upload:*"
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
        ({"task": "caption", "images": [IMAGE_URL], "caption": True}, "batch_invalid"),
        ({"items": [{"image_url": IMAGE_URL, "question": QUESTION}], "caption": True}, "batch_invalid"),
        ({"images": [IMAGE_URL] * 3_334, "questions": QUESTIONS, "caption": True}, "batch_too_large"),  # 10,002
        ({"images": [IMAGE_URL], "questions": [QUESTION], "caption": "yes please"}, "invalid_field"),
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
        ({"caption": "true"}, "questions_invalid"),  # the captions come with questions, or as a caption batch
        ({"questions": json.dumps([QUESTION] * 10_000), "caption": "true"}, "batch_too_large"),  # 10,001 answers
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


def upload_files(*colors: str) -> list[tuple[io.BytesIO, str, str]]:
    return [(io.BytesIO(shape_png(color)), f"{color}.png", "image/png") for color in colors]


def test_a_batch_that_captions_too_asks_and_captions_each_upload_stored_once(
    api: FlaskClient,
    redis_client: redis.Redis,
    tiny_worker: WorkerProcess,
    tiny_model_dir: Path,
    tiny_caption_model_dir: Path,
) -> None:
    # Given three uploaded pictures, two questions about each and a caption of each, asked in one batch
    form = {"images": upload_files(*COLORS), "questions": json.dumps(QUESTIONS), "caption": "true", "prompt": PROMPT}

    # When it is submitted and answered
    batch_id = submitted(api.post("/v1/batches", data=form))
    stored = list(redis_client.scan_iter(UPLOADS))
    summary = wait_for_batch(api, batch_id, tiny_worker)
    lines = [
        json.loads(line) for line in api.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    ]

    # Then each picture was stored once for both tasks, and is gone once both tasks' items ended
    assert len(stored) == len(COLORS)
    assert list(redis_client.scan_iter(UPLOADS)) == []
    assert (summary["task"], summary["caption"], summary["count"]) == ("vqa", True, 9)
    assert summary["counts"]["succeeded"] == 9, summary
    # Each picture's questions, then its caption, answered as the models answer them in-process
    assert [(line["image_name"], line["task"], line["question"], line["prompt"]) for line in lines] == [
        (f"{color}.png", task, text if task == "vqa" else None, text if task == "caption" else None)
        for color in COLORS
        for task, text in (("vqa", QUESTIONS[0]), ("vqa", QUESTIONS[1]), ("caption", PROMPT))
    ]
    expected_answers = reference_answers(tiny_model_dir, [(shape_png(c), q) for c in COLORS for q in QUESTIONS])
    assert [line["answer"] for line in lines if line["task"] == "vqa"] == expected_answers
    expected_captions = [caption_of(tiny_caption_model_dir, color, PROMPT) for color in COLORS]
    assert [line["answer"] for line in lines if line["task"] == "caption"] == expected_captions
    # And each item shows the model of its own task
    models = {line["task"]: api.get(f"/v1/jobs/{line['job_id']}").get_json()["model"] for line in lines}
    assert models == {"vqa": str(tiny_model_dir), "caption": str(tiny_caption_model_dir)}


def test_a_batch_that_captions_too_waits_on_both_queues_and_frees_its_upload_when_both_ended(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str]
) -> None:
    # Given a captioned batch of one uploaded picture, on queues no worker reads
    vqa_queue, caption_queue = idle_queues
    api = api_client(redis_server.url, vqa_queue, caption_queue=caption_queue)
    form = {"images": upload_files("red"), "questions": json.dumps([QUESTION]), "caption": "true"}
    batch_id = submitted(api.post("/v1/batches", data=form))

    # Then its question waits on the vqa queue and its caption on the caption queue, each counted there, one upload
    [question_chunk] = queued_payloads(redis_client, vqa_queue)
    [caption_chunk] = queued_payloads(redis_client, caption_queue)
    assert (question_chunk["task"], question_chunk["images"][0]["items"]) == ("vqa", [[0, QUESTION]])
    assert (caption_chunk["task"], caption_chunk["images"][0]["items"]) == ("caption", [[1, ""]])
    upload = question_chunk["images"][0]["upload"]
    assert caption_chunk["images"][0]["upload"] == upload and redis_client.exists(upload)
    assert [waiting_answers(redis_client, queue) for queue in idle_queues] == [1, 1]

    # When the vqa worker ends its item, the upload stays for the caption; when the captioning worker ends its, it goes
    batches = BatchStore(JobStore.connect(redis_server.url, 3600))
    assert batches.start_chunk(question_chunk, vqa_queue, "w1", 3, "vqa-model") == 1
    batches.run_items([(batch_id, [0])])
    batches.end_chunk(question_chunk, vqa_queue, [["0", *outcome_value("succeeded", answer="red")]])
    kept_for_the_caption = redis_client.exists(upload)
    assert batches.start_chunk(caption_chunk, caption_queue, "w2", 3, "caption-model") == 1
    batches.run_items([(batch_id, [1])])
    batches.end_chunk(caption_chunk, caption_queue, [["1", *outcome_value("succeeded", answer="a red square")]])

    assert kept_for_the_caption == 1
    assert list(redis_client.scan_iter(UPLOADS)) == []
    assert [waiting_answers(redis_client, queue) for queue in idle_queues] == [0, 0]
    items = [api.get(f"/v1/jobs/{batch_id}.{index}").get_json() for index in (0, 1)]
    assert [(item["task"], item["model"], item["answer"]) for item in items] == [
        ("vqa", "vqa-model", "red"),
        ("caption", "caption-model", "a red square"),
    ]
    assert api.delete(f"/v1/batches/{batch_id}").status_code == 204
    assert list(redis_client.scan_iter("blipq:batch*")) == []


def test_a_canceled_batch_that_captions_too_frees_its_uploads_and_ends_both_tasks_items(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str]
) -> None:
    api = api_client(redis_server.url, idle_queues[0], caption_queue=idle_queues[1])
    form = {"images": upload_files("red", "blue"), "questions": json.dumps(QUESTIONS), "caption": "true"}
    batch_id = submitted(api.post("/v1/batches", data=form))
    assert len(list(redis_client.scan_iter(UPLOADS))) == 2

    canceled = api.post(f"/v1/batches/{batch_id}/cancel").get_json()

    assert canceled == {"canceled": 6, "cancel_requested": 0, "already_ended": 0}
    assert list(redis_client.scan_iter(UPLOADS)) == []
    lines = [
        json.loads(line) for line in api.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    ]
    assert [(line["task"], line["status"]) for line in lines] == [
        ("vqa", "canceled"), ("vqa", "canceled"), ("caption", "canceled")
    ] * 2  # fmt: skip
    assert api.delete(f"/v1/batches/{batch_id}").status_code == 204
    assert list(redis_client.scan_iter("blipq:batch*")) == []


def test_a_withdrawn_batch_that_captions_too_leaves_nothing_on_either_queue(
    redis_server: RedisProcess, redis_client: redis.Redis, idle_queues: tuple[str, str]
) -> None:
    # Given an API that needs one replica to hold each submission, and a Redis with none
    api = api_client(
        redis_server.url, idle_queues[0], caption_queue=idle_queues[1], min_replicas_ack=1, replica_ack_timeout_ms=50
    )
    form = {"images": upload_files("red"), "questions": json.dumps([QUESTION]), "caption": "true", "deadline_s": "60"}

    # When a captioned batch with a deadline is submitted
    response = api.post("/v1/batches", data=form)

    # Then it is withdrawn from both queues: no record, no upload, nothing waiting or watched for its deadline
    assert (response.status_code, response.get_json()["error"]["code"]) == (503, "replicas_unavailable")
    assert list(redis_client.scan_iter("blipq:batch*")) == []
    for queue in idle_queues:
        assert (redis_client.zcard(unstarted_key(queue)), waiting_answers(redis_client, queue)) == (0, 0)
        assert redis_client.zcard(deadlines_key(queue)) == 0
