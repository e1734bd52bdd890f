"""Reading a batch: `GET /v1/batches/<id>?wait=S&after=N` answers as soon as an item ends (woken by the script that
ends it), at once when the batch already changed since the caller's last look, or after S seconds; its results may
be read for one status (`?status=failed`: the failures, with their images, texts and errors).

The tests that end an item under a waiting read first see the read wait on its subscription, then let the item end,
so the read can only answer it by being woken.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess
from tests.support.images import shape_png
from tests.support.long_poll import Read, wait_until, waiting_on_subscription
from tests.support.service import HeldImage, ImageServer, WorkerProcess, api_client, wait_for_batch

QUESTION = "what color is the shape?"


@pytest.fixture
def two_held() -> Iterator[tuple[HeldImage, HeldImage]]:
    """Two image URLs, each answered only once the test releases it."""
    first, second = HeldImage("red"), HeldImage("blue")
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def submit(client: FlaskClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 202, response.get_json()
    batch_id: str = response.get_json()["id"]
    return batch_id


def waiting_read(client: FlaskClient, path: str) -> Read:
    """A read started in a thread, once it waits for the batch's next end."""
    read = Read(client, path)
    read.start()
    wait_until(lambda: waiting_on_subscription(read) or not read.is_alive(), "saw the read wait for an end")
    assert read.is_alive(), f"the read answered without waiting: {read.response and read.response.get_json()}"
    return read


def test_a_waiting_batch_read_answers_as_soon_as_an_item_ends(
    redis_server: RedisProcess,
    tiny_worker: WorkerProcess,
    redis_client: redis.Redis,
    two_held: tuple[HeldImage, HeldImage],
) -> None:
    # A chunk per image: the two items end apart, each when its image arrives.
    api = api_client(redis_server.url, tiny_worker.queue, batch_chunk_size=1)
    first, second = two_held
    batch_id = submit(api, {"images": [first.url, second.url], "questions": [QUESTION]})

    read = waiting_read(api, f"/v1/batches/{batch_id}?wait=20&after=0")
    first.release.set()  # one item ends: progress, not the batch's end, wakes the read
    batch = read.job()
    assert (batch["ended"], batch["count"], batch["counts"]["succeeded"]) == (1, 2, 1), tiny_worker.log_tail()
    assert batch["estimate"] is not None, "the batch has an item to go: it has an estimate"
    assert read.took_s < 15, "the end woke the read: it did not wait out its 20 s"

    read = waiting_read(api, f"/v1/batches/{batch_id}?wait=20&after=1")
    second.release.set()
    batch = read.job()
    assert (batch["ended"], batch["estimate"]) == (2, None), tiny_worker.log_tail()
    assert read.took_s < 15


def submit_idle_upload(client: FlaskClient, images: int) -> str:
    """A batch of `images` uploads, one question each, on a queue no worker reads: its items stay queued."""
    form = {
        "questions": json.dumps([QUESTION]),
        "images": [(io.BytesIO(shape_png("red")), f"shape-{n}.png", "image/png") for n in range(images)],
    }
    response = client.post("/v1/batches", data=form)
    assert response.status_code == 202, response.get_json()
    batch_id: str = response.get_json()["id"]
    return batch_id


def test_a_batch_read_behind_the_ended_count_answers_at_once_and_a_cancel_wakes_one(idle_api: FlaskClient) -> None:
    batch_id = submit_idle_upload(idle_api, 3)
    assert idle_api.post(f"/v1/jobs/{batch_id}.0/cancel").status_code == 200  # one item ends `canceled`

    # The caller last saw 0 ended: the batch changed since, and is answered without waiting.
    began = time.monotonic()
    batch = idle_api.get(f"/v1/batches/{batch_id}?wait=20&after=0").get_json()
    assert (batch["ended"], batch["counts"]["canceled"]) == (1, 1)
    assert time.monotonic() - began < 5

    # Up to date: nothing ends, and the read answers after its wait, as the batch is.
    began = time.monotonic()
    batch = idle_api.get(f"/v1/batches/{batch_id}?wait=0.5&after=1").get_json()
    assert batch["ended"] == 1 and 0.45 <= time.monotonic() - began < 5

    # Without `after`, the read waits for a change from what it first saw: a cancel of another item wakes it.
    read = waiting_read(idle_api, f"/v1/batches/{batch_id}?wait=20")
    assert idle_api.post(f"/v1/jobs/{batch_id}.1/cancel").status_code == 200
    assert read.job()["ended"] == 2 and read.took_s < 15

    # The batch's cancel ends the last item: a read waiting from 2 is woken by it.
    read = waiting_read(idle_api, f"/v1/batches/{batch_id}?wait=20&after=2")
    assert idle_api.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    assert read.job()["ended"] == 3 and read.took_s < 15


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("wait=0", "wait_invalid"),
        ("wait=21", "wait_invalid"),
        ("wait=soon", "wait_invalid"),
        ("wait=nan", "wait_invalid"),
        ("wait=5&after=-1", "after_invalid"),
        ("wait=5&after=1.5", "after_invalid"),
        ("wait=5&after=", "after_invalid"),
    ],
)
def test_a_bad_wait_or_after_is_refused(idle_api: FlaskClient, query: str, code: str) -> None:
    batch_id = submit_idle_upload(idle_api, 1)

    response = idle_api.get(f"/v1/batches/{batch_id}?{query}")

    assert response.status_code == 422 and response.get_json()["error"]["code"] == code


def results(client: FlaskClient, batch_id: str, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"/v1/batches/{batch_id}/results{query}")
    assert response.status_code == 200, response.get_json()
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_the_results_of_one_status_are_the_failures_with_their_images_and_errors(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess, image_server: ImageServer
) -> None:
    for color in ("red", "blue"):
        image_server.routes[f"/batch-reads/{color}.png"] = (200, "image/png", shape_png(color))
    red, blue = image_server.url("/batch-reads/red.png"), image_server.url("/batch-reads/blue.png")
    broken = image_server.url("/batch-reads/missing.png")  # the server answers 404
    batch_id = submit(tiny_api, {"images": [red, broken, blue], "questions": [QUESTION]})
    assert wait_for_batch(tiny_api, batch_id, tiny_worker)["counts"]["failed"] == 1

    failed = results(tiny_api, batch_id, "?status=failed")
    assert [(line["index"], line["image_url"], line["question"], line["status"]) for line in failed] == [
        (1, broken, QUESTION, "failed")
    ]
    assert failed[0]["error"]["code"] == "image_fetch_failed" and failed[0]["error"]["message"]
    assert failed[0]["job_id"] == f"{batch_id}.1" and failed[0]["answer"] is None
    assert [line["index"] for line in results(tiny_api, batch_id, "?status=succeeded")] == [0, 2]
    assert results(tiny_api, batch_id, "?status=canceled") == []

    # offset and limit choose the items' range; the status keeps those of it in that status.
    assert [line["index"] for line in results(tiny_api, batch_id, "?status=succeeded&offset=1&limit=2")] == [2]
    assert results(tiny_api, batch_id, "?status=failed&offset=2") == []
    assert len(results(tiny_api, batch_id)) == 3

    refused = tiny_api.get(f"/v1/batches/{batch_id}/results?status=broken")
    assert refused.status_code == 422 and refused.get_json()["error"]["code"] == "status_invalid"
