"""A batch's webhook with `webhook_items`: each item is POSTed to it, signed, as its job view shows it, once it ended;
the batch's summary once, when its last item ended."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from tests.support.images import shape_png
from tests.support.service import JOB_TIMEOUT_S, ImageServer, WorkerProcess, api_client, start_worker, wait_for_batch
from tests.support.webhooks import QUICK_WEBHOOKS, SECRET, Receiver, serve, verify_signature
from worker.webhooks import SIGNATURE_HEADER

COLORS = ("red", "blue")
QUESTIONS = ("what color is the shape?", "is there a circle?")


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker that signs webhooks and retries them quickly."""
    log_path = tmp_path_factory.mktemp("batch-webhooks") / "worker.log"
    process = start_worker(redis_server.url, tiny_model_dir, "batch-webhooks", log_path, **QUICK_WEBHOOKS)
    yield process
    stop_process(process.process)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    httpd, receiver = serve("127.0.0.1")
    yield receiver
    httpd.shutdown()


@pytest.fixture
def api(redis_server: RedisProcess, worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    return api_client(redis_server.url, worker.queue, webhooks_enabled=True)


def test_each_item_is_posted_to_the_webhook_signed_as_its_job_view_and_the_batch_once(
    api: FlaskClient, worker: WorkerProcess, image_server: ImageServer, receiver: Receiver
) -> None:
    # Given: a batch of 2 images x 2 questions whose webhook asks for its items too
    for color in COLORS:
        image_server.routes[f"/item-hooks/{color}.png"] = (200, "image/png", shape_png(color))
    images = [image_server.url(f"/item-hooks/{color}.png") for color in COLORS]
    body = {"images": images, "questions": list(QUESTIONS), "webhook": receiver.url("/hook"), "webhook_items": True}
    response = api.post("/v1/batches", json=body)
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]

    # When: the batch ends, and its 4 items and its summary are delivered
    wait_for_batch(api, batch_id, worker)
    deliveries = receiver.wait_for(5, JOB_TIMEOUT_S)

    # Then: each delivery is signed with the webhook secret...
    assert all(verify_signature(SECRET, d.headers[SIGNATURE_HEADER], d.body) for d in deliveries)
    assert {d.path for d in deliveries} == {"/hook"}
    posted = [json.loads(d.body) for d in deliveries]
    # ...each item is posted once, as GET /v1/jobs/<batch id>.<index> shows it (less the delivery's own state)...
    items = {body["id"]: body for body in posted if body.get("batch_id") == batch_id}
    assert sorted(items) == [f"{batch_id}.{index}" for index in range(4)]
    for item_id, item in items.items():
        view = api.get(f"/v1/jobs/{item_id}").get_json()
        assert view["webhook_delivery"] == {"status": "delivered", "attempts": 1, "error": None}, view
        del view["webhook_delivery"]
        assert item == view
        assert (item["status"], item["webhook"]) == ("succeeded", receiver.url("/hook"))
    # ...and the batch's summary is posted once, with every item ended
    [summary] = [body for body in posted if body.get("id") == batch_id]
    assert (summary["ended"], summary["counts"]["succeeded"]) == (4, 4)
    assert len(deliveries) == 5
    assert api.get(f"/v1/batches/{batch_id}").get_json()["webhook_delivery"]["status"] == "delivered"
