"""The answer cache: the same image bytes and text, on the same model and settings, are answered without the model."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from contract.keys import ANSWER_INDEX_KEY, ANSWER_PREFIX
from tests.support.images import shape_png
from tests.support.service import ImageServer, WorkerProcess, api_client, start_worker, wait_for_batch, wait_for_job
from tests.support.tiny_model import build_tiny_vqa_model
from worker.cache import answer_cache_for, model_revision
from worker.inference import load_model
from worker.settings import WorkerSettings

COLORS = ["red", "green", "blue"]
QUESTIONS = ["what color is the shape?", "is there a circle?"]
NEW_QUESTION = "what shape is in the image?"
PLANTED = "from the cache"  # an answer no model gives: seeing it proves the cache answered
CACHE_TTL_S = 5 * 3600  # the module's worker keeps answers this long (not the default: the test sees it applied)


@pytest.fixture(scope="module")
def urls(image_server: ImageServer) -> list[str]:
    for color in COLORS:
        image_server.routes[f"/cache/{color}.png"] = (200, "image/png", shape_png(color))
        image_server.routes[f"/cache/copy-of-{color}.png"] = (200, "image/png", shape_png(color))
    return [image_server.url(f"/cache/{color}.png") for color in COLORS]


@pytest.fixture(scope="module")
def worker(redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log_path = tmp_path_factory.mktemp("cache") / "worker.log"
    process = start_worker(
        redis_server.url, tiny_model_dir, "cache", log_path, BLIPQ_ANSWER_CACHE_TTL_S=str(CACHE_TTL_S)
    )
    yield process
    stop_process(process.process)


def tag(client: FlaskClient, worker: WorkerProcess, images: list[str], questions: list[str]) -> list[dict[str, Any]]:
    """Every question about every image as one batch; its result lines once it ended."""
    response = client.post("/v1/batches", json={"images": images, "questions": questions})
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    assert wait_for_batch(client, batch_id, worker)["counts"]["succeeded"] == len(images) * len(questions)
    lines = client.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()
    return [json.loads(line) for line in lines]


def entries(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(f"{ANSWER_PREFIX}*"))


def worker_keys(client: redis.Redis, model: Path) -> dict[str, list[str]]:
    """The cache entries (per question) of each colour's image, as a worker of `model` with the default settings names
    them: the same model on the same CPU, the same generation settings."""
    cache = answer_cache_for(client, load_model(str(model), device="cpu"), WorkerSettings(model=str(model)))
    return {color: cache.keys(shape_png(color), QUESTIONS) for color in COLORS}


def plant(client: redis.Redis) -> list[bytes]:
    """Overwrite every cached answer with PLANTED; the keys."""
    keys = entries(client)
    for key in keys:
        client.set(key, PLANTED, keepttl=True)
    return keys


def test_a_rerun_with_one_new_question_asks_the_model_only_the_new_one(
    redis_server: RedisProcess, redis_client: redis.Redis, worker: WorkerProcess, urls: list[str]
) -> None:
    client = api_client(redis_server.url, worker.queue)
    first = tag(client, worker, urls, QUESTIONS)
    assert len(entries(redis_client)) == len(urls) * len(QUESTIONS), "each new answer was kept"
    plant(redis_client)

    again = tag(client, worker, urls, [*QUESTIONS, NEW_QUESTION])

    kept = [line["answer"] for line in again if line["question"] != NEW_QUESTION]
    new = [line["answer"] for line in again if line["question"] == NEW_QUESTION]
    assert kept == [PLANTED] * len(first), "the pairs asked before came from the cache"
    assert PLANTED not in new and all(new), "the new question went to the model"
    assert len(entries(redis_client)) == len(urls) * 3
    assert redis_client.zcard(ANSWER_INDEX_KEY) == len(urls) * 3


def test_the_same_bytes_at_another_url_and_a_single_job_hit_the_cache(
    redis_server: RedisProcess, redis_client: redis.Redis, worker: WorkerProcess, urls: list[str]
) -> None:
    client = api_client(redis_server.url, worker.queue)
    tag(client, worker, urls[:1], QUESTIONS[:1])
    plant(redis_client)

    copy = urls[0].replace("/cache/", "/cache/copy-of-")
    job_id = client.post("/v1/jobs", json={"image_url": copy, "question": QUESTIONS[0]}).get_json()["id"]

    assert wait_for_job(client, job_id, worker)["answer"] == PLANTED


def test_a_full_cache_hit_is_still_held_to_the_workers_pixel_limit(
    redis_server: RedisProcess, redis_client: redis.Redis, worker: WorkerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: an image (64x64: 4,096 pixels) whose answer the module's worker cached
    client = api_client(redis_server.url, worker.queue)
    image = shape_png("red")
    first = client.post("/v1/jobs", data={"question": QUESTIONS[0], "image": (io.BytesIO(image), "red.png")})
    assert wait_for_job(client, first.get_json()["id"], worker)["status"] == "succeeded"
    plant(redis_client)

    # When: a worker of the same model and settings, whose limit is 4,000 pixels, is asked the same question about it
    strict = start_worker(
        redis_server.url, tiny_model_dir, "cache-strict", tmp_path / "w.log", BLIPQ_MAX_IMAGE_PIXELS="4000"
    )
    try:
        strict_client = api_client(redis_server.url, strict.queue, max_image_pixels=10**6)
        second = strict_client.post("/v1/jobs", data={"question": QUESTIONS[0], "image": (io.BytesIO(image), "r.png")})
        job = wait_for_job(strict_client, second.get_json()["id"], strict)
    finally:
        stop_process(strict.process)

    # Then: it refuses it as a decode would, not answering from the cache
    assert (job["status"], job["error"]["code"]) == ("failed", "image_too_large"), job
    assert "4000 pixels" in job["error"]["message"]


def test_past_its_bound_the_cache_drops_its_oldest_entries_and_answers_from_the_rest(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, urls: list[str], tmp_path: Path
) -> None:
    # Given: a worker whose cache holds 4 entries, asked both questions about each of 3 images, one image after another
    bounded = start_worker(
        redis_server.url, tiny_model_dir, "cache-bounded", tmp_path / "w.log", BLIPQ_ANSWER_CACHE_MAX="4"
    )
    try:
        client = api_client(redis_server.url, bounded.queue)
        for url in urls:
            tag(client, bounded, [url], QUESTIONS)

        # Then: the first image's two entries, the oldest, are gone; the other two images' remain, indexed
        keys = worker_keys(redis_client, tiny_model_dir)
        newest = {key for color in COLORS[1:] for key in keys[color]}
        assert {key.decode() for key in entries(redis_client)} == newest
        assert {key.decode() for key in redis_client.zrange(ANSWER_INDEX_KEY, 0, -1)} == newest

        # ...and asked again, the remaining entries answer (planted), the dropped ones the model
        plant(redis_client)
        again = tag(client, bounded, urls, QUESTIONS)
    finally:
        stop_process(bounded.process)

    answers = {
        color: [line["answer"] for line in again if line["image_url"] == url]
        for color, url in zip(COLORS, urls, strict=True)
    }
    assert PLANTED not in answers[COLORS[0]] and all(answers[COLORS[0]]), "a dropped entry answers no more"
    assert answers[COLORS[1]] == answers[COLORS[2]] == [PLANTED, PLANTED], "a kept entry still answers"


def test_with_the_cache_off_nothing_is_kept_and_nothing_is_read(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    worker: WorkerProcess,
    tiny_model_dir: Path,
    urls: list[str],
    tmp_path: Path,
) -> None:
    off = start_worker(
        redis_server.url,
        tiny_model_dir,
        "cache-off",
        tmp_path / "off.log",
        BLIPQ_ANSWER_CACHE="off",
    )
    try:
        # Given: a worker with the cache off has answered, and kept nothing
        without = api_client(redis_server.url, off.queue)
        first = [line["answer"] for line in tag(without, off, urls, QUESTIONS)]
        assert entries(redis_client) == []
        # ...and the same model with the cache on has since cached the same answers, which were then planted: the
        # entries that these very questions read, as it shows
        with_cache = api_client(redis_server.url, worker.queue)
        tag(with_cache, worker, urls, QUESTIONS)
        plant(redis_client)
        assert [line["answer"] for line in tag(with_cache, worker, urls, QUESTIONS)] == [PLANTED] * len(first)

        # When: the worker with the cache off is asked again
        again = [line["answer"] for line in tag(without, off, urls, QUESTIONS)]
    finally:
        stop_process(off.process)

    # Then: the model answers it, as it did the first time, not the cache
    assert again == first
    assert PLANTED not in again


def test_another_model_revision_misses(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    worker: WorkerProcess,
    urls: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tag(api_client(redis_server.url, worker.queue), worker, urls, QUESTIONS)
    plant(redis_client)
    other_model = build_tiny_vqa_model(tmp_path_factory.mktemp("other-model"), seed=1)  # the same model, retrained
    other = start_worker(redis_server.url, other_model, "cache-other", tmp_path_factory.mktemp("o") / "w.log")
    try:
        answers = [line["answer"] for line in tag(api_client(redis_server.url, other.queue), other, urls, QUESTIONS)]
    finally:
        stop_process(other.process)

    assert PLANTED not in answers
    assert len(entries(redis_client)) == 2 * len(urls) * len(QUESTIONS)


def test_a_cached_answer_expires_after_the_cache_ttl(
    redis_server: RedisProcess, redis_client: redis.Redis, worker: WorkerProcess, urls: list[str]
) -> None:
    tag(api_client(redis_server.url, worker.queue), worker, urls[:1], QUESTIONS)

    ttls = [redis_client.ttl(key) for key in entries(redis_client)]

    assert len(ttls) == len(QUESTIONS)
    assert all(CACHE_TTL_S - 600 < ttl <= CACHE_TTL_S for ttl in ttls), ttls


def test_every_file_of_a_local_model_directory_is_part_of_its_revision(tiny_model_dir: Path, tmp_path: Path) -> None:
    original = model_revision(str(tiny_model_dir), None)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert model_revision(str(copy), None) == original, "a copy elsewhere is the same model"

    changed = {}
    for name, edit in [
        ("processor_config.json", lambda text: text.replace("0.48145466", "0.5")),
        ("tokenizer.json", lambda text: text.replace('"circle"', '"circles"')),
        ("generation_config.json", lambda text: text.replace('"use_cache": true', '"use_cache": false')),
    ]:
        model = shutil.copytree(tiny_model_dir, tmp_path / name)
        text = (model / name).read_text()
        assert edit(text) != text, name
        (model / name).write_text(edit(text))
        changed[name] = model_revision(str(model), None)
    nested = shutil.copytree(tiny_model_dir, tmp_path / "nested")
    (nested / "extra").mkdir()
    (nested / "extra" / "notes.json").write_text("{}")
    changed["a file in a subdirectory"] = model_revision(str(nested), None)

    assert original not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed
    assert model_revision(str(tiny_model_dir), "0123abc") == "0123abc", "a hub model: its commit hash"


def test_the_generation_settings_and_dtype_are_part_of_every_key(
    redis_client: redis.Redis, tiny_model_dir: Path
) -> None:
    image, texts = shape_png("red"), QUESTIONS
    float32 = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    bfloat16 = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")

    def keys(loaded: Any, **settings: Any) -> list[str]:
        worker_settings = WorkerSettings(model=str(tiny_model_dir), **settings)
        return answer_cache_for(redis_client, loaded, worker_settings).keys(image, texts)

    base = keys(float32)
    variants = {
        "max_new_tokens": keys(float32, max_new_tokens=5),
        "num_beams": keys(float32, num_beams=3),
        "dtype": keys(bfloat16),
    }

    assert keys(float32) == base, "the same model and settings: the same keys"
    for name, variant in variants.items():
        assert not set(variant) & set(base), name
    assert len({tuple(variant) for variant in variants.values()}) == len(variants)


def test_a_model_directory_whose_processor_config_changed_answers_from_the_model(
    redis_server: RedisProcess,
    redis_client: redis.Redis,
    worker: WorkerProcess,
    urls: list[str],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # Given: every answer of the model cached (and planted), and the same model directory with its image
    # processor's configuration changed since (its normalisation), as a deploy that updates files in place does
    tag(api_client(redis_server.url, worker.queue), worker, urls, QUESTIONS)
    plant(redis_client)
    changed = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = changed / "processor_config.json"
    config.write_text(config.read_text().replace("0.48145466", "0.5"))

    # When: a worker serving it is asked the same questions about the same images
    other = start_worker(redis_server.url, changed, "cache-processor", tmp_path / "w.log")
    try:
        answers = [line["answer"] for line in tag(api_client(redis_server.url, other.queue), other, urls, QUESTIONS)]
    finally:
        stop_process(other.process)

    # Then: the model answers, not the cache
    assert PLANTED not in answers
