"""Given rate limits, a client over its budget gets 429 with Retry-After; given a full queue, submissions get 503."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from flask.testing import FlaskClient
from limits.storage import RedisSentinelStorage, storage_from_string
from werkzeug.test import TestResponse

from api.admission import QUEUE_FULL_RETRY_AFTER_S, queue_depth, queue_names, waiting_answers
from api.auth import ApiKey, hash_api_key, new_api_key
from api.errors import STORE_RETRY_AFTER_S
from api.settings import DEFAULT_MAX_QUEUE_DEPTH, ApiSettings
from blipq.up_redis import RedisProcess, start_redis
from contract.errors import SettingsError
from contract.redis_target import RedisTarget
from tests.support.service import api_client

JOB = {"question": "what is it?", "image_url": "https://images.example.com/dog.png"}
ALICE, BOB = new_api_key(), new_api_key()
KEYS = (ApiKey("alice", hash_api_key(ALICE)), ApiKey("bob", hash_api_key(BOB)))


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    """A queue that no worker reads: what is enqueued stays there to be counted."""
    name = f"nobody-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(*queue_names(name))


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stored_jobs(client: redis.Redis) -> int:
    return len(list(client.scan_iter("blipq:job:*")))


def assert_retry_later(response: TestResponse, status: int, code: str, longest_s: int) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]
    assert 0 < int(response.headers["Retry-After"]) <= longest_s


def test_a_key_over_its_submission_limit_gets_429_and_another_key_does_not(
    redis_server: RedisProcess, redis_client: redis.Redis, queue: str
) -> None:
    api = api_client(redis_server.url, queue, api_keys=KEYS, rate_limit="3/minute")

    accepted = [api.post("/v1/jobs", json=JOB, headers=as_key(ALICE)).status_code for _ in range(3)]
    refused = api.post("/v1/jobs", json=JOB, headers=as_key(ALICE))
    other = api.post("/v1/jobs", json=JOB, headers=as_key(BOB))

    assert accepted == [202, 202, 202]
    assert_retry_later(refused, 429, "rate_limited", longest_s=60)
    assert other.status_code == 202
    assert stored_jobs(redis_client) == 4, "the refused job is not stored"
    assert queue_depth(redis_client, queue) == 4


def test_without_keys_the_limit_counts_per_client_address(redis_server: RedisProcess, queue: str) -> None:
    api = api_client(redis_server.url, queue, rate_limit="2/minute")
    first, second = {"REMOTE_ADDR": "192.0.2.1"}, {"REMOTE_ADDR": "192.0.2.2"}

    statuses = [api.post("/v1/jobs", json=JOB, environ_base=first).status_code for _ in range(3)]

    assert statuses == [202, 202, 429]
    assert api.post("/v1/jobs", json=JOB, environ_base=second).status_code == 202


def test_every_api_process_counts_against_the_same_budget(redis_server: RedisProcess, queue: str) -> None:
    """The counters are in Redis: two gunicorn workers do not give a client twice the limit."""
    apis = [api_client(redis_server.url, queue, api_keys=KEYS, rate_limit="3/minute") for _ in range(2)]

    statuses = [apis[i % 2].post("/v1/jobs", json=JOB, headers=as_key(ALICE)).status_code for i in range(4)]

    assert statuses == [202, 202, 202, 429]


def test_polling_has_a_budget_of_its_own(redis_server: RedisProcess, queue: str) -> None:
    api = api_client(redis_server.url, queue, api_keys=KEYS, rate_limit="1/minute", poll_rate_limit="3/minute")
    job_id = api.post("/v1/jobs", json=JOB, headers=as_key(ALICE)).get_json()["id"]
    assert api.post("/v1/jobs", json=JOB, headers=as_key(ALICE)).status_code == 429

    polls = [api.get(f"/v1/jobs/{job_id}", headers=as_key(ALICE)).status_code for _ in range(3)]
    over = api.get(f"/v1/jobs/{job_id}", headers=as_key(ALICE))

    assert polls == [200, 200, 200], "a client out of submissions may still poll"
    assert_retry_later(over, 429, "rate_limited", longest_s=60)
    assert all(api.get("/healthz").status_code == 200 for _ in range(5)), "the health check is never limited"


def test_a_submission_limit_alone_leaves_polling_free(redis_server: RedisProcess, queue: str) -> None:
    api = api_client(redis_server.url, queue, rate_limit="1/minute")
    job_id = api.post("/v1/jobs", json=JOB).get_json()["id"]

    assert [api.get(f"/v1/jobs/{job_id}").status_code for _ in range(10)] == [200] * 10


def test_requests_refused_for_their_key_do_not_count(redis_server: RedisProcess, queue: str) -> None:
    api = api_client(redis_server.url, queue, api_keys=KEYS, rate_limit="1/minute")

    refused = [api.post("/v1/jobs", json=JOB, headers=headers).status_code for headers in ({}, as_key(BOB + "x"))]

    assert refused == [401, 401]
    assert api.post("/v1/jobs", json=JOB, headers=as_key(ALICE)).status_code == 202


def test_a_full_queue_refuses_jobs_with_503_and_stores_nothing(
    redis_server: RedisProcess, redis_client: redis.Redis, queue: str
) -> None:
    api = api_client(redis_server.url, queue, max_queue_depth=3)

    accepted = [api.post("/v1/jobs", json=JOB).status_code for _ in range(3)]
    refused = api.post("/v1/jobs", json=JOB)

    assert accepted == [202, 202, 202]
    assert_retry_later(refused, 503, "queue_full", longest_s=QUEUE_FULL_RETRY_AFTER_S)
    assert stored_jobs(redis_client) == 3
    assert queue_depth(redis_client, queue) == 3


def test_the_queue_bound_counts_the_answers_waiting_at_every_priority(
    redis_server: RedisProcess, redis_client: redis.Redis, queue: str
) -> None:
    """Kombu keeps a list per priority step; a job waiting at any level is waiting work all the same."""
    api = api_client(redis_server.url, queue, max_queue_depth=3)
    accepted = [
        api.post("/v1/jobs", json={**JOB, "priority": level}).status_code for level in ("high", "normal", "low")
    ]

    assert accepted == [202, 202, 202]
    assert redis_client.llen(queue) == 1, "the others went to kombu's priority lists"
    assert queue_depth(redis_client, queue) == 3
    assert api.post("/v1/jobs", json={**JOB, "priority": "high"}).status_code == 503


def test_the_answers_waiting_fill_the_bound_and_an_unbounded_queue_takes_every_job(
    redis_server: RedisProcess, redis_client: redis.Redis, queue: str
) -> None:
    # Given: a queue holding 50 waiting answers, as the bound counts them (a batch's, stored by the API)
    waiting = {"images": [f"https://images.example.com/{n}.png" for n in range(25)], "questions": ["a?", "b?"]}
    assert api_client(redis_server.url, queue, max_queue_depth=0).post("/v1/batches", json=waiting).status_code == 202
    assert waiting_answers(redis_client, queue) == 50

    # When: one more job comes to an API bounded at 50 answers, and to one without a bound
    bounded = api_client(redis_server.url, queue, max_queue_depth=50).post("/v1/jobs", json=JOB)
    unbounded = api_client(redis_server.url, queue, max_queue_depth=0).post("/v1/jobs", json=JOB)

    # Then: the bound refuses it for those 50 answers, and without a bound it is taken
    assert_retry_later(bounded, 503, "queue_full", longest_s=QUEUE_FULL_RETRY_AFTER_S)
    assert "holds 50 answers" in bounded.get_json()["error"]["message"]
    assert unbounded.status_code == 202, unbounded.get_json()
    assert waiting_answers(redis_client, queue) == 51


def test_with_redis_away_a_limited_request_is_refused_503_not_let_through() -> None:
    server = start_redis()
    api: FlaskClient = api_client(server.url, "nobody", rate_limit="1/minute", poll_rate_limit="1/minute")
    server.stop()

    responses = [api.post("/v1/jobs", json=JOB), api.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA")]

    for response in responses:
        assert_retry_later(response, 503, "store_unavailable", longest_s=STORE_RETRY_AFTER_S)


def test_a_limit_whose_storage_refuses_the_api_refuses_requests_503_rather_than_turning_limits_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: an API whose Redis user may use the job store's keys but not the rate limits' (an ACL left out their
    # prefix, blipq:ratelimit): the limiter's storage fails while the job store works
    server = start_redis(tmp_path / "redis")
    try:
        admin = redis.Redis(port=server.port)
        queue = "acl"
        admin.acl_setuser(
            "api",
            enabled=True,
            passwords=["+api-password"],
            keys=["blipq:[^r]*", "_kombu.*", f"{queue}*"],  # every key but blipq:r..., as blipq:ratelimit...
            channels=["*"],
            commands=["+@all"],
        )
        url = f"redis://api:api-password@127.0.0.1:{server.port}/0"
        unlimited = api_client(url, queue)
        limited = api_client(url, queue, rate_limit="100/minute", poll_rate_limit="100/minute")
        caplog.set_level(logging.ERROR, logger="blipq.api")
        assert unlimited.post("/v1/jobs", json=JOB).status_code == 202, "the job store works for this user"

        # When: requests that a limit covers arrive
        responses = [limited.post("/v1/jobs", json=JOB), limited.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA")]
    finally:
        server.stop()

    # Then: they are refused 503, saying why (and logged), rather than let through with no limit counted
    for response in responses:
        assert_retry_later(response, 503, "store_unavailable", longest_s=STORE_RETRY_AFTER_S)
        assert "rate limits cannot be checked" in response.get_json()["error"]["message"]
    assert "rate limits cannot be counted" in caplog.text


def test_over_sentinel_the_limits_storage_gets_the_database_and_the_password_as_they_are() -> None:
    """The `limits` library's `redis+sentinel://` URI carries no database and would send a password quoted: both go
    to its storage as options, to the primary and to the sentinels alike."""
    password = "p@ss:w/rd%20 #1"
    target = RedisTarget(
        f"redis://:{quote(password, safe='')}@127.0.0.1:1/3", (("127.0.0.1", 26379), ("127.0.0.1", 26380)), "blipq"
    )

    storage = storage_from_string(target.limits_uri, **target.limits_options)

    assert isinstance(storage, RedisSentinelStorage)
    assert storage.service_name == "blipq"
    assert storage.sentinel.sentinel_kwargs["password"] == password
    primary = storage.sentinel.connection_kwargs
    assert (primary["password"], primary["db"]) == (password, 3)
    assert password not in target.limits_uri


def test_limits_are_off_and_the_queue_bounded_by_default() -> None:
    settings = ApiSettings.from_env({})

    assert (settings.rate_limit, settings.poll_rate_limit) == ("", "")
    assert settings.max_queue_depth == DEFAULT_MAX_QUEUE_DEPTH > 0


def test_limits_are_read_from_the_environment() -> None:
    env = {"BLIPQ_RATE_LIMIT": "10/second;300/hour", "BLIPQ_POLL_RATE_LIMIT": "20/second", "BLIPQ_MAX_QUEUE_DEPTH": "0"}

    settings = ApiSettings.from_env(env)

    assert (settings.rate_limit, settings.poll_rate_limit, settings.max_queue_depth) == (
        "10/second;300/hour",
        "20/second",
        0,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BLIPQ_RATE_LIMIT": "lots"}, "BLIPQ_RATE_LIMIT"),
        ({"BLIPQ_RATE_LIMIT": "10/fortnight"}, "BLIPQ_RATE_LIMIT"),
        ({"BLIPQ_RATE_LIMIT": "0/minute"}, "BLIPQ_RATE_LIMIT"),
        ({"BLIPQ_POLL_RATE_LIMIT": "fast"}, "BLIPQ_POLL_RATE_LIMIT"),
        ({"BLIPQ_MAX_QUEUE_DEPTH": "-1"}, "BLIPQ_MAX_QUEUE_DEPTH"),
        ({"BLIPQ_MAX_QUEUE_DEPTH": "many"}, "BLIPQ_MAX_QUEUE_DEPTH"),
    ],
)
def test_a_bad_limit_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        ApiSettings.from_env(env)
