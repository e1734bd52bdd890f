"""When a job ends, its webhook receives the job, signed; failures are retried with back-off, refusals are not."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask.testing import FlaskClient

from api.admission import queue_names
from blipq.up_redis import RedisProcess, stop_process
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_now
from contract.keys import webhook_outbox_key
from contract.states import JobStatus
from tests.support.images import shape_png
from tests.support.service import JOB_TIMEOUT_S, ImageServer, WorkerProcess, api_client, start_worker
from tests.support.webhooks import MAX_ATTEMPTS, QUICK_WEBHOOKS, SECRET, Receiver, serve, verify_signature
from worker.fetch import new_session
from worker.netguard import NetworkPolicy
from worker.webhooks import SIGNATURE_HEADER, Outbox, attempt_delivery, post_json, sign

QUEUE = "webhooks"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver on 127.0.0.1, which the tests' workers may reach (BLIPQ_FETCH_ALLOW_NETWORKS)."""
    httpd, receiver = serve("127.0.0.1")
    yield receiver
    httpd.shutdown()


@pytest.fixture
def canary() -> Iterator[Receiver]:
    """A receiver on 127.0.0.2: loopback, and outside what the workers may reach. It must never hear a thing."""
    httpd, receiver = serve("127.0.0.2")
    yield receiver
    httpd.shutdown()


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker that signs webhooks and retries them quickly."""
    log_path = tmp_path_factory.mktemp("webhooks") / "worker.log"
    process = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, **QUICK_WEBHOOKS)
    yield process
    stop_process(process.process)


@pytest.fixture
def api(redis_server: RedisProcess, worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    return api_client(redis_server.url, QUEUE, webhooks_enabled=True)


def submit(api: FlaskClient, image_server: ImageServer, webhook: str) -> str:
    image_server.routes["/hooked.png"] = (200, "image/png", shape_png("red"))
    body = {"question": "what color?", "image_url": image_server.url("/hooked.png"), "webhook": webhook}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def wait_for_delivery(api: FlaskClient, job_id: str, worker: WorkerProcess) -> dict[str, Any]:
    """Poll the job until its webhook delivery is over (delivered or failed)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").get_json()
        if (job["webhook_delivery"] or {}).get("status") in ("delivered", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"the webhook of job {job_id} was never over: {job}\n{worker.log_tail()}")


def test_an_ended_job_is_posted_to_its_webhook_signed(
    api: FlaskClient, worker: WorkerProcess, image_server: ImageServer, receiver: Receiver
) -> None:
    job_id = submit(api, image_server, receiver.url("/hooks/blipq"))

    job = wait_for_delivery(api, job_id, worker)

    assert job["status"] == "succeeded"
    assert job["webhook"] == receiver.url("/hooks/blipq")
    assert job["webhook_delivery"] == {"status": "delivered", "attempts": 1, "error": None}
    [delivery] = receiver.to("/hooks/blipq")
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["Connection"] == "close", "a sender keeps no connection to a receiver"
    assert verify_signature(SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body)
    assert not verify_signature("another secret of some length", delivery.headers[SIGNATURE_HEADER], delivery.body)
    assert not verify_signature(SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body.replace(b"red", b"blu"))
    del job["webhook_delivery"]
    assert json.loads(delivery.body) == job, "the receiver gets the job as GET shows it"


def test_a_receiver_that_fails_twice_gets_the_job_once_after_retries(
    api: FlaskClient, worker: WorkerProcess, image_server: ImageServer, receiver: Receiver
) -> None:
    receiver.answers["/flaky"] = [503, 503, 200]

    job = wait_for_delivery(api, submit(api, image_server, receiver.url("/flaky")), worker)

    assert job["webhook_delivery"] == {"status": "delivered", "attempts": 3, "error": None}
    deliveries = receiver.to("/flaky")
    assert [delivery.status for delivery in deliveries] == [503, 503, 200]
    assert all(verify_signature(SECRET, d.headers[SIGNATURE_HEADER], d.body) for d in deliveries)
    first, _, last = (json.loads(delivery.body) for delivery in deliveries)
    assert first == last, "every attempt sends the same job"


@pytest.mark.parametrize(
    ("answers", "attempts"),
    [([404], 1), ([410], 1), ([503], MAX_ATTEMPTS), ([429], MAX_ATTEMPTS)],
)
def test_a_4xx_is_not_retried_and_a_receiver_failing_for_good_is_given_up_on(
    api: FlaskClient,
    worker: WorkerProcess,
    image_server: ImageServer,
    receiver: Receiver,
    answers: list[int],
    attempts: int,
) -> None:
    receiver.answers["/failing"] = answers

    job = wait_for_delivery(api, submit(api, image_server, receiver.url("/failing")), worker)

    delivery = job["webhook_delivery"]
    assert delivery["status"] == "failed" and delivery["attempts"] == attempts, delivery
    assert delivery["error"]["code"] == "webhook_rejected" and str(answers[0]) in delivery["error"]["message"]
    assert len(receiver.to("/failing")) == attempts
    assert job["status"] == "succeeded", "a webhook's failure is not the job's"


@pytest.mark.parametrize("address", ["canary", "http://169.254.169.254/latest/meta-data/"])
def test_a_webhook_to_a_refused_address_is_never_contacted_and_the_job_ends_normally(
    api: FlaskClient, worker: WorkerProcess, image_server: ImageServer, canary: Receiver, address: str
) -> None:
    url = canary.url("/steal") if address == "canary" else address

    job = wait_for_delivery(api, submit(api, image_server, url), worker)

    assert job["status"] == "succeeded"
    delivery = job["webhook_delivery"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 1, delivery
    assert delivery["error"]["code"] == "url_not_allowed" and "webhook" in delivery["error"]["message"]
    assert canary.received == []


def test_a_job_canceled_by_the_api_is_posted_by_a_worker(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    worker: WorkerProcess,
    image_server: ImageServer,
    receiver: Receiver,
) -> None:
    # Given: a job on a queue that no worker reads, so it stays queued.
    idle = api_client(redis_server.url, "webhooks-idle", webhooks_enabled=True)
    job_id = submit(idle, image_server, receiver.url("/canceled"))
    try:
        # When: it is canceled (the API ends it, not a worker)...
        assert idle.post(f"/v1/jobs/{job_id}/cancel").get_json()["status"] == "canceled"
        # Then: a worker's sender delivers its webhook all the same.
        job = wait_for_delivery(idle, job_id, worker)
    finally:
        redis_client.delete(*queue_names("webhooks-idle"))
    assert job["webhook_delivery"]["status"] == "delivered"
    [delivery] = receiver.to("/canceled")
    assert json.loads(delivery.body)["status"] == "canceled"


def test_a_delivery_whose_sender_died_mid_attempt_is_made_again(redis_client: redis.Redis) -> None:
    # Given: an ended job with a webhook, its delivery due in the outbox.
    store = JobStore(redis_client, 600)
    job = Job(
        id=new_job_id(),
        status=JobStatus.RUNNING,
        question="q",
        created_at=utc_now(),
        webhook="http://127.0.0.1:9/hook",
    )
    store.create(job, "nowhere")
    store.accept(job, "nowhere")
    assert store.mark_succeeded(job.id, "red") == 1
    assert redis_client.zscore(webhook_outbox_key(), job.id) is not None
    outbox = Outbox(redis_client)

    # When: a sender claims it and dies before recording anything...
    # (the clock is the claims' own argument: a minute's lease outlives the test, so no running sender can take it)
    now = time.time()
    assert outbox.claim(job.id, now, lease_s=60) == 1
    # Then: no other sender takes it while the lease holds, and the next one does once it ran out.
    assert outbox.claim(job.id, now + 59, lease_s=60) == 0
    assert outbox.claim(job.id, now + 61, lease_s=60) == 2
    outbox.record(job.id, "delivered")
    assert redis_client.zscore(webhook_outbox_key(), job.id) is None
    assert store.get(job.id).webhook_status == "delivered"  # type: ignore[union-attr]


def test_the_receiver_check_refuses_old_and_malformed_signatures() -> None:
    body = b'{"id":"x"}'
    now = int(time.time())
    assert verify_signature(SECRET, sign(SECRET, now, body), body)
    assert not verify_signature(SECRET, sign(SECRET, now - 600, body), body), "a replay of an old delivery"
    assert not verify_signature(SECRET, "v1=abc", body)
    assert not verify_signature(SECRET, "", body)


def test_a_receiver_that_does_not_answer_or_is_down_is_worth_another_try() -> None:
    local = NetworkPolicy((ipaddress.ip_network("127.0.0.1/32"),), (range(1024, 65536),))
    session = new_session(local)
    with socket.socket() as silent:  # connections queue up and are never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        timed_out = attempt_delivery(session, url, b"{}", {}, timeout_s=0.5)
    refused = attempt_delivery(session, url, b"{}", {}, timeout_s=0.5)

    assert (timed_out.delivered, timed_out.retry, timed_out.code) == (False, True, "webhook_timeout")
    assert (refused.delivered, refused.retry, refused.code) == (False, True, "webhook_unreachable")
    assert refused.message == "the webhook host 127.0.0.1 refused the connection"


def test_webhooks_go_only_through_the_guarded_session() -> None:
    with pytest.raises(TypeError):
        post_json(requests.Session(), "http://127.0.0.1:9/hook", b"{}", {}, 1.0)


@pytest.mark.parametrize(
    ("webhook", "code"),
    [
        ("ftp://hooks.example.com/blipq", "webhook_invalid"),
        ("not a url", "webhook_invalid"),
        ("https://user:secret@hooks.example.com/blipq", "webhook_invalid"),
    ],
)
def test_a_bad_webhook_url_is_refused(
    redis_server: RedisProcess, redis_client: redis.Redis, webhook: str, code: str
) -> None:
    client = api_client(redis_server.url, "webhooks-refused", webhooks_enabled=True)
    body = {"question": "what?", "image_url": "https://images.example.com/a.png", "webhook": webhook}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert list(redis_client.scan_iter("blipq:job:*")) == []


def test_without_a_secret_the_api_refuses_webhooks(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    client = api_client(redis_server.url, "webhooks-refused")
    body = {"question": "what?", "image_url": "https://images.example.com/a.png", "webhook": "https://h.example/x"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "webhook_unavailable"
