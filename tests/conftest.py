"""Real parts for the tests: a Redis server, Celery workers, an HTTP server of images, checkpoints on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from api.app import create_app
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, start_redis, stop_process
from contract.fleet import fleet_client, live_workers
from tests.fixtures.stored import stored_keys
from tests.fixtures.tiny_model import build_tiny_caption_model, build_tiny_vqa_model

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120.0  # generous: the first job of a worker waits for its model to load on a busy CI machine
FINAL_STATES = ("succeeded", "failed", "canceled", "expired")


def in_ci() -> bool:
    """Whether the suite runs in CI (CI=true), which installs every tool a test needs."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(reason: str, install: str) -> NoReturn:
    """A tool a test needs is not here: skip on a developer's machine, saying how to `install` it; fail in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI installs it: see .ci/run and the dev extras of pyproject.toml)")
    pytest.skip(f"{reason}: {install}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A real redis-server of the tests' own on a free port (never the machine's standard one), for the session."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the session's Redis, with every blipq record removed before the test.

    Only the records of submissions are removed: Celery's own keys (its queue bindings), and the records the running
    workers keep about themselves (which /readyz reads), must survive for the session's workers.
    """
    client = redis.Redis.from_url(redis_server.url)
    keys = stored_keys(client)
    if keys:
        client.delete(*keys)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BLIP VQA checkpoint, saved with save_pretrained like a real one."""
    return build_tiny_vqa_model(tmp_path_factory.mktemp("tiny-vqa"))


@pytest.fixture(scope="session")
def tiny_caption_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BLIP captioning checkpoint (BlipForConditionalGeneration), saved like a real one."""
    return build_tiny_caption_model(tmp_path_factory.mktemp("tiny-caption"))


@dataclass
class ImageServer:
    """A real HTTP server on localhost; `routes` maps a path to (status, content type, body); `requests` counts the
    requests for each path."""

    port: int
    routes: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler of the tests' HTTP servers: no access log, and one call to answer."""

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """A real threaded HTTP server on 127.0.0.1 and a free port (yielded) until the block ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()


def serve_app(settings: ApiSettings) -> Iterator[str]:
    """The real API app over real HTTP on a free port, in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """Serve test images (and broken ones) over HTTP on a free port."""
    routes: dict[str, tuple[int, str, bytes]] = {}
    requests: Counter[str] = Counter()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests[self.path] += 1
            self.answer(*routes.get(self.path, (404, "text/plain", b"not found")))

    with http_server(Handler) as port:
        yield ImageServer(port, routes, requests)


@dataclass
class WorkerProcess:
    """A real `python -m worker` process (Celery, a thread pool feeding one model) serving one model on one queue."""

    process: subprocess.Popen[bytes]
    queue: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_worker(
    redis_url: str, model: Path, queue: str, log_path: Path, module: str = "worker", **env: str
) -> WorkerProcess:
    """Start a worker for `model` consuming `queue`; it loads the model before it takes messages. `module` is the
    worker's entry point (`python -m worker`, or a test's own around it)."""
    full_env = {
        **os.environ,
        "BLIPQ_REDIS_URL": redis_url,
        "BLIPQ_MODEL": str(model),
        "BLIPQ_QUEUE": queue,
        "BLIPQ_TORCH_THREADS": "1",
        # The tests' image servers listen on 127.0.0.1 on free ports: private, so allowed explicitly.
        "BLIPQ_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
        "BLIPQ_FETCH_ALLOW_PORTS": "1024-65535",
        # No worker of the suite contends for the default metrics port; a test that reads the metrics names one.
        "BLIPQ_METRICS_PORT": "0",
        **env,
    }
    log = log_path.open("wb")
    args = [sys.executable, "-m", module, f"--hostname={queue}@%h", "--loglevel=INFO"]
    process = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return WorkerProcess(process, queue, log_path)


@pytest.fixture(scope="session")
def tiny_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the tiny checkpoint on queue `tiny`."""
    log_path = tmp_path_factory.mktemp("logs") / "tiny-worker.log"
    worker = start_worker(redis_server.url, tiny_model_dir, "tiny", log_path)
    yield worker
    stop_process(worker.process)


@pytest.fixture(scope="session")
def tiny_caption_worker(
    redis_server: RedisProcess, tiny_caption_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the tiny captioning checkpoint on queue `tiny-caption` (beside `tiny_worker`'s VQA)."""
    log_path = tmp_path_factory.mktemp("logs") / "tiny-caption-worker.log"
    worker = start_worker(redis_server.url, tiny_caption_model_dir, "tiny-caption", log_path)
    yield worker
    stop_process(worker.process)


@pytest.fixture
def caption_service_url(
    redis_server: RedisProcess,
    tiny_worker: WorkerProcess,
    tiny_caption_worker: WorkerProcess,
    redis_client: redis.Redis,
) -> Iterator[str]:
    """The API over HTTP with both queues: the tiny VQA worker's, and the tiny captioning worker's for captions."""
    settings = ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue, caption_queue=tiny_caption_worker.queue)
    for worker in (tiny_worker, tiny_caption_worker):  # a task with no live worker yet is refused
        wait_for_worker_record(redis_server.url, worker.queue, 1, worker)
    yield from serve_app(settings)


def api_client(redis_url: str, queue: str, **overrides: Any) -> FlaskClient:
    """A test client of the real Flask app, talking to a real Redis. Its jobs may wait for a worker (many tests hold
    them in queues no worker reads); a test of the refusal says otherwise."""
    settings = ApiSettings(redis_url=redis_url, queue=queue, **{"wait_for_workers": True, **overrides})
    return create_app(settings).test_client()


@pytest.fixture
def tiny_api(redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    """The API, enqueueing on the tiny worker's queue."""
    return api_client(redis_server.url, tiny_worker.queue)


def wait_for_job(client: FlaskClient, job_id: str, worker: WorkerProcess | None = None) -> dict[str, Any]:
    """Poll GET /v1/jobs/<id> until the job ends; fail with the worker's log if it never does."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    delay = 0.02
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.get_json()
        body: dict[str, Any] = response.get_json()
        if body["status"] in FINAL_STATES:
            return body
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    detail = worker.log_tail() if worker else ""
    raise AssertionError(f"job {job_id} did not end within {JOB_TIMEOUT_S} s\n{detail}")


def wait_for_batch(client: FlaskClient, batch_id: str, worker: WorkerProcess) -> dict[str, Any]:
    """Poll the batch until every item ended; fail with the worker's log if it never does."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").get_json()
        if batch["ended"] == batch["count"]:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not end: {batch}\n{worker.log_tail()}")


def wait_for_status(
    client: FlaskClient, job_id: str, status: str, worker: WorkerProcess, poll_s: float = 0.02
) -> dict[str, Any]:
    """Poll the job until it has `status`; fail with the worker's log if it never does, or the worker exits."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and worker.process.poll() is None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").get_json()
        if job["status"] == status:
            return job
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} never became {status}\n{worker.log_tail()}")


def wait_for_worker_record(redis_url: str, queue: str, count: int, worker: WorkerProcess) -> None:
    """Wait until `count` workers of `queue` have announced themselves (their models are loaded)."""
    client = fleet_client(redis_url)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(live_workers(client, queue)) < count:
        assert time.monotonic() < deadline and worker.process.poll() is None, worker.log_tail()
        time.sleep(0.05)
