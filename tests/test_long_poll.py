"""GET /v1/jobs/<id>?wait=S answers when the job ends (woken by the script that ends it), or after S seconds."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from flask.testing import FlaskClient

from api.client import BlipqClient
from api.settings import ApiSettings
from api.up import RedisProcess
from tests.conftest import WorkerProcess, serve_app
from tests.fixtures.images import shape_png
from tests.test_lifecycle import idle_api, idle_queue  # noqa: F401  (fixtures)


def submit_upload(client: FlaskClient, question: str = "what color is the shape?") -> str:
    form = {"question": question, "image": (io.BytesIO(shape_png("red")), "shape.png", "image/png")}
    response = client.post("/v1/jobs", data=form)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def test_a_waiting_read_answers_as_soon_as_the_job_ends(tiny_api: FlaskClient, tiny_worker: WorkerProcess) -> None:
    job_id = submit_upload(tiny_api)

    started = time.monotonic()
    response = tiny_api.get(f"/v1/jobs/{job_id}?wait=20")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    job = response.get_json()
    assert job["status"] == "succeeded" and job["answer"], (job, tiny_worker.log_tail())
    assert elapsed < 19, "the read waited out its time although the job ended"


def test_a_waiting_read_of_a_job_that_does_not_end_answers_after_the_wait(idle_api: FlaskClient) -> None:  # noqa: F811
    job_id = submit_upload(idle_api)

    started = time.monotonic()
    response = idle_api.get(f"/v1/jobs/{job_id}?wait=0.5")

    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert 0.45 <= time.monotonic() - started < 5


def test_a_cancel_wakes_a_waiting_read(idle_api: FlaskClient) -> None:  # noqa: F811
    job_id = submit_upload(idle_api)
    answers: list[dict[str, object]] = []
    reader = threading.Thread(target=lambda: answers.append(idle_api.get(f"/v1/jobs/{job_id}?wait=15").get_json()))
    started = time.monotonic()
    reader.start()
    time.sleep(0.3)

    assert idle_api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    reader.join(15)

    assert answers and answers[0]["status"] == "canceled"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("wait", ["0", "-1", "21", "soon", "nan", "inf"])
def test_a_bad_wait_is_refused(idle_api: FlaskClient, wait: str) -> None:  # noqa: F811
    job_id = submit_upload(idle_api)

    response = idle_api.get(f"/v1/jobs/{job_id}?wait={wait}")

    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "wait_invalid"


def test_the_client_waits_by_long_polling(redis_server: RedisProcess, tiny_worker: WorkerProcess) -> None:
    reads: list[str] = []
    settings = ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue)
    for url in serve_app(settings):
        client = BlipqClient(url)
        client.session.hooks["response"].append(lambda response, **_: reads.append(response.request.url))
        job_id = client.submit(shape_png("blue"), "what color is the shape?")
        job = client.wait(job_id, timeout_s=60)

    assert job["status"] == "succeeded" and job["answer"]
    polls = [url for url in reads if f"/v1/jobs/{job_id}" in url]
    assert polls and all("wait=" in url for url in polls)
    assert len(polls) <= 2, f"{len(polls)} reads: the first should have waited for the end"


def test_a_waiting_read_of_a_batch_item_answers_as_soon_as_it_ends(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess
) -> None:
    form = {"questions": '["what color?"]', "images": [(io.BytesIO(shape_png("green")), "g.png", "image/png")]}
    batch = tiny_api.post("/v1/batches", data=form)
    assert batch.status_code == 202, batch.get_json()
    lines = tiny_api.get(f"/v1/batches/{batch.get_json()['id']}/results").get_data(as_text=True).splitlines()
    job_id = json.loads(lines[0])["job_id"]

    started = time.monotonic()
    job = tiny_api.get(f"/v1/jobs/{job_id}?wait=20").get_json()

    assert job["status"] == "succeeded", (job, tiny_worker.log_tail())
    assert time.monotonic() - started < 19, "the read waited out its time although the item ended"
