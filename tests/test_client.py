"""The Python client against the real service over HTTP: ask, errors with the service's codes, waiting bounds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.client import BlipqClient, BlipqClientError, JobFailedError
from api.settings import ApiSettings
from api.up import RedisProcess
from tests.conftest import ROOT, ImageServer, WorkerProcess, serve_app, wait_for_worker_record
from tests.fixtures.images import shape_png
from tests.test_chaos import reference_answers


@pytest.fixture
def service_url(redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis) -> Iterator[str]:
    """The API over HTTP, enqueueing on the tiny worker's queue, once that worker is live."""
    wait_for_worker_record(redis_server.url, tiny_worker.queue, 1, tiny_worker)
    yield from serve_app(ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue))


def test_ask_answers_about_a_local_file_bytes_and_a_url(
    service_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    client = BlipqClient(service_url)
    picture = tmp_path / "red.png"
    picture.write_bytes(shape_png("red"))
    image_server.routes["/red.png"] = (200, "image/png", shape_png("red"))

    from_file = client.ask(picture, "what color is the shape?", timeout_s=120)
    from_bytes = client.ask(shape_png("red"), "what color is the shape?", timeout_s=120)
    from_url = client.ask(image_server.url("/red.png"), "what color is the shape?", timeout_s=120)

    assert from_file and from_file == from_bytes == from_url  # the same pixels and question: the same answer


def test_a_failed_job_raises_with_the_service_code(service_url: str, image_server: ImageServer) -> None:
    client = BlipqClient(service_url)
    with pytest.raises(JobFailedError) as failure:
        client.ask(image_server.url("/missing.png"), "what color?", timeout_s=120)
    assert failure.value.code == "image_fetch_failed"
    assert failure.value.job["status"] == "failed"


def test_a_refused_request_raises_with_the_service_code(service_url: str) -> None:
    with pytest.raises(BlipqClientError) as refused:
        BlipqClient(service_url).submit(shape_png("red"), "   ")
    assert (refused.value.status, refused.value.code) == (422, "question_empty")


def test_waiting_is_bounded(redis_server: RedisProcess, redis_client: redis.Redis) -> None:
    # A queue no worker consumes: the job stays queued, and `wait` gives up at its timeout.
    for url in serve_app(ApiSettings(redis_url=redis_server.url, queue="nobody-listens", wait_for_workers=True)):
        client = BlipqClient(url)
        job_id = client.submit(shape_png("blue"), "what color?")
        with pytest.raises(TimeoutError):
            client.wait(job_id, timeout_s=0.5)
        assert client.get(job_id)["status"] == "queued"


def test_blipq_ask_prints_the_answer_or_the_error_code(
    service_url: str, image_server: ImageServer, tmp_path: Path
) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(shape_png("red"))
    expected = BlipqClient(service_url).ask(picture, "what color is the shape?", timeout_s=120)

    def blipq_ask(image: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "api.cli", "ask", image, "what color is the shape?", "--url", service_url]
        return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)

    answered = blipq_ask(str(picture))
    assert (answered.returncode, answered.stdout.strip()) == (0, expected), answered.stderr
    failed = blipq_ask(image_server.url("/nothing-here.png"))
    assert failed.returncode == 1 and "image_fetch_failed" in failed.stderr, failed.stderr


def test_a_batch_is_submitted_waited_for_and_read_back(service_url: str, image_server: ImageServer) -> None:
    client = BlipqClient(service_url)
    image_server.routes["/red.png"] = (200, "image/png", shape_png("red"))
    images = [image_server.url("/red.png"), image_server.url("/gone.png")]
    questions = ["what color is the shape?", "what shape is in the image?"]
    summaries: list[dict[str, object]] = []

    batch_id, count = client.submit_batch(images, questions)
    final = client.wait_batch(batch_id, on_progress=summaries.append, timeout_s=120)
    results = list(client.results(batch_id))

    assert count == 4 and final["ended"] == 4 and summaries[-1] == final
    assert [(item["index"], item["image_url"], item["question"]) for item in results] == [
        (index, image, question) for index, (image, question) in enumerate((i, q) for i in images for q in questions)
    ]
    assert [item["status"] for item in results] == ["succeeded", "succeeded", "failed", "failed"]
    assert results[0]["answer"] == client.ask(images[0], questions[0], timeout_s=120)
    assert [item["index"] for item in client.results(batch_id, offset=1, limit=2)] == [1, 2]


def test_a_batch_of_local_files_is_uploaded(service_url: str, tmp_path: Path) -> None:
    client = BlipqClient(service_url)
    pictures = [tmp_path / "red.png", tmp_path / "blue.png"]
    for picture in pictures:
        picture.write_bytes(shape_png(picture.stem))

    batch_id, count = client.submit_batch(pictures, ["what color is the shape?"])
    client.wait_batch(batch_id, timeout_s=120)
    results = list(client.results(batch_id))

    assert count == 2
    assert [(item["image_name"], item["image_url"], item["status"]) for item in results] == [
        ("red.png", None, "succeeded"),
        ("blue.png", None, "succeeded"),
    ]
    assert [item["answer"] for item in results] == [
        client.ask(p, "what color is the shape?", timeout_s=120) for p in pictures
    ]


def test_waiting_for_a_batch_is_bounded_and_mixed_images_are_refused(
    redis_server: RedisProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    for url in serve_app(ApiSettings(redis_url=redis_server.url, queue="nobody-listens", wait_for_workers=True)):
        client = BlipqClient(url)
        batch_id, _ = client.submit_batch(["https://example.com/a.png"], ["what color?"])
        with pytest.raises(TimeoutError):
            client.wait_batch(batch_id, timeout_s=0.5)
        assert client.batch(batch_id)["counts"]["queued"] == 1
        with pytest.raises(ValueError, match="all http"):
            client.submit_batch(["https://example.com/a.png", tmp_path / "a.png"], ["what color?"])


def test_caption_returns_the_models_caption_of_a_file_bytes_and_a_url(
    caption_service_url: str, image_server: ImageServer, tiny_caption_model_dir: Path, tmp_path: Path
) -> None:
    client = BlipqClient(caption_service_url)
    picture = tmp_path / "red.png"
    picture.write_bytes(shape_png("red"))
    image_server.routes["/caption-red.png"] = (200, "image/png", shape_png("red"))
    expected = {
        prompt: reference_answers(tiny_caption_model_dir, [(shape_png("red"), prompt)])[0] for prompt in ("", "the")
    }

    captions = [client.caption(image, timeout_s=120) for image in (picture, shape_png("red"))]
    captions.append(client.caption(image_server.url("/caption-red.png"), timeout_s=120))
    prompted = client.caption(picture, prompt="the", timeout_s=120)

    assert captions == [expected[""]] * 3
    assert prompted == expected["the"]
    assert client.ask(picture, "what color is the shape?", timeout_s=120), "questions still go to the VQA worker"


def test_blipq_caption_prints_the_caption_or_the_error_code(
    caption_service_url: str, image_server: ImageServer, tiny_caption_model_dir: Path, tmp_path: Path
) -> None:
    picture = tmp_path / "blue.png"
    picture.write_bytes(shape_png("blue"))
    expected = reference_answers(tiny_caption_model_dir, [(shape_png("blue"), "a picture of")])[0]

    def blipq_caption(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "api.cli", "caption", *args, "--url", caption_service_url]
        return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)

    captioned = blipq_caption(str(picture), "--prompt", "a picture of")
    assert (captioned.returncode, captioned.stdout.strip()) == (0, expected), captioned.stderr
    failed = blipq_caption(image_server.url("/nothing-here.png"))
    assert failed.returncode == 1 and "blipq caption: image_fetch_failed" in failed.stderr, failed.stderr


def test_a_caption_batch_is_submitted_waited_for_and_read_back(
    caption_service_url: str, image_server: ImageServer, tiny_caption_model_dir: Path, tmp_path: Path
) -> None:
    client = BlipqClient(caption_service_url)
    colors = ["red", "green"]
    for color in colors:
        image_server.routes[f"/caption-{color}.png"] = (200, "image/png", shape_png(color))
        (tmp_path / f"{color}.png").write_bytes(shape_png(color))
    urls = [image_server.url(f"/caption-{color}.png") for color in colors]
    files = [tmp_path / f"{color}.png" for color in colors]
    expected = reference_answers(tiny_caption_model_dir, [(shape_png(color), "the") for color in colors])

    for images in (urls, files):
        batch_id, count = client.submit_batch(images, caption=True, prompt="the")
        client.wait_batch(batch_id, timeout_s=120)
        results = list(client.results(batch_id))

        assert count == 2
        assert [(item["task"], item["prompt"], item["status"]) for item in results] == [
            ("caption", "the", "succeeded")
        ] * 2
        assert [item["answer"] for item in results] == expected
    with pytest.raises(ValueError, match="no questions"):
        client.submit_batch(urls, ["what color?"], caption=True)
