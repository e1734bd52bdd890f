"""Given bad requests, the API answers a stable error code and nothing reaches Redis."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from PIL import Image

from api.admission import queue_depth, queue_names
from api.settings import MAX_JSON_BODY_BYTES
from blipq.up_redis import RedisProcess, start_redis
from tests.support import hostile
from tests.support.images import photo, shape_png
from tests.support.service import api_client
from tests.support.stored import stored_keys

UNCONSUMED_QUEUE = "unconsumed"  # no worker reads it: whatever is enqueued stays there to be counted
MAX_IMAGE_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 100_000
IMAGE_URL = "https://images.example.com/dog.png"


@pytest.fixture
def api(redis_server: RedisProcess, redis_client: redis.Redis) -> FlaskClient:
    redis_client.delete(*queue_names(UNCONSUMED_QUEUE))
    return api_client(
        redis_server.url,
        UNCONSUMED_QUEUE,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_question_chars=100,
    )


def assert_nothing_enqueued(client: redis.Redis) -> None:
    assert stored_keys(client) == []
    assert queue_depth(client, UNCONSUMED_QUEUE) == 0


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"image_url": IMAGE_URL}, "question_missing"),
        ({"question": "   ", "image_url": IMAGE_URL}, "question_empty"),
        ({"question": "x" * 101, "image_url": IMAGE_URL}, "question_too_long"),
        ({"question": 7, "image_url": IMAGE_URL}, "question_invalid"),
        ({"question": "what is it?", "image_url": "ftp://images.example.com/dog.png"}, "image_url_invalid"),
        ({"question": "what is it?", "image_url": "file:///etc/passwd"}, "image_url_invalid"),
        ({"question": "what is it?", "image_url": "not a url"}, "image_url_invalid"),
        ({"question": "what is it?"}, "image_missing"),
        ({"question": "what is it?", "image_url": IMAGE_URL, "colour": "red"}, "unknown_field"),
        (["what is it?", IMAGE_URL], "invalid_body"),
    ],
)
def test_bad_json_job_is_refused_with_its_code(
    api: FlaskClient, redis_client: redis.Redis, body: Any, code: str
) -> None:
    response = api.post("/v1/jobs", json=body)
    assert_error(response, 422, code)
    assert_nothing_enqueued(redis_client)


def test_malformed_json_is_a_400(api: FlaskClient, redis_client: redis.Redis) -> None:
    response = api.post("/v1/jobs", data='{"question": "what', content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert_nothing_enqueued(redis_client)


def test_other_content_types_are_a_415(api: FlaskClient, redis_client: redis.Redis) -> None:
    response = api.post("/v1/jobs", data="question=what", content_type="text/plain")
    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    ("form", "status", "code", "named"),
    [
        ({"question": "what color?", "image_url": IMAGE_URL, "image": "png"}, 422, "image_conflict", ""),
        ({"image": "png"}, 422, "question_missing", ""),
        ({"question": "what color?"}, 422, "image_missing", ""),
        ({"question": "what color?", "image": "text"}, 422, "image_invalid", ""),
        ({"question": "what color?", "image": "empty"}, 422, "image_invalid", ""),
        ({"question": "what color?", "image": "over_image_limit"}, 413, "image_too_large", "BLIPQ_MAX_IMAGE_BYTES"),
        # An image far over the limit is named as such, not as a body over its limit
        ({"question": "what color?", "image": "far_over"}, 413, "image_too_large", f"{MAX_IMAGE_BYTES} bytes"),
        ({"question": "what color?", "image": "over_pixels"}, 413, "image_too_large", "BLIPQ_MAX_IMAGE_PIXELS"),
        # A body over its limit for another reason than its image says what bounds it
        ({"question": "x" * 70_000, "image": "png"}, 413, "body_too_large", "65536 bytes"),
    ],
)
def test_bad_upload_is_refused_with_its_code(
    api: FlaskClient, redis_client: redis.Redis, form: dict[str, str], status: int, code: str, named: str
) -> None:
    files = {
        "png": shape_png("red"),
        "text": b"this is not an image",
        "empty": b"",
        "over_image_limit": shape_png("red") + b"\0" * MAX_IMAGE_BYTES,
        "far_over": shape_png("red") + b"\0" * (MAX_IMAGE_BYTES * 3),
        "over_pixels": hostile.png_zero_bomb(400, 300),  # a valid image of 120,000 pixels, in a few hundred bytes
    }
    data: dict[str, Any] = dict(form)
    if "image" in form:
        data["image"] = (io.BytesIO(files[form["image"]]), "image.png", "image/png")
    response = api.post("/v1/jobs", data=data, content_type="multipart/form-data")
    assert_error(response, status, code)
    assert named in response.get_json()["error"]["message"]
    assert "image" not in response.get_json()["error"], "a job's refusal names no image of a batch"
    assert_nothing_enqueued(redis_client)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches"])
def test_a_form_part_with_no_name_is_refused_with_its_code(
    api: FlaskClient, redis_client: redis.Redis, path: str
) -> None:
    # A part whose Content-Disposition names no field (clients and fuzzers send them) is refused, never a 500.
    body = (
        b"--XX\r\nContent-Disposition: form-data\r\n\r\nhello\r\n"
        b'--XX\r\nContent-Disposition: form-data; name="question"\r\n\r\nwhat is it?\r\n--XX--\r\n'
    )
    response = api.post(path, data=body, content_type="multipart/form-data; boundary=XX")
    assert_error(response, 422, "unknown_field")
    assert_nothing_enqueued(redis_client)


def test_a_json_body_over_its_limit_is_refused_naming_it(api: FlaskClient, redis_client: redis.Redis) -> None:
    body = {"question": "what is it?", "image_url": IMAGE_URL, "padding": "x" * MAX_JSON_BODY_BYTES}

    response = api.post("/v1/jobs", json=body)

    assert_error(response, 413, "body_too_large")
    assert f"over {MAX_JSON_BODY_BYTES} bytes, the most a JSON body may be" in response.get_json()["error"]["message"]
    assert_nothing_enqueued(redis_client)


def test_a_photo_far_over_the_text_field_bound_is_taken_as_a_jobs_upload(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given an API with its default limits (10 MiB an image, 64 KiB of other fields) and camera-like JPEGs, whose
    # bytes hold CR and LF as any binary file does
    api = api_client(redis_server.url, UNCONSUMED_QUEUE)
    pictures = [photo(color, (2000, 1500)) for color in ("red", "green", "blue")]

    # When each is uploaded as a job's image
    responses = [
        api.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(picture), "photo.jpg")})
        for picture in pictures
    ]

    # Then each is accepted, the whole of it stored
    assert all(len(picture) > 10 * 64 * 1024 for picture in pictures)
    assert [response.status_code for response in responses] == [202] * 3, [r.get_json() for r in responses]
    stored = [redis_client.get(f"blipq:upload:{response.get_json()['id']}") for response in responses]
    assert stored == pictures


def test_accepted_job_is_in_redis_when_the_api_answers(api: FlaskClient, redis_client: redis.Redis) -> None:
    first = api.post("/v1/jobs", json={"question": "what is it?", "image_url": IMAGE_URL})
    second = api.post("/v1/jobs", json={"question": "what is it?", "image_url": IMAGE_URL})

    assert first.status_code == 202
    body = first.get_json()
    assert body == {"id": body["id"], "status": "queued", "estimate": body["estimate"]}
    assert isinstance(body["estimate"], dict), "a job that has not ended has an end estimate"
    assert first.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert len(body["id"]) >= 22 and body["id"] != second.get_json()["id"]
    assert redis_client.exists(f"blipq:job:{body['id']}")
    assert queue_depth(redis_client, UNCONSUMED_QUEUE) == 2
    job = api.get(f"/v1/jobs/{body['id']}").get_json()
    assert job["status"] == "queued" and job["question"] == "what is it?" and job["answer"] is None


def test_an_upload_of_many_form_reads_is_accepted(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    # Given: an API with the default image limits, and a photo of a few hundred KB (many reads of the form)
    redis_client.delete(*queue_names(UNCONSUMED_QUEUE))
    client = api_client(redis_server.url, UNCONSUMED_QUEUE)
    photo = noise_png(512, 512)
    assert len(photo) > 8 * 64 * 1024

    # When: it is uploaded as a single job
    response = client.post(
        "/v1/jobs",
        data={"question": "what is it?", "image": (io.BytesIO(photo), "photo.png", "image/png")},
        content_type="multipart/form-data",
    )

    # Then: it is accepted, queued
    assert response.status_code == 202, response.get_json()
    assert queue_depth(redis_client, UNCONSUMED_QUEUE) == 1


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: it barely compresses, so its bytes are about 3 per pixel."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("job_id", ["AAAAAAAAAAAAAAAAAAAAAA", "not-an-id", "blipq:job:AAAAAAAAAAAAAAAAAAAAAA"])
def test_unknown_job_is_a_404(api: FlaskClient, job_id: str) -> None:
    assert_error(api.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")


def test_broker_away_is_a_503_and_no_job() -> None:
    server = start_redis()
    api = api_client(server.url, UNCONSUMED_QUEUE)
    server.stop()

    response = api.post("/v1/jobs", json={"question": "what is it?", "image_url": IMAGE_URL})

    assert_error(response, 503, "broker_unavailable")
