"""Given the API's own OpenAPI document, requests that schemathesis generates from it never meet a 5xx, every answer is
one the document describes, and the worker that took the accepted jobs still answers afterwards.

The real app on a real Redis, enqueueing on a queue of its own that a real worker consumes: the fuzzed jobs that get
a 202 (URLs of hosts that do not exist, mostly) reach that worker and fail there, one by one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from api.app import create_app
from api.auth import ApiKey, hash_api_key, new_api_key
from api.schemas.jobs import JobResponse
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, stop_process
from contract.states import JobTask
from tests.support.images import shape_png
from tests.support.service import JOB_TIMEOUT_S, WorkerProcess, start_worker, wait_for_job

QUEUE = "fuzz"
MAX_EXAMPLES = 50  # random requests per operation, beside the boundary cases of the coverage phase: seconds in all
KEY = new_api_key()
OPEN: dict[str, Any] = {}
KEYED: dict[str, Any] = {"api_keys": (ApiKey("fuzz", hash_api_key(KEY)),)}
NO_REDIS = "redis://redis.invalid:1/0"  # the URL of the apps that only serve the document
# Not positive_data_acceptance: a body the schema allows may still be refused, by rules across fields that the
# document states in words (an image by URL or by upload, one of the two) and by the whitespace trimmed off a question.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # a request the document rules out is refused with a 4xx, never accepted
    ignored_auth,  # with keys on: a request without a key, or with a wrong one, is refused
    unsupported_method,  # a method a route does not have is a 405...
    allow_header_conformance,  # ...that says which methods it has
]
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same requests on every run: a failure here is reproducible, never a flake
    deadline=None,  # a shared 2-core machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def fuzz_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker of the fuzzing queue; its image downloads give up fast, as most fuzzed hosts do not exist."""
    log_path = tmp_path_factory.mktemp("logs") / "fuzz-worker.log"
    env = {"BLIPQ_FETCH_CONNECT_TIMEOUT_S": "1", "BLIPQ_FETCH_TIMEOUT_S": "2"}
    worker = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, **env)
    yield worker
    stop_process(worker.process)


@pytest.fixture(scope="module")
def open_app(redis_server: RedisProcess, fuzz_worker: WorkerProcess) -> Flask:
    """The API as `blipq up` runs it (no keys, no rate limits), once its worker is ready: /readyz answers 200."""
    # A deployment of VQA only: /readyz wants no captioning worker (a caption job gets 503 no_worker).
    app = create_app(ApiSettings(redis_url=redis_server.url, queue=QUEUE, tasks=(JobTask.VQA,), **OPEN))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while app.test_client().get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"the worker never became ready\n{fuzz_worker.log_tail()}"
        time.sleep(0.1)
    return app


@pytest.fixture(scope="module")
def keyed_app(redis_server: RedisProcess, open_app: Flask) -> Flask:
    """The API with one configured key (and a ready worker)."""
    return create_app(ApiSettings(redis_url=redis_server.url, queue=QUEUE, tasks=(JobTask.VQA,), **KEYED))


def load_schema(**settings: Any) -> schemathesis.BaseSchema:
    """The document of an app with these settings. Loaded at collection, before Redis runs: the app that serves the
    document never reaches its Redis, and each test sends its requests to a real app (`app=`) on the tests' Redis.
    (schemathesis.pytest.from_fixture would avoid this, but it does not run under pytest 9.)
    """
    return schemathesis.openapi.from_wsgi("/openapi.json", create_app(ApiSettings(redis_url=NO_REDIS, **settings)))


@load_schema(**OPEN).parametrize()
@FUZZ_SETTINGS
def test_without_keys_every_answer_is_documented(case: schemathesis.Case, open_app: Flask) -> None:
    case.call_and_validate(app=open_app, checks=CHECKS)


@load_schema(**KEYED).parametrize()
@FUZZ_SETTINGS
def test_with_keys_every_answer_is_documented(case: schemathesis.Case, keyed_app: Flask) -> None:
    case.call_and_validate(app=keyed_app, headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)


def test_after_the_fuzzing_the_worker_still_answers(open_app: Flask, fuzz_worker: WorkerProcess) -> None:
    client = open_app.test_client()
    image = (io.BytesIO(shape_png("red")), "red.png", "image/png")

    response = client.post("/v1/jobs", data={"question": "what color is it?", "image": image})
    job = wait_for_job(client, response.get_json()["id"], fuzz_worker)

    assert job["status"] == "succeeded", job
    assert job["answer"]
    JobResponse.model_validate(job)  # as documented
    assert fuzz_worker.process.poll() is None, fuzz_worker.log_tail()


def test_a_deeply_nested_json_body_is_invalid_json(open_app: Flask) -> None:
    body = "[" * 100_000  # 100 kB, far below the body limit

    response = open_app.test_client().post("/v1/jobs", data=body, content_type="application/json")

    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == "invalid_json"
