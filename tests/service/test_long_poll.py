"""GET /v1/jobs/<id>?wait=S answers when the job ends (woken by the script that ends it), or after S seconds.

The tests that end a job under a waiting read first see the read blocked (in Redis, or on its subscription), then end
the job, so the read can only answer it by being woken.
"""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import redis
from flask.testing import FlaskClient

from api.settings import ApiSettings
from blipq.client import BlipqClient
from blipq.up_redis import RedisProcess
from tests.support.images import shape_png
from tests.support.long_poll import Read, blocked_in_blmove, wait_until, waiting_on_subscription
from tests.support.service import HeldImage, WorkerProcess, serve_app


def submit_upload(client: FlaskClient, question: str = "what color is the shape?") -> str:
    form = {"question": question, "image": (io.BytesIO(shape_png("red")), "shape.png", "image/png")}
    response = client.post("/v1/jobs", data=form)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def submit_url(client: FlaskClient, image_url: str) -> str:
    response = client.post("/v1/jobs", json={"question": "what color is the shape?", "image_url": image_url})
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def test_a_waiting_read_answers_as_soon_as_the_job_ends(
    tiny_api: FlaskClient,
    tiny_worker: WorkerProcess,
    held_image: HeldImage,
    redis_client: redis.Redis,
) -> None:
    job_id = submit_url(tiny_api, held_image.url)
    blocked_before = blocked_in_blmove(redis_client)
    read = Read(tiny_api, f"/v1/jobs/{job_id}?wait=20")
    read.start()
    wait_until(lambda: blocked_in_blmove(redis_client) > blocked_before, "saw the read wait in Redis")

    held_image.release.set()  # the job runs to its end...

    job = read.job()
    assert job["status"] == "succeeded" and job["answer"], (job, tiny_worker.log_tail())
    assert read.took_s < 15, "...and the read answered it when it ended, not when its 20 s ran out"


def test_a_waiting_read_of_a_job_that_does_not_end_answers_after_the_wait(idle_api: FlaskClient) -> None:
    job_id = submit_upload(idle_api)

    started = time.monotonic()
    response = idle_api.get(f"/v1/jobs/{job_id}?wait=0.5")

    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert 0.45 <= time.monotonic() - started < 5


def test_a_cancel_wakes_a_waiting_read(idle_api: FlaskClient, redis_client: redis.Redis) -> None:
    job_id = submit_upload(idle_api)  # on a queue that no worker reads: it stays queued
    blocked_before = blocked_in_blmove(redis_client)
    read = Read(idle_api, f"/v1/jobs/{job_id}?wait=20")
    read.start()
    wait_until(lambda: blocked_in_blmove(redis_client) > blocked_before, "saw the read wait in Redis")

    assert idle_api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200

    assert read.job()["status"] == "canceled"
    assert read.took_s < 15, "the cancel woke the read: it did not wait out its 20 s"


@pytest.mark.parametrize("wait", ["0", "-1", "21", "soon", "nan", "inf"])
def test_a_bad_wait_is_refused(idle_api: FlaskClient, wait: str) -> None:
    job_id = submit_upload(idle_api)

    response = idle_api.get(f"/v1/jobs/{job_id}?wait={wait}")

    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "wait_invalid"


def test_the_client_waits_by_long_polling(
    redis_server: RedisProcess,
    tiny_worker: WorkerProcess,
    held_image: HeldImage,
    redis_client: redis.Redis,
) -> None:
    reads: list[str] = []
    blocked_before = blocked_in_blmove(redis_client)
    seen_waiting: list[bool] = []

    def release_once_a_read_waits() -> None:
        try:
            wait_until(lambda: blocked_in_blmove(redis_client) > blocked_before, "saw the client's read wait")
            seen_waiting.append(True)
        finally:
            held_image.release.set()

    settings = ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue)
    for url in serve_app(settings):
        client = BlipqClient(url)
        client.session.hooks["response"].append(lambda response, **_: reads.append(response.request.url))
        job_id = client.submit(held_image.url, "what color is the shape?")
        releaser = threading.Thread(target=release_once_a_read_waits, daemon=True)
        releaser.start()
        job = client.wait(job_id, timeout_s=60)
        releaser.join(30)

    assert seen_waiting, "no read of the client waited on the server"
    assert job["status"] == "succeeded" and job["answer"], (job, tiny_worker.log_tail())
    polls = [url for url in reads if f"/v1/jobs/{job_id}" in url]
    assert len(polls) == 1 and "wait=" in polls[0], f"{polls}: the first read should have waited for the end"


def test_a_waiting_read_of_a_batch_item_answers_as_soon_as_it_ends(
    tiny_api: FlaskClient,
    tiny_worker: WorkerProcess,
    held_image: HeldImage,
) -> None:
    batch = tiny_api.post("/v1/batches", json={"images": [held_image.url], "questions": ["what color?"]})
    assert batch.status_code == 202, batch.get_json()
    lines = tiny_api.get(f"/v1/batches/{batch.get_json()['id']}/results").get_data(as_text=True).splitlines()
    job_id = json.loads(lines[0])["job_id"]
    read = Read(tiny_api, f"/v1/jobs/{job_id}?wait=20")
    read.start()
    wait_until(lambda: waiting_on_subscription(read), "saw the read wait for its batch's ends")

    held_image.release.set()  # the item runs to its end...

    job = read.job()
    assert job["status"] == "succeeded", (job, tiny_worker.log_tail())
    assert read.took_s < 15, "...and the read answered it when it ended, not when its 20 s ran out"
