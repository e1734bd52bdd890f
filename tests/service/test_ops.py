"""Operating it: /readyz says whether a worker can take jobs, /metrics counts requests and reads the queue from Redis,
each worker serves its own metrics, and every log line is a JSON object naming its job."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry, generate_latest

from api.admission import queue_names
from blipq.up import worker_metrics_env
from blipq.up_redis import RedisProcess, free_port, stop_process
from contract.states import JobTask
from tests.support.environment import ROOT
from tests.support.images import shape_png
from tests.support.metrics import value
from tests.support.service import (
    JOB_TIMEOUT_S,
    HeldImage,
    ImageServer,
    WorkerProcess,
    api_client,
    start_worker,
    wait_for_job,
)
from worker.metrics import watch_gpu_memory

QUEUE = "ops"
IDLE_QUEUE = "ops-idle"  # no worker ever serves it
UNKNOWN_JOB_ID = "x" * 22  # a well-formed id that no job has
OpsWorker = tuple[WorkerProcess, int]  # the worker, and the port of its metrics


@pytest.fixture(scope="module")
def ops_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpsWorker]:
    """A worker on queue `ops` that announces itself every second and serves its metrics on a free port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "ops-worker.log"
    env = {"BLIPQ_METRICS_PORT": str(port), "BLIPQ_METRICS_ADDR": "127.0.0.1", "BLIPQ_ANNOUNCE_INTERVAL_S": "1"}
    worker = start_worker(redis_server.url, tiny_model_dir, QUEUE, log_path, BLIPQ_LOG_FORMAT="json", **env)
    yield worker, port
    stop_process(worker.process)


@pytest.fixture
def ops_api(redis_server: RedisProcess, ops_worker: OpsWorker, redis_client: redis.Redis) -> FlaskClient:
    """The API of queue `ops` (a deployment of VQA only), once its worker is ready (the fixtures wipe its record: it
    comes back within 1 s)."""
    client = api_client(redis_server.url, QUEUE, tasks=(JobTask.VQA,))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, ops_worker[0].log_tail()
        time.sleep(0.1)
    return client


def test_readyz_is_503_until_a_worker_serves_the_queue(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    api = api_client(redis_server.url, IDLE_QUEUE)

    response = api.get("/readyz")

    assert response.status_code == 503
    body = response.get_json()
    tasks = {"vqa": {"queue": IDLE_QUEUE, "workers": []}, "caption": {"queue": "blipq-caption", "workers": []}}
    missing = ["worker:vqa", "worker:caption"]
    assert body == {"status": "not_ready", "redis": "ok", "tasks": tasks, "missing": missing}


def test_readyz_is_503_and_metrics_say_so_when_redis_is_away() -> None:
    api = api_client(f"redis://127.0.0.1:{free_port()}/0", IDLE_QUEUE)  # nothing listens there

    response = api.get("/readyz")
    metrics = api.get("/metrics")

    assert response.status_code == 503
    assert response.get_json()["redis"] == "unreachable" and response.get_json()["missing"] == ["redis"]
    assert metrics.status_code == 200
    assert value(metrics.get_data(as_text=True), "blipq_redis_up") == 0


def test_readyz_lists_the_worker_once_its_model_is_loaded(
    ops_api: FlaskClient, ops_worker: OpsWorker, tiny_model_dir: Path
) -> None:
    response = ops_api.get("/readyz")

    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["redis"], body["missing"]) == ("ready", "ok", [])
    [worker] = body["tasks"]["vqa"]["workers"]
    assert (worker["model"], worker["device"], worker["dtype"]) == (str(tiny_model_dir), "cpu", "float32")
    assert (worker["queue"], worker["metrics_port"]) == (QUEUE, ops_worker[1])
    assert worker["id"] == f"{worker['host']}:{worker['pid']}" and worker["pid"] == ops_worker[0].process.pid
    assert worker["loaded_at"].endswith("Z") and worker["load_seconds"] > 0


def test_api_metrics_count_requests_by_route_and_status_and_read_the_queue_depth(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    redis_client.delete(*queue_names(IDLE_QUEUE))  # Celery's lists are not blipq:* keys: the fixture keeps them
    api = api_client(redis_server.url, IDLE_QUEUE, caption_queue=f"{IDLE_QUEUE}-caption")
    for _ in range(3):
        upload = {"question": "what color is the shape?", "image": (io.BytesIO(shape_png("red")), "r.png")}
        assert api.post("/v1/jobs", data=upload).status_code == 202
    api.get("/healthz")
    api.get("/healthz")
    assert api.get(f"/v1/jobs/{UNKNOWN_JOB_ID}").status_code == 404
    api.get("/no/such/page")

    text = api.get("/metrics").get_data(as_text=True)

    assert value(text, "blipq_http_requests_total", method="POST", route="/v1/jobs", status="202") == 3
    assert value(text, "blipq_http_requests_total", method="GET", route="/healthz", status="200") == 2
    assert value(text, "blipq_http_requests_total", method="GET", route="/v1/jobs/<job_id>", status="404") == 1
    assert value(text, "blipq_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(text, "blipq_http_request_duration_seconds_count", method="POST", route="/v1/jobs") == 3
    assert value(text, "blipq_redis_up") == 1
    assert value(text, "blipq_jobs_queued", queue=IDLE_QUEUE) == 3
    assert value(text, "blipq_jobs_running", queue=IDLE_QUEUE) == 0
    assert value(text, "blipq_workers_ready", queue=IDLE_QUEUE) == 0
    assert value(text, "blipq_jobs_queued", queue=f"{IDLE_QUEUE}-caption") == 0  # the captions' queue, too


def test_jobs_running_counts_the_job_a_worker_holds_and_outcomes_are_counted(
    ops_api: FlaskClient, ops_worker: OpsWorker
) -> None:
    held = HeldImage()
    try:
        response = ops_api.post("/v1/jobs", json={"image_url": held.url, "question": "what color is the shape?"})
        assert held.requested.wait(JOB_TIMEOUT_S), ops_worker[0].log_tail()

        running = ops_api.get("/metrics").get_data(as_text=True)

        held.release.set()
        job = wait_for_job(ops_api, response.get_json()["id"], ops_worker[0])
    finally:
        held.release.set()
        held.server.shutdown()
    assert value(running, "blipq_jobs_running", queue=QUEUE) == 1
    assert value(running, "blipq_jobs_queued", queue=QUEUE) == 0
    assert value(running, "blipq_workers_ready", queue=QUEUE) == 1
    assert job["status"] == "succeeded"
    deadline = time.monotonic() + 10  # the worker acknowledges the message just after it recorded the answer
    while value(text := ops_api.get("/metrics").get_data(as_text=True), "blipq_jobs_running", queue=QUEUE):
        assert time.monotonic() < deadline, "the job still counts as running after it ended"
        time.sleep(0.05)
    assert value(text, "blipq_jobs_finished_total", queue=QUEUE, status="succeeded", code="") == 1


def test_worker_metrics_show_answers_and_inference_latency(
    ops_api: FlaskClient, ops_worker: OpsWorker, image_server: ImageServer
) -> None:
    worker_metrics = f"http://127.0.0.1:{ops_worker[1]}/metrics"
    image_server.routes["/ops-missing.png"] = (404, "text/plain", b"gone")
    before = requests.get(worker_metrics, timeout=5).text
    answered_before = value(before, "blipq_worker_answers_total") or 0
    timed_before = value(before, "blipq_worker_inference_seconds_count") or 0

    upload = {"question": "what color is the shape?", "image": (io.BytesIO(shape_png("red")), "r.png")}
    good = wait_for_job(ops_api, ops_api.post("/v1/jobs", data=upload).get_json()["id"], ops_worker[0])
    missing = {"image_url": image_server.url("/ops-missing.png"), "question": "what is it?"}
    bad = wait_for_job(ops_api, ops_api.post("/v1/jobs", json=missing).get_json()["id"], ops_worker[0])
    after = requests.get(worker_metrics, timeout=5).text

    assert (good["status"], bad["status"]) == ("succeeded", "failed")
    assert value(after, "blipq_worker_answers_total") == answered_before + 1
    assert value(after, "blipq_worker_inference_seconds_count") == timed_before + 1
    assert (value(after, "blipq_worker_inference_seconds_sum") or 0) > 0
    assert value(after, "blipq_worker_batch_size_bucket", le="1.0") == timed_before + 1
    assert (value(after, "blipq_worker_jobs_total", status="failed", code="image_fetch_failed") or 0) >= 1
    assert (value(after, "blipq_worker_model_load_seconds") or 0) > 0
    model = {"model": good["model"], "device": "cpu", "dtype": "float32", "queue": QUEUE}
    assert value(after, "blipq_worker_model_info", **model) == 1
    assert value(after, "blipq_worker_gpu_memory_allocated_bytes") is None, "no GPU gauges on the CPU"
    assert (value(after, "process_resident_memory_bytes") or 0) > 0


def json_records(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's log so far, one JSON object a line (a line still being written is left for the next read)."""
    text = worker.log_path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()
    # Celery warns about running as root before its logging starts (the tests may run as root): from there on...
    first = next((i for i, line in enumerate(lines) if line.startswith("{")), len(lines))
    return [json.loads(line) for line in lines[first:] if line.strip()]


def test_worker_log_lines_are_json_objects_that_name_their_job(
    ops_api: FlaskClient, ops_worker: OpsWorker, image_server: ImageServer
) -> None:
    image_server.routes["/ops-gone.png"] = (404, "text/plain", b"gone")
    failed = ops_api.post("/v1/jobs", json={"image_url": image_server.url("/ops-gone.png"), "question": "what?"})
    job_id = failed.get_json()["id"]
    assert wait_for_job(ops_api, job_id, ops_worker[0])["status"] == "failed"
    # The worker logs the job's end (its last line, with its timings) just after recording it: read on until it is in.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(job_id in r["message"] and "inference_s" in r for r in json_records(ops_worker[0])):
        assert time.monotonic() < deadline, ops_worker[0].log_tail()
        time.sleep(0.05)
    records = json_records(ops_worker[0])

    assert all({"time", "level", "logger", "pid", "message"} <= record.keys() for record in records)
    about_job = [record for record in records if job_id in record["message"]]
    assert len(about_job) >= 3, about_job  # received, failed, ended (and Celery's own "succeeded": the task did)
    assert all(record.get("job_id") == job_id for record in about_job)
    [ended] = [record for record in about_job if "inference_s" in record]  # the line with the job's timings
    assert (ended["status"], ended["error_code"], ended["logger"]) == ("failed", "image_fetch_failed", "blipq.worker")
    assert ended["duration_s"] > 0
    failure = [record for record in about_job if "failed: image_fetch_failed" in record["message"]]
    assert failure and failure[0]["error_code"] == "image_fetch_failed"


def test_blipq_api_adds_up_its_processes_metrics_and_logs_json(redis_server: RedisProcess, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"")  # left by an earlier run: removed at start
    port = free_port()
    env = {
        **os.environ,
        "BLIPQ_REDIS_URL": redis_server.url,
        "BLIPQ_QUEUE": IDLE_QUEUE,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    env.pop("BLIPQ_LOG_FORMAT", None)  # json is the default of `blipq api`
    log_path = tmp_path / "api.log"
    command = [sys.executable, "-m", "blipq.cli", "api", "--bind", f"127.0.0.1:{port}", "--workers", "2"]
    with log_path.open("wb") as log:
        api = subprocess.Popen([*command, "--threads", "2"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not _answers(f"{base}/healthz"):
            assert api.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for _ in range(8):  # a new connection each: either process may answer
            assert requests.get(f"{base}/v1/jobs/{UNKNOWN_JOB_ID}", timeout=5).status_code == 404

        text = requests.get(f"{base}/metrics", timeout=5).text
    finally:
        stop_process(api)

    assert value(text, "blipq_http_requests_total", method="GET", route="/v1/jobs/<job_id>", status="404") == 8
    assert value(text, "blipq_jobs_queued", queue=IDLE_QUEUE) is not None
    assert not (metrics_dir / "counter_1.db").exists()
    assert list(metrics_dir.glob("*.db")), "the processes keep their counters in PROMETHEUS_MULTIPROC_DIR"
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(record["logger"] == "gunicorn.error" for record in records)
    requests_logged = [record for record in records if record["logger"] == "blipq.api.requests"]
    assert len(requests_logged) == 8
    assert all(record["job_id"] == UNKNOWN_JOB_ID and record["status"] == 404 for record in requests_logged)
    assert all(record["route"] == "/v1/jobs/<job_id>" and record["duration_ms"] >= 0 for record in requests_logged)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.ConnectionError:
        return False


def test_blipq_up_gives_each_worker_its_own_metrics_port() -> None:
    assert worker_metrics_env({}, 0, "127.0.0.1") == {"BLIPQ_METRICS_PORT": "9808", "BLIPQ_METRICS_ADDR": "127.0.0.1"}
    assert worker_metrics_env({"BLIPQ_METRICS_PORT": "9900"}, 2, "0.0.0.0")["BLIPQ_METRICS_PORT"] == "9902"
    assert worker_metrics_env({"BLIPQ_METRICS_PORT": "0"}, 3, "127.0.0.1")["BLIPQ_METRICS_PORT"] == "0"


def test_gpu_memory_gauges_read_torch_when_prometheus_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: torch's CUDA memory counters are stood in for; what is checked is that the gauges call them.
    import torch

    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: asked.append(device) or 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 4000)
    registry = CollectorRegistry()
    watch_gpu_memory(torch.device("cuda:1"), registry)

    text = generate_latest(registry).decode()

    assert value(text, "blipq_worker_gpu_memory_allocated_bytes") == 1000
    assert value(text, "blipq_worker_gpu_memory_max_allocated_bytes") == 4000
    assert asked == [torch.device("cuda:1")] * 2
