"""With API keys on, a batch belongs to the key that made it: another key that deletes it, or cancels it or one of its
items, is answered as for a batch (or job) that does not exist, and the batch is left as it was."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from api.admission import queue_names
from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess
from tests.support.service import api_client

ALICE, BOB = new_api_key(), new_api_key()
AS_ALICE, AS_BOB = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
UNKNOWN_BATCH = "AAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
def client(redis_server: RedisProcess, redis_client: redis.Redis) -> Iterator[FlaskClient]:
    """The API with Alice's and Bob's keys, in front of a queue that no worker reads."""
    queue = f"idle-{secrets.token_hex(4)}"
    keys = (ApiKey("alice", hash_api_key(ALICE)), ApiKey("bob", hash_api_key(BOB)))
    yield api_client(redis_server.url, queue, api_keys=keys)
    redis_client.delete(*queue_names(queue))


def submit_ended_batch(client: FlaskClient) -> str:
    """A batch of Alice's, canceled: every item ended, so that it may be deleted."""
    body = {"images": ["https://images.example.com/a.png", "https://images.example.com/b.png"], "questions": ["a?"]}
    response = client.post("/v1/batches", json=body, headers=AS_ALICE)
    assert response.status_code == 202, response.get_json()
    batch_id: str = response.get_json()["id"]
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=AS_ALICE).status_code == 200
    return batch_id


def assert_not_found(response: TestResponse, like: TestResponse, code: str) -> None:
    assert response.status_code == 404, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert response.get_json() == like.get_json(), "another key's batch must look exactly like no batch"


def test_another_key_cannot_delete_a_batch_and_it_is_left_whole(client: FlaskClient, redis_client: redis.Redis) -> None:
    # Given: an ended batch of Alice's
    batch_id = submit_ended_batch(client)
    keys_before = sorted(redis_client.scan_iter(f"*{batch_id}*"))

    # When: Bob deletes it, and a batch that does not exist
    deleted = client.delete(f"/v1/batches/{batch_id}", headers=AS_BOB)
    unknown = client.delete(f"/v1/batches/{UNKNOWN_BATCH}", headers=AS_BOB)

    # Then: Bob is answered as for no batch, and the batch is left whole: Alice still reads, then deletes it
    assert_not_found(deleted, unknown, "batch_not_found")
    assert sorted(redis_client.scan_iter(f"*{batch_id}*")) == keys_before
    assert client.get(f"/v1/batches/{batch_id}", headers=AS_ALICE).get_json()["ended"] == 2
    assert client.delete(f"/v1/batches/{batch_id}", headers=AS_ALICE).status_code == 204
    assert list(redis_client.scan_iter(f"*{batch_id}*")) == []


def test_another_key_cannot_cancel_a_batch_or_its_items(client: FlaskClient) -> None:
    # Given: a queued batch of Alice's
    body = {"images": ["https://images.example.com/a.png"], "questions": ["a?", "b?"]}
    batch_id = client.post("/v1/batches", json=body, headers=AS_ALICE).get_json()["id"]

    # When: Bob cancels it, and one of its items
    batch = client.post(f"/v1/batches/{batch_id}/cancel", headers=AS_BOB)
    item = client.post(f"/v1/jobs/{batch_id}.1/cancel", headers=AS_BOB)

    # Then: Bob is answered as for no batch and no job, and nothing of it was canceled
    assert_not_found(batch, client.post(f"/v1/batches/{UNKNOWN_BATCH}/cancel", headers=AS_BOB), "batch_not_found")
    assert_not_found(item, client.post(f"/v1/jobs/{UNKNOWN_BATCH}.1/cancel", headers=AS_BOB), "job_not_found")
    summary = client.get(f"/v1/batches/{batch_id}", headers=AS_ALICE).get_json()
    assert (summary["counts"]["queued"], summary["counts"]["canceled"]) == (2, 0), summary
