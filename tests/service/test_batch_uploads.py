"""Batches of uploaded images: POST /v1/batches as multipart/form-data, each image stored once for its questions."""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from contract.batch_store import BatchStore
from contract.batches import outcome_value
from contract.broker import create_celery, publish_chunk
from contract.job_store import JobStore
from tests.support import hostile
from tests.support.images import shape_png
from tests.support.service import WorkerProcess, api_client, start_worker, wait_for_batch, wait_for_job
from tests.support.stored import stored_keys

QUEUE = "batch-uploads"
COLORS = ["red", "green", "blue"]
QUESTIONS = ["what color is the shape?", "is there a circle?"]


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker of this module's own; its reaper never looks (the test that needs a republish does it by hand)."""
    log_path = tmp_path_factory.mktemp("batch-uploads") / "worker.log"
    process = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, BLIPQ_REAPER_INTERVAL_S="3600")
    yield process
    stop_process(process.process)


@pytest.fixture
def api(redis_server: RedisProcess, worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    return api_client(redis_server.url, QUEUE)


@pytest.fixture
def idle_api(redis_server: RedisProcess, idle_queue: str) -> FlaskClient:
    """The API in front of a queue that no worker reads, with a small limit on a batch upload's body."""
    return api_client(redis_server.url, idle_queue, max_batch_upload_bytes=64 * 1024)


def upload_form(images: list[tuple[bytes, str]], questions: Any = QUESTIONS, **fields: Any) -> dict[str, Any]:
    """A batch upload's form: the files `images`, and `questions` as a JSON array (as is, when not a list)."""
    form: dict[str, Any] = {"images": [(io.BytesIO(data), name) for data, name in images], **fields}
    if questions is not None:
        form["questions"] = json.dumps(questions) if isinstance(questions, list) else questions
    return form


def color_images() -> list[tuple[bytes, str]]:
    return [(shape_png(color), f"{color}.png") for color in COLORS]


def upload_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter("blipq:batch-upload:*"))


def test_uploaded_images_are_stored_once_and_answered_as_single_uploads_are(
    api: FlaskClient, worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    response = api.post("/v1/batches", data=upload_form(color_images()), content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    batch_id, count = response.get_json()["id"], response.get_json()["count"]
    stored_at_submit = upload_keys(redis_client)

    batch = wait_for_batch(api, batch_id, worker)
    lines = [
        json.loads(line) for line in api.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    ]
    singles = [
        wait_for_job(
            api,
            api.post("/v1/jobs", data={"question": question, "image": (io.BytesIO(data), name)}).get_json()["id"],
            worker,
        )
        for data, name in color_images()
        for question in QUESTIONS
    ]

    assert count == len(COLORS) * len(QUESTIONS) == 6
    assert batch["counts"]["succeeded"] == count
    assert len(stored_at_submit) == len(COLORS), "each image is stored once, not once per question"
    assert upload_keys(redis_client) == [], "an upload goes as soon as every item that needs it ended"
    assert [(line["image_name"], line["image_url"], line["question"]) for line in lines] == [
        (f"{color}.png", None, question) for color in COLORS for question in QUESTIONS
    ]
    assert [line["answer"] for line in lines] == [single["answer"] for single in singles]
    item = api.get(f"/v1/jobs/{lines[0]['job_id']}").get_json()
    assert (item["image_name"], item["image_url"], item["batch_id"]) == ("red.png", None, batch_id)
    assert "upload_key" not in item


def test_an_upload_is_deleted_when_the_last_item_that_needs_it_ends_and_not_before(
    idle_api: FlaskClient, redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given a batch of two uploaded images, two questions each, as a worker runs its chunk
    form = upload_form([(shape_png("red"), "red.png"), (shape_png("blue"), "blue.png")], questions=QUESTIONS[:2])
    batch_id = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data").get_json()["id"]
    queue = idle_api.application.extensions["blipq"].settings.queue
    batches = BatchStore(JobStore.connect(redis_server.url, 3600))
    payload = batches.chunk_payload(batch_id, 0)
    assert payload is not None
    red, blue = (f"blipq:batch-upload:{batch_id}:{number}".encode() for number in (0, 1))
    batches.start_chunk(payload, queue, "w1", 3, "tiny")
    batches.run_items([(batch_id, [0, 1, 2, 3])])

    # When both of the red image's items and one of the blue's end...
    answered = [[str(index), *outcome_value("succeeded", answer="yes")] for index in (0, 1, 2)]
    batches.end_chunk(payload, queue, answered, done=False)
    after_three = sorted(upload_keys(redis_client))
    # ...and then the last
    batches.end_chunk(payload, queue, [["3", *outcome_value("failed", code="internal_error", message="x")]])

    # Then the red image went with its last item, the blue one with its own
    assert after_three == [blue]
    assert red not in after_three
    assert upload_keys(redis_client) == []
    assert redis_client.exists(f"blipq:batch-left:{batch_id}") == 0


def test_a_canceled_batch_deletes_its_uploads_at_once(idle_api: FlaskClient, redis_client: redis.Redis) -> None:
    form = upload_form(color_images())
    batch_id = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data").get_json()["id"]
    assert len(upload_keys(redis_client)) == len(COLORS)

    assert idle_api.post(f"/v1/batches/{batch_id}/cancel").status_code == 200

    assert upload_keys(redis_client) == []


def test_a_chunk_published_again_is_answered_from_the_shared_upload(
    api: FlaskClient, idle_api: FlaskClient, worker: WorkerProcess, redis_server: RedisProcess
) -> None:
    # Given a batch item whose chunk no worker will ever read (its queue has none)...
    form = upload_form([(shape_png("green"), "green.png")], questions=["is there a circle?"])
    response = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    job_id = json.loads(idle_api.get(f"/v1/batches/{batch_id}/results").get_data())["job_id"]
    payload = BatchStore(JobStore.connect(redis_server.url, 3600)).chunk_payload(batch_id, 0)
    assert payload is not None and payload["images"][0]["upload"]

    # ...when the chunk, as the reaper publishes it again, reaches a worker...
    publish_chunk(create_celery(redis_server.url, QUEUE), QUEUE, payload)
    answered = wait_for_job(api, job_id, worker)
    single = api.post(
        "/v1/jobs", data={"question": "is there a circle?", "image": (io.BytesIO(shape_png("green")), "g")}
    )

    # ...the worker reads the batch's upload, and answers as for the same image sent alone.
    assert answered["status"] == "succeeded", answered
    assert answered["answer"] == wait_for_job(api, single.get_json()["id"], worker)["answer"]


def test_a_non_image_upload_is_refused_naming_it_and_nothing_is_stored(
    idle_api: FlaskClient, redis_client: redis.Redis
) -> None:
    form = upload_form([(shape_png("red"), "red.png"), (b"%PDF-1.4 not an image", "notes.pdf")])
    response = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data")

    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "image_invalid"
    assert error["image"] == {"index": 1, "name": "notes.pdf"} and "images[1] (notes.pdf)" in error["message"]
    assert stored_keys(redis_client) == []


@pytest.mark.parametrize(
    ("refused", "setting"),
    [
        (shape_png("blue") + b"\0" * 40_000, "BLIPQ_MAX_IMAGE_BYTES"),  # read no further than the limit
        (hostile.png_zero_bomb(400, 300), "BLIPQ_MAX_IMAGE_PIXELS"),  # 120,000 pixels, in a few hundred bytes
    ],
)
def test_an_upload_over_the_image_limits_is_refused_naming_it_and_the_setting(
    redis_server: RedisProcess, redis_client: redis.Redis, refused: bytes, setting: str
) -> None:
    # Given an API that takes images of at most 32 KiB and 100,000 pixels
    queue = f"idle-{secrets.token_hex(4)}"
    api = api_client(redis_server.url, queue, max_image_bytes=32 * 1024, max_image_pixels=100_000)
    images = [(shape_png("red"), "red.png"), (shape_png("green"), "green.png"), (refused, "big.png")]

    # When a batch uploads an image over one of them
    response = api.post("/v1/batches", data=upload_form(images), content_type="multipart/form-data")

    # Then it is refused image_too_large, naming the image and the setting, and nothing is stored
    assert response.status_code == 413, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["image"]) == ("image_too_large", {"index": 2, "name": "big.png"})
    assert setting in error["message"]
    assert list(redis_client.scan_iter("blipq:batch*")) == []


def test_an_invalid_url_of_a_json_batch_is_named(idle_api: FlaskClient) -> None:
    body = {"images": ["https://example.com/a.png", "ftp://example.com/b.png"], "questions": ["what?"]}

    response = idle_api.post("/v1/batches", json=body)

    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], error["image"]) == ("image_url_invalid", {"index": 1, "name": "ftp://example.com/b.png"})


def test_a_body_over_the_batch_upload_limit_is_refused(idle_api: FlaskClient, redis_client: redis.Redis) -> None:
    big = [(shape_png("red", size=(64, 64)) + b"\0" * 20_000, f"{n}.png") for n in range(4)]  # 80 kB > 64 KiB
    response = idle_api.post("/v1/batches", data=upload_form(big), content_type="multipart/form-data")

    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "body_too_large"
    assert "BLIPQ_MAX_BATCH_UPLOAD_BYTES" in response.get_json()["error"]["message"]
    assert stored_keys(redis_client) == []


@pytest.mark.parametrize(
    ("questions", "fields", "files", "code"),
    [
        (None, {}, 1, "questions_invalid"),
        ("not json", {}, 1, "questions_invalid"),
        ('"one question"', {}, 1, "questions_invalid"),
        ([], {}, 1, "questions_invalid"),
        ([1], {}, 1, "questions_invalid"),
        (["what?", " "], {}, 1, "questions_invalid"),
        (["what?"], {}, 0, "image_missing"),
        (["what?"], {"image_url": "https://example.com/a.png"}, 1, "unknown_field"),
        (["what?"], {"priority": "urgent"}, 1, "priority_invalid"),
        (["what?"] * 5_001, {}, 2, "batch_too_large"),
    ],
)
def test_a_bad_batch_upload_is_refused_with_its_code(
    idle_api: FlaskClient, questions: Any, fields: dict[str, str], files: int, code: str
) -> None:
    form = upload_form([(shape_png("red"), "red.png")] * files, questions=questions, **fields)
    response = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data")

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == code


def test_an_unknown_file_field_is_refused(idle_api: FlaskClient) -> None:
    form = upload_form([(shape_png("red"), "red.png")], image=(io.BytesIO(shape_png("blue")), "blue.png"))
    response = idle_api.post("/v1/batches", data=form, content_type="multipart/form-data")

    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "unknown_field"
