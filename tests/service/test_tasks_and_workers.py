"""Each task needs a live worker: a job no worker can run is refused (unless jobs may wait), /readyz names each task
without a worker, and GET /v1/models lists each task's models, input size, workers and waiting answers, and the
API's upload limits."""

from __future__ import annotations

import io
import secrets
import time

import redis

from api.settings import ApiSettings
from blipq.up_redis import RedisProcess
from tests.support.images import shape_png
from tests.support.service import WorkerProcess, api_client, wait_for_job, wait_for_worker_record
from tests.support.tiny_model import IMAGE_SIZE


def test_a_job_or_batch_for_a_task_no_worker_serves_is_refused_no_worker_naming_the_task(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    # Given VQA workers (the tiny one) and no captioning worker, and jobs that may not wait for one
    nobody = f"nobody-{secrets.token_hex(4)}"
    api = api_client(redis_server.url, tiny_worker.queue, caption_queue=nobody, wait_for_workers=False)
    wait_for_worker_record(redis_server.url, tiny_worker.queue, 1, tiny_worker)
    image = {"image": (io.BytesIO(shape_png("red")), "red.png")}

    caption = api.post("/v1/jobs", data={"task": "caption", **image})
    batch = api.post("/v1/batches", json={"task": "caption", "images": ["https://example.com/a.png"]})
    question = api.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(shape_png("red")), "r")})

    for refused in (caption, batch):
        assert refused.status_code == 503, refused.get_json()
        error = refused.get_json()["error"]
        assert error["code"] == "no_worker" and "caption" in error["message"] and nobody in error["message"]
    assert question.status_code == 202
    assert wait_for_job(api, question.get_json()["id"], tiny_worker)["status"] == "succeeded"
    assert not redis_client.zcard(f"blipq:unstarted:{nobody}"), "nothing of the refused jobs was stored"


def test_with_wait_for_workers_a_job_for_a_task_with_no_worker_waits_queued(redis_server: RedisProcess) -> None:
    nobody = f"nobody-{secrets.token_hex(4)}"
    api = api_client(redis_server.url, nobody, wait_for_workers=True)

    response = api.post("/v1/jobs", json={"image_url": "https://example.com/a.png", "question": "what?"})

    assert response.status_code == 202, response.get_json()
    assert api.get(f"/v1/jobs/{response.get_json()['id']}").get_json()["status"] == "queued"


def test_readyz_names_each_task_without_a_worker_and_is_ready_once_every_task_has_one(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, tiny_caption_worker: WorkerProcess
) -> None:
    vqa_only = api_client(redis_server.url, tiny_worker.queue, caption_queue=f"nobody-{secrets.token_hex(4)}")
    both = api_client(redis_server.url, tiny_worker.queue, caption_queue=tiny_caption_worker.queue)
    wait_for_job(both, both.post("/v1/jobs", data={"task": "caption", "image": (io.BytesIO(shape_png("red")), "r")})
                 .get_json()["id"], tiny_caption_worker)  # fmt: skip  # both workers have loaded their models

    missing_one = vqa_only.get("/readyz")
    ready = both.get("/readyz")

    assert missing_one.status_code == 503 and missing_one.get_json()["missing"] == ["worker:caption"]
    assert missing_one.get_json()["tasks"]["vqa"]["workers"], missing_one.get_json()
    assert ready.status_code == 200, ready.get_json()
    assert {task: state["queue"] for task, state in ready.get_json()["tasks"].items()} == {
        "vqa": tiny_worker.queue,
        "caption": tiny_caption_worker.queue,
    }


def test_models_lists_each_task_its_models_workers_and_waiting_answers(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, tiny_model_dir: object
) -> None:
    nobody = f"nobody-{secrets.token_hex(4)}"
    api = api_client(redis_server.url, tiny_worker.queue, caption_queue=nobody)
    job = api.post("/v1/jobs", data={"question": "what color?", "image": (io.BytesIO(shape_png("red")), "r")})
    wait_for_job(api, job.get_json()["id"], tiny_worker)
    api.post("/v1/batches", json={"task": "caption", "images": ["https://example.com/a.png"] * 3})  # waits: nobody

    models = {entry["task"]: entry for entry in api.get("/v1/models").get_json()["models"]}

    vqa, caption = models["vqa"], models["caption"]
    assert (vqa["queue"], vqa["models"]) == (tiny_worker.queue, [str(tiny_model_dir)])
    assert [worker["pid"] for worker in vqa["workers"]] == [tiny_worker.process.pid]
    assert vqa["outcomes"].get("succeeded", 0) >= 1
    assert (caption["queue"], caption["models"], caption["workers"], caption["waiting"]) == (nobody, [], [], 3)
    # The size the worker's processor resizes to, with which filter, and how far it decodes images, as it publishes them
    assert vqa["image_size"] == {"width": IMAGE_SIZE, "height": IMAGE_SIZE}
    assert (vqa["workers"][0]["image_width"], vqa["decode"], caption["image_size"]) == (IMAGE_SIZE, "fast", None)
    assert (vqa["resample"], vqa["workers"][0]["resample"], caption["resample"]) == ("bicubic", "bicubic", None)


def test_models_publishes_the_upload_limits_and_reads_the_records_of_older_and_newer_workers(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given a queue served by a worker of an older version (its record has no input size) and two newer ones
    queue = f"records-{secrets.token_hex(4)}"
    api = api_client(redis_server.url, queue, max_image_bytes=5_000_000, max_image_pixels=6_000_000)
    old = {"id": "old:1", "host": "old", "pid": "1", "queue": queue, "model": "m", "device": "cpu"}
    old |= {"dtype": "float32", "loaded_at": "2026-12-06T00:00:00Z", "load_seconds": "1.5", "metrics_port": "0"}
    newer = [
        old | {"id": f"new:{n}", "pid": str(n), "image_width": str(side), "image_height": str(side // 2)}
        for n, side in ((2, 384), (3, 480))
    ]
    for record in (old, *newer):
        redis_client.hset(f"blipq:worker:{record['id']}", mapping=record)
        redis_client.zadd(f"blipq:workers:{queue}", {record["id"]: time.time()})

    # When a client reads the models
    body = api.get("/v1/models").get_json()

    # Then the limits are the API's own, every record is read, and the input size is the largest published
    assert body["limits"] == {
        "max_image_bytes": 5_000_000,
        "max_image_pixels": 6_000_000,
        "max_batch_upload_bytes": ApiSettings().max_batch_upload_bytes,
        "max_question_chars": ApiSettings().max_question_chars,
    }
    vqa = next(entry for entry in body["models"] if entry["task"] == "vqa")
    assert sorted((worker["id"], worker["image_width"]) for worker in vqa["workers"]) == [
        ("new:2", 384),
        ("new:3", 480),
        ("old:1", 0),
    ]
    assert vqa["image_size"] == {"width": 480, "height": 240}
    assert (vqa["decode"], vqa["resample"]) == (None, None)

    # And a decode mode and a filter are shown once every worker publishes the same one
    for record in (old, *newer):
        redis_client.hset(f"blipq:worker:{record['id']}", mapping={"decode": "exact", "resample": "bilinear"})
    vqa = next(e for e in api.get("/v1/models").get_json()["models"] if e["task"] == "vqa")
    assert (vqa["decode"], vqa["resample"]) == ("exact", "bilinear")


def test_a_request_refused_no_worker_is_made_anew_when_retried_with_its_idempotency_key(
    redis_server: RedisProcess,
) -> None:
    nobody = f"nobody-{secrets.token_hex(4)}"
    refusing = api_client(redis_server.url, nobody, wait_for_workers=False)
    waiting = api_client(redis_server.url, nobody, wait_for_workers=True)  # as once a worker serves the queue
    job = {"image_url": "https://example.com/a.png", "question": "what?"}
    batch = {"images": ["https://example.com/a.png"], "questions": ["what?"]}

    for path, body in (("/v1/jobs", job), ("/v1/batches", batch)):
        headers = {"Idempotency-Key": f"retry-{secrets.token_hex(4)}"}
        refused = refusing.post(path, json=body, headers=headers)
        retried = waiting.post(path, json=body, headers=headers)

        assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "no_worker"
        assert retried.status_code == 202, retried.get_json()  # not 409 idempotency_key_in_use
        assert "Idempotent-Replayed" not in retried.headers
