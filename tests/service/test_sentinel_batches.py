"""Batches, webhooks and rate limits through Redis Sentinel (BLIPQ_REDIS_SENTINELS): the API and a worker find the
primary through three real sentinels, in the database BLIPQ_REDIS_URL names. (tests/service/test_failover.py kills the
primary; these run on a steady one.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import SentinelGroup, start_sentinel_group, stop_process
from contract.keys import RATE_LIMIT_KEY_PREFIX, batch_key
from tests.support.images import shape_png
from tests.support.service import (
    JOB_TIMEOUT_S,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_batch,
    wait_for_job,
)
from tests.support.webhooks import QUICK_WEBHOOKS, SECRET, Receiver, serve, verify_signature
from worker.webhooks import SIGNATURE_HEADER

QUEUE = "sentinel-batches"
DATABASE = 3  # not the default: everything blipq keeps must land in this one
REDIS_URL = f"redis://127.0.0.1:1/{DATABASE}"  # with Sentinel, only its database number (and password) is used


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel") / "redis", replicas=1)
    yield group
    group.stop()


@pytest.fixture(scope="module")
def worker(
    sentinel_group: SentinelGroup, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker that finds the primary through the sentinels, and signs webhooks."""
    env = {
        "BLIPQ_REDIS_SENTINELS": sentinel_group.sentinel_addresses,
        "BLIPQ_REDIS_MASTER": sentinel_group.master,
        **QUICK_WEBHOOKS,
    }
    log_path = tmp_path_factory.mktemp("sentinel-worker") / "worker.log"
    process = start_worker(REDIS_URL, tiny_model_dir, QUEUE, log_path, **env)
    yield process
    stop_process(process.process)


@pytest.fixture
def primary(sentinel_group: SentinelGroup) -> Iterator[redis.Redis]:
    """The primary's database DATABASE, with every blipq record removed before the test."""
    port = sentinel_group.primary_port()
    assert port is not None, "the sentinels name a primary"
    client = redis.Redis(port=port, db=DATABASE)
    if keys := list(client.scan_iter("blipq:*")):
        client.delete(*keys)
    yield client
    client.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    httpd, receiver = serve("127.0.0.1")
    yield receiver
    httpd.shutdown()


def sentinel_api(group: SentinelGroup, queue: str = QUEUE, **overrides: Any) -> FlaskClient:
    """The API, finding the primary through the group's sentinels."""
    sentinels = tuple(("127.0.0.1", port) for port in group.sentinel_ports)
    return api_client(REDIS_URL, queue, redis_sentinels=sentinels, redis_master=group.master, **overrides)


def test_a_batch_and_a_job_are_answered_and_their_webhooks_delivered_through_the_sentinels(
    sentinel_group: SentinelGroup,
    primary: redis.Redis,
    worker: WorkerProcess,
    image_server: ImageServer,
    receiver: Receiver,
) -> None:
    # Given: the API and the worker on Redis through Sentinel, and images to tag
    client = sentinel_api(sentinel_group, webhooks_enabled=True)
    for color in ("red", "blue"):
        image_server.routes[f"/sentinel/{color}.png"] = (200, "image/png", shape_png(color))
    images = [image_server.url(f"/sentinel/{color}.png") for color in ("red", "blue")]

    # When: a batch whose webhook wants its items too, and a single job with a webhook, are submitted
    batch = client.post(
        "/v1/batches",
        json={
            "images": images,
            "questions": ["what color is the shape?", "is there a circle?"],
            "webhook": receiver.url("/batch"),
            "webhook_items": True,
        },
    )
    job = client.post(
        "/v1/jobs", json={"image_url": images[0], "question": "what color?", "webhook": receiver.url("/job")}
    )
    assert (batch.status_code, job.status_code) == (202, 202), (batch.get_json(), job.get_json())
    batch_id, job_id = batch.get_json()["id"], job.get_json()["id"]

    # Then: both are answered, in the primary's database that BLIPQ_REDIS_URL names...
    summary = wait_for_batch(client, batch_id, worker)
    assert summary["counts"]["succeeded"] == 4, summary
    assert wait_for_job(client, job_id, worker)["status"] == "succeeded"
    assert primary.exists(batch_key(batch_id), f"blipq:job:{job_id}") == 2
    # ...and every webhook is delivered, signed: the batch's 4 items, its summary, and the job
    deliveries = receiver.wait_for(6, JOB_TIMEOUT_S)
    assert all(verify_signature(SECRET, d.headers[SIGNATURE_HEADER], d.body) for d in deliveries)
    ids = sorted(json.loads(d.body)["id"] for d in deliveries)
    assert ids == sorted([batch_id, job_id, *(f"{batch_id}.{index}" for index in range(4))])
    assert client.get(f"/v1/batches/{batch_id}").get_json()["webhook_delivery"]["status"] == "delivered"


def test_a_rate_limit_is_enforced_through_the_sentinels_and_counted_in_the_configured_database(
    sentinel_group: SentinelGroup, primary: redis.Redis
) -> None:
    # Given: rate limits counted in Redis found through Sentinel (before a queue no worker reads)
    client = sentinel_api(sentinel_group, "sentinel-idle", rate_limit="2/minute", poll_rate_limit="3/minute")
    job = {"image_url": "https://images.example.com/a.png", "question": "what?"}
    other_database = redis.Redis(port=primary.connection_pool.connection_kwargs["port"], db=0)

    # When: a client submits three jobs and reads one four times
    submitted = [client.post("/v1/jobs", json=job) for _ in range(3)]
    job_id = submitted[0].get_json()["id"]
    reads = [client.get(f"/v1/jobs/{job_id}").status_code for _ in range(4)]

    # Then: each budget is enforced, and counted in the primary's database that BLIPQ_REDIS_URL names
    assert [response.status_code for response in submitted] == [202, 202, 429]
    assert submitted[2].get_json()["error"]["code"] == "rate_limited"
    assert reads == [200, 200, 200, 429]
    assert list(primary.scan_iter(f"{RATE_LIMIT_KEY_PREFIX}*")), "the counters are in the configured database"
    assert not list(other_database.scan_iter(f"{RATE_LIMIT_KEY_PREFIX}*")), "and in no other"
