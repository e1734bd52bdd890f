"""The Python client against the real service over HTTP: ask, errors with the service's codes, waiting bounds."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api.settings import ApiSettings
from blipq.cli import main
from blipq.client import BlipqClient, BlipqClientError, JobFailedError, ServiceUnreachableError
from blipq.up_redis import RedisProcess
from tests.support.answers import reference_answers
from tests.support.environment import ROOT
from tests.support.fronts import counting_front
from tests.support.images import photo, shape_png
from tests.support.service import ImageServer, WorkerProcess, serve_app, wait_for_worker_record


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
    assert failure.value.job_status == "failed" == failure.value.job["status"]
    assert failure.value.job_id == failure.value.job["id"] and failure.value.job_id
    assert failure.value.status is None, "no HTTP refusal is behind it: the job ended without an answer"


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
        command = [sys.executable, "-m", "blipq.cli", "ask", image, "what color is the shape?", "--url", service_url]
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
        command = [sys.executable, "-m", "blipq.cli", "caption", *args, "--url", caption_service_url]
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
        client.submit_batch(urls, ["what color?"], task="caption")


def test_a_shrinking_client_sends_fewer_bytes_for_the_answers_and_captions_of_the_originals(
    caption_service_url: str, tmp_path: Path
) -> None:
    # Given a photo stored sideways and a PNG with an alpha band, many times the test models' input
    sideways, cutout = tmp_path / "sideways.jpg", tmp_path / "cutout.png"
    sideways.write_bytes(photo("blue", orientation=6))
    cutout.write_bytes(photo("red", (300, 200), fmt="PNG"))
    question = "what color is the shape?"
    seen, sent_bytes = {}, {}

    # When a client asks, captions and submits a batch of questions and captions, shrinking and not
    for shrink in (True, False):
        with counting_front(caption_service_url) as (front, sent):
            client = BlipqClient(front, shrink=shrink)
            answer, caption = client.ask(sideways, question, timeout_s=120), client.caption(cutout, timeout_s=120)
            batch_id, count = client.submit_batch([sideways, cutout], [question], caption=True)
            client.wait_batch(batch_id, timeout_s=120)
            lines = [(item["task"], item["status"], item["answer"]) for item in client.results(batch_id)]
        seen[shrink] = (answer, caption, count, lines)
        sent_bytes[shrink] = sum(sent.bodies("POST", "/v1/jobs") + sent.bodies("POST", "/v1/batches"))

    # Then it gets the same answers and captions, for a fraction of the bytes
    assert seen[True] == seen[False]
    assert [task for task, _, _ in seen[True][3]] == ["vqa", "caption", "vqa", "caption"]
    assert {status for _, status, _ in seen[True][3]} == {"succeeded"}
    assert sent_bytes[True] * 10 < sent_bytes[False], sent_bytes


def test_a_shrinking_client_refuses_a_picture_the_workers_would_refuse_naming_it(
    service_url: str, tmp_path: Path
) -> None:
    good, truncated = tmp_path / "good.jpg", tmp_path / "truncated.jpg"
    good.write_bytes(photo("red"))
    truncated.write_bytes(photo("green")[:4000])  # its header is whole, its pixels cut

    with pytest.raises(BlipqClientError) as refused:
        BlipqClient(service_url, shrink=True).submit_batch([good, truncated], ["what color is the shape?"])

    assert (refused.value.code, refused.value.image_index, refused.value.status) == ("image_invalid", 1, None)


OTHER_SCHEMES = ["ftp://example.com/x.jpg", "s3://bucket/x.jpg", "gs://bucket/x.jpg", "data:image/png;base64,iVBO"]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("image", OTHER_SCHEMES)
def test_an_image_of_another_scheme_is_refused_not_read_as_a_file(image: str) -> None:
    # A service that is not there: were anything sent, the error would be a refused connection
    client = BlipqClient(f"http://127.0.0.1:{closed_port()}")

    for call in (
        lambda: client.submit(image, "what color?"),
        lambda: client.ask(image, "what color?"),
        lambda: client.caption(image),
        lambda: client.submit_batch([image], ["what color?"]),
    ):
        with pytest.raises(BlipqClientError) as refused:
            call()
        assert refused.value.code == "image_url_invalid" and refused.value.status is None
        assert "only http(s) URLs and local files" in refused.value.message
        assert "No such file" not in refused.value.message


@pytest.mark.parametrize("command", ["ask", "caption"])
def test_blipq_ask_and_caption_refuse_an_image_of_another_scheme(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [command, "s3://bucket/x.jpg", *(["what color?"] if command == "ask" else [])]

    with pytest.raises(SystemExit) as exit_status:
        main([*args, "--url", f"http://127.0.0.1:{closed_port()}"])

    assert exit_status.value.code == 1
    assert f"blipq {command}: image_url_invalid: 's3://bucket/x.jpg': only http(s) URLs" in capsys.readouterr().err


UNREACHABLE = [
    (
        lambda: f"http://127.0.0.1:{closed_port()}",
        "service_refused",
        "it refused the connection: is `blipq up` running?",
    ),
    (
        lambda: "http://blipq-nowhere.invalid:8000",
        "service_not_found",
        "the host blipq-nowhere.invalid does not resolve",
    ),
]


@pytest.mark.parametrize(("make_url", "code", "why"), UNREACHABLE, ids=["refused", "dns"])
def test_a_service_that_cannot_be_reached_is_named_at_once(make_url: Any, code: str, why: str) -> None:
    url = make_url()
    client = BlipqClient(url)

    started = time.monotonic()
    with pytest.raises(ServiceUnreachableError) as unreachable:
        client.ask(shape_png("red"), "what color?")

    # Said at once, not after the ten minutes of retries a service that answered before gets, with its code and why
    assert time.monotonic() - started < 60
    assert unreachable.value.code == code and unreachable.value.status is None
    assert unreachable.value.message == f"cannot reach the blipq service at {url}: {why}"


@pytest.mark.parametrize(("make_url", "code", "why"), UNREACHABLE, ids=["refused", "dns"])
def test_blipq_ask_caption_and_tag_name_a_service_that_cannot_be_reached(
    make_url: Any, code: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = make_url()
    picture = tmp_path / "red.png"
    picture.write_bytes(shape_png("red"))
    commands = {
        "ask": ["ask", str(picture), "what color?"],
        "caption": ["caption", str(picture)],
        "tag": ["tag", str(picture), "-q", "what color?", "-o", str(tmp_path / "out.jsonl")],
    }

    for command, args in commands.items():
        with pytest.raises(SystemExit) as exit_status:
            main([*args, "--url", url])

        assert exit_status.value.code == 1, command
        err = capsys.readouterr().err
        assert f"blipq {command}: {code}: cannot reach the blipq service at {url}: {why}" in err, err
        assert "Traceback" not in err and "ConnectionError" not in err
