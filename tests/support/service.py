"""The service's real parts as the tests start and watch them: worker processes, the API (a test client or real HTTP),
HTTP servers of images, and the waits for jobs, batches and workers."""

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
from typing import Any

from flask.testing import FlaskClient
from werkzeug.serving import make_server

from api.app import create_app
from api.settings import ApiSettings
from contract.fleet import fleet_client, live_workers
from tests.support.environment import ROOT
from tests.support.images import shape_png

JOB_TIMEOUT_S = 120.0  # generous: the first job of a worker waits for its model to load on a busy CI machine


FINAL_STATES = ("succeeded", "failed", "canceled", "expired")


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


def api_client(redis_url: str, queue: str, **overrides: Any) -> FlaskClient:
    """A test client of the real Flask app, talking to a real Redis. Its jobs may wait for a worker (many tests hold
    them in queues no worker reads); a test of the refusal says otherwise."""
    settings = ApiSettings(redis_url=redis_url, queue=queue, **{"wait_for_workers": True, **overrides})
    return create_app(settings).test_client()


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


# A worker whose record (refreshed every second) is gone 3 s after it died, and a reaper that looks every 2 s: the jobs
# a killed worker held are published again within seconds, not after the visibility timeout.
QUICK_RECOVERY = {"BLIPQ_ANNOUNCE_INTERVAL_S": "1", "BLIPQ_REAPER_INTERVAL_S": "2"}


class HeldImage:
    """An HTTP server whose image is sent only once `release` is set: a job that fetches it keeps running (or waits
    queued) until then. `requested` is set when a request arrives."""

    def __init__(self, color: str = "blue") -> None:
        self.release = threading.Event()
        self.requested = threading.Event()
        body, held = shape_png(color), self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                held.requested.set()
                held.release.wait(JOB_TIMEOUT_S)
                self.answer(200, "image/png", body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/held.png"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
