"""`blipq tag` against the real service over HTTP: every (image, question) answered into OUT, failures named, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from api.settings import ApiSettings
from blipq.client import BlipqClient
from blipq.tag import ctrl_c_after
from blipq.up_redis import RedisProcess
from tests.support import hostile
from tests.support.answers import reference_answers
from tests.support.environment import ROOT
from tests.support.fronts import counting_front
from tests.support.images import photo, shape_png
from tests.support.service import QuietHandler, WorkerProcess, http_server, serve_app, wait_for_worker_record

QUESTIONS = ["what color is the shape?", "what shape is in the image?"]
COLORS = ["red", "blue", "green"]


@pytest.fixture
def service_url(redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis) -> Iterator[str]:
    """The API over HTTP, enqueueing on the tiny worker's queue, once that worker is live."""
    wait_for_worker_record(redis_server.url, tiny_worker.queue, 1, tiny_worker)
    yield from serve_app(ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue))


@pytest.fixture
def counting_images() -> Iterator[tuple[str, Counter[str]]]:
    """An image server of its own (base URL) that counts the GETs of each path: one per image a worker fetched."""
    fetches: Counter[str] = Counter()
    routes = {f"/{color}.png": shape_png(color) for color in COLORS}

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            fetches[self.path] += 1
            body = routes.get(self.path)
            self.answer(200, "image/png", body) if body else self.answer(404, "text/plain", b"not found")

    with http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}", fetches


def blipq_tag(service_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "blipq.cli", "tag", *args, "--url", service_url]
    for question in QUESTIONS:
        command += ["-q", question]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def read_out(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(record) == {"image", "question", "status", "answer", "error"} for record in records)
    by_pair = {(record["image"], record["question"]): record for record in records}
    assert len(by_pair) == len(records)  # one line per pair, also after a resume
    return by_pair


def test_tag_answers_every_pair_as_single_jobs_do(
    service_url: str, counting_images: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    base, _ = counting_images
    images = [f"{base}/{color}.png" for color in COLORS]
    urls = tmp_path / "urls.txt"
    urls.write_text("# the test images\n" + "\n".join(images[:2]) + "\n\n" + images[2] + "  # last\n")
    out = tmp_path / "out.jsonl"

    tagged = blipq_tag(service_url, "--urls", str(urls), "-o", str(out), "--per-request", "4")

    assert tagged.returncode == 0, tagged.stderr
    client = BlipqClient(service_url)
    expected = {(image, q): client.ask(image, q, timeout_s=120) for image in images for q in QUESTIONS}
    answered = {pair: record["answer"] for pair, record in read_out(out).items()}
    assert answered == expected
    assert all(record["status"] == "succeeded" for record in read_out(out).values())


def test_tag_names_failures_and_a_rerun_asks_only_the_failed_pairs_again(
    service_url: str, counting_images: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    base, fetches = counting_images
    images = [f"{base}/red.png", f"{base}/missing.png", f"{base}/blue.png"]
    out = tmp_path / "out.jsonl"

    first = blipq_tag(service_url, *images, "-o", str(out))

    assert first.returncode == 1
    assert "image_fetch_failed: 2" in first.stderr, first.stderr  # the one missing image, both its questions
    records = read_out(out)
    assert len(records) == 6
    failed = {pair for pair, record in records.items() if record["status"] != "succeeded"}
    assert failed == {(f"{base}/missing.png", q) for q in QUESTIONS}
    assert {records[pair]["error"]["code"] for pair in failed} == {"image_fetch_failed"}
    succeeded_lines = {pair: record for pair, record in records.items() if pair not in failed}

    fetches.clear()
    second = blipq_tag(service_url, *images, "-o", str(out))

    assert second.returncode == 1 and "image_fetch_failed: 2" in second.stderr, second.stderr
    assert set(fetches) == {"/missing.png"}  # the succeeded images were not sent again
    records = read_out(out)
    assert len(records) == 6
    assert {pair: records[pair] for pair in succeeded_lines} == succeeded_lines


def test_tag_uploads_a_directory_of_local_images(service_url: str, tmp_path: Path) -> None:
    pictures = tmp_path / "pictures"
    (pictures / "nested").mkdir(parents=True)
    paths = [pictures / "red.png", pictures / "nested" / "blue.png", pictures / "nested" / "green.PNG"]
    for path, color in zip(paths, COLORS, strict=True):
        path.write_bytes(shape_png(color))
    (pictures / "notes.txt").write_text("not an image: skipped")
    out = tmp_path / "out.jsonl"

    tagged = blipq_tag(service_url, str(pictures), "-o", str(out), "--per-request", "4")

    assert tagged.returncode == 0, tagged.stderr
    client = BlipqClient(service_url)
    expected = {(str(path), q): client.ask(path, q, timeout_s=120) for path in paths for q in QUESTIONS}
    assert {pair: record["answer"] for pair, record in read_out(out).items()} == expected


SMALL_IMAGE_BYTES = 64 * 1024  # the byte limit of the service below: a file over it is easy to make
SMALL_IMAGE_PIXELS = 100_000  # and its pixel limit


@pytest.fixture
def small_limits_url(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis
) -> Iterator[str]:
    """The API over HTTP, in front of the tiny worker, taking images of at most 64 KiB and 100,000 pixels."""
    wait_for_worker_record(redis_server.url, tiny_worker.queue, 1, tiny_worker)
    settings = ApiSettings(
        redis_url=redis_server.url,
        queue=tiny_worker.queue,
        max_image_bytes=SMALL_IMAGE_BYTES,
        max_image_pixels=SMALL_IMAGE_PIXELS,
    )
    yield from serve_app(settings)


def folder_with_a_broken_and_an_oversized_file(tmp_path: Path) -> dict[str, Path]:
    """A folder of three files: a good picture, a text file named .png, and a picture over the byte limit."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    files = {"good": pictures / "good.png", "broken": pictures / "broken.png", "big": pictures / "big.png"}
    files["good"].write_bytes(shape_png("red"))
    files["broken"].write_text("not a picture, whatever its name says")
    files["big"].write_bytes(shape_png("blue") + b"\0" * SMALL_IMAGE_BYTES)  # a valid PNG, with trailing bytes
    return files


def test_a_broken_and_an_oversized_file_get_their_own_failed_lines_and_a_rerun_keeps_them(
    small_limits_url: str, tmp_path: Path
) -> None:
    # Given a folder with a broken file, an oversized one and a good one
    files = folder_with_a_broken_and_an_oversized_file(tmp_path)
    out = tmp_path / "out.jsonl"
    question = ["-q", QUESTIONS[0]]
    command = [sys.executable, "-m", "blipq.cli", "tag", str(files["good"].parent), *question, "-o", str(out)]

    # When the folder is tagged
    first = run_command([*command, "--url", small_limits_url])

    # Then each file has its line: two failed with their codes and names, one succeeded; the run exits 1
    assert first.returncode == 1, first.stderr
    lines = {Path(record["image"]).stem: record for record in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"good", "broken", "big"} and len(out.read_text().splitlines()) == 3
    assert lines["good"]["status"] == "succeeded" and lines["good"]["answer"]
    assert (lines["broken"]["status"], lines["broken"]["error"]["code"]) == ("failed", "image_invalid")
    assert (lines["big"]["status"], lines["big"]["error"]["code"]) == ("failed", "image_too_large")
    assert "BLIPQ_MAX_IMAGE_BYTES" in lines["big"]["error"]["message"]
    assert all(lines[name]["image"] == str(files[name]) for name in files)
    assert "2 of 3 answers failed" in first.stderr and "image_invalid: 1" in first.stderr, first.stderr

    # When the files are mended and the same command runs again
    files["broken"].write_bytes(shape_png("green"))
    files["big"].write_bytes(shape_png("blue"))
    second = run_command([*command, "--url", small_limits_url])

    # Then the permanent failures are kept as they were, not asked again, and still reported
    assert second.returncode == 1, second.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == list(lines.values())
    assert "kept from an earlier run" in second.stderr, second.stderr


class WithoutLimits(QuietHandler):
    """A front of the API that hides the upload limits of GET /v1/models, as a service that does not publish them
    would, and counts the batch submissions it forwards."""

    target = ""
    submissions: list[int] = []  # noqa: RUF012  (set per test on a subclass)

    def do_GET(self) -> None:
        answer = requests.get(self.target + self.path, headers=self.forwarded(), timeout=30)
        body = answer.content
        if self.path == "/v1/models":
            body = json.dumps({"models": answer.json()["models"]}).encode()
        self.answer(answer.status_code, answer.headers.get("Content-Type", "text/plain"), body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = requests.post(self.target + self.path, data=body, headers=self.forwarded(), timeout=30)
        if self.path == "/v1/batches":
            self.submissions.append(answer.status_code)
        self.answer(answer.status_code, answer.headers.get("Content-Type", "text/plain"), answer.content)

    def do_DELETE(self) -> None:
        answer = requests.delete(self.target + self.path, headers=self.forwarded(), timeout=30)
        self.answer(answer.status_code, answer.headers.get("Content-Type", "text/plain"), answer.content)

    def forwarded(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items() if name.lower() != "host"}


def test_a_file_the_service_refuses_is_taken_out_and_the_rest_sent_again(small_limits_url: str, tmp_path: Path) -> None:
    # Given a service whose limits the client cannot read, and a folder of a good picture, one over the byte limit
    # and one over the pixel limit (both valid images: nothing the client can tell without the limits)
    files = folder_with_a_broken_and_an_oversized_file(tmp_path)
    files.pop("broken").unlink()
    files["pixels"] = files["good"].parent / "pixels.png"
    files["pixels"].write_bytes(hostile.png_zero_bomb(400, 300))  # 120,000 pixels in a few hundred bytes
    out = tmp_path / "out.jsonl"
    front = type("Front", (WithoutLimits,), {"target": small_limits_url, "submissions": []})

    # When the folder is tagged
    with http_server(front) as port:
        tagged = blipq_tag(f"http://127.0.0.1:{port}", str(files["good"].parent), "-o", str(out))

    # Then the service named each refused file, which got its lines, and the rest was sent again without it
    assert tagged.returncode == 1, tagged.stderr
    assert front.submissions == [413, 413, 202], "big.png, then pixels.png refused; good.png accepted"
    records = read_out(out)
    for question in QUESTIONS:
        assert records[str(files["good"]), question]["status"] == "succeeded"
        for name, setting in (("big", "BLIPQ_MAX_IMAGE_BYTES"), ("pixels", "BLIPQ_MAX_IMAGE_PIXELS")):
            error = records[str(files[name]), question]["error"]
            assert error["code"] == "image_too_large" and setting in error["message"], error


def test_a_rerun_asks_a_transient_failure_again_and_keeps_a_permanent_one(service_url: str, tmp_path: Path) -> None:
    # Given two good pictures whose lines in OUT say they failed: one for a transient reason, one for a permanent one
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    lost, refused = pictures / "lost.png", pictures / "refused.png"
    lost.write_bytes(shape_png("red"))
    refused.write_bytes(shape_png("blue"))
    out = tmp_path / "out.jsonl"
    earlier = [
        {"image": str(lost), "question": QUESTIONS[0], "status": "failed", "answer": None,
         "error": {"code": "worker_lost", "message": "the worker died"}},
        {"image": str(refused), "question": QUESTIONS[0], "status": "failed", "answer": None,
         "error": {"code": "image_invalid", "message": "not an image"}},
    ]  # fmt: skip
    out.write_text("".join(json.dumps(record) + "\n" for record in earlier))
    command = [sys.executable, "-m", "blipq.cli", "tag", str(pictures), "-q", QUESTIONS[0], "-o", str(out)]

    # When the same command runs again
    rerun = run_command([*command, "--url", service_url])

    # Then the transient failure was asked again, and the permanent one kept as it was
    assert rerun.returncode == 1, rerun.stderr
    records = {record["image"]: record for record in map(json.loads, out.read_text().splitlines())}
    assert records[str(lost)]["status"] == "succeeded" and records[str(lost)]["answer"]
    assert records[str(refused)] == earlier[1]
    assert "1 of 2 answers failed (image_invalid: 1)" in rerun.stderr, rerun.stderr


def test_a_url_of_another_scheme_gets_its_own_failed_line(
    service_url: str, counting_images: tuple[str, Counter[str]], tmp_path: Path
) -> None:
    base, _ = counting_images
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{base}/red.png\nftp://example.com/x.jpg\ns3://bucket/y.png\n")
    out = tmp_path / "out.jsonl"

    tagged = blipq_tag(service_url, "--urls", str(urls), "-o", str(out))

    assert tagged.returncode == 1, tagged.stderr
    records = read_out(out)
    assert {pair[0] for pair, record in records.items() if record["status"] == "succeeded"} == {f"{base}/red.png"}
    for image in ("ftp://example.com/x.jpg", "s3://bucket/y.png"):
        for question in QUESTIONS:
            assert records[image, question]["error"]["code"] == "image_url_invalid"
    assert "No such file" not in out.read_text()


def test_an_input_of_another_scheme_is_refused_with_what_is_accepted(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "blipq.cli", "tag", "gs://bucket/x.jpg", "-q", "what?", "-o", str(tmp_path / "o")]

    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    assert refused.returncode == 2
    assert "'gs://bucket/x.jpg': only http(s) URLs, files and directories are accepted" in refused.stderr


def blipq_tag_captions(service_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "blipq.cli", "tag", "--caption", *args, "--url", service_url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def test_tag_caption_writes_one_caption_per_image_and_resumes(
    caption_service_url: str, counting_images: tuple[str, Counter[str]], tmp_path: Path, tiny_caption_model_dir: Path
) -> None:
    base, fetches = counting_images
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for color in ("red", "green"):
        (pictures / f"{color}.png").write_bytes(shape_png(color))
    images = [f"{base}/blue.png", str(pictures / "green.png"), str(pictures / "red.png")]  # files in name order
    out = tmp_path / "captions.jsonl"

    tagged = blipq_tag_captions(caption_service_url, images[0], str(pictures), "--prompt", "the", "-o", str(out))

    assert tagged.returncode == 0, tagged.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(record) == {"image", "prompt", "status", "caption", "error"} for record in records)
    expected = reference_answers(
        tiny_caption_model_dir, [(shape_png(color), "the") for color in ("blue", "green", "red")]
    )
    by_image = {record["image"]: record for record in records}
    assert {image: (by_image[image]["prompt"], by_image[image]["caption"]) for image in images} == {
        image: ("the", caption) for image, caption in zip(images, expected, strict=True)
    }
    assert all(record["status"] == "succeeded" for record in records) and len(records) == 3

    fetches.clear()
    again = blipq_tag_captions(caption_service_url, images[0], str(pictures), "--prompt", "the", "-o", str(out))

    assert again.returncode == 0, again.stderr
    assert not fetches, "succeeded captions are not asked again"
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_tag_captions_and_answers_questions_in_one_run_and_resumes_both(
    caption_service_url: str,
    counting_images: tuple[str, Counter[str]],
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_caption_model_dir: Path,
) -> None:
    base, fetches = counting_images
    images = [f"{base}/red.png", f"{base}/blue.png"]
    out = tmp_path / "both.jsonl"
    questions = ["what color is the shape?", "is there a circle?"]
    ask = ["-q", questions[0], "-q", questions[1], "-o", str(out)]

    tagged = blipq_tag_captions(caption_service_url, *images, *ask)

    # One caption line per image and one answer line per (image, question), each as the models give them
    assert tagged.returncode == 0, tagged.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    captions = {record["image"]: record["caption"] for record in records if "prompt" in record}
    answers = {(record["image"], record["question"]): record["answer"] for record in records if "question" in record}
    pictures = [shape_png(color) for color in ("red", "blue")]
    assert captions == dict(
        zip(images, reference_answers(tiny_caption_model_dir, [(p, "") for p in pictures]), strict=True)
    )
    pairs = [(image, question) for image in images for question in questions]
    expected = reference_answers(tiny_model_dir, [(pictures[images.index(i)], q) for i, q in pairs])
    assert answers == dict(zip(pairs, expected, strict=True))
    assert len(records) == 6 and all(record["status"] == "succeeded" for record in records)

    # A re-run asks nothing again, of either kind
    fetches.clear()
    again = blipq_tag_captions(caption_service_url, *images, *ask)
    assert again.returncode == 0, again.stderr
    assert not fetches and [json.loads(line) for line in out.read_text().splitlines()] == records


def photo_folder(tmp_path: Path) -> Path:
    """Pictures many times the test models' input: camera-like JPEGs (two stored sideways), a PNG with an alpha band."""
    pictures = tmp_path / "photos"
    pictures.mkdir()
    (pictures / "red.jpg").write_bytes(photo("red"))
    (pictures / "blue-sideways.jpg").write_bytes(photo("blue", orientation=6))
    (pictures / "green-sideways.jpg").write_bytes(photo("green", (480, 360), orientation=8))
    (pictures / "red-cutout.png").write_bytes(photo("red", (300, 200), fmt="PNG"))
    return pictures


def test_tag_shrinks_pictures_on_the_client_sends_each_once_and_gets_the_originals_answers(
    caption_service_url: str, tmp_path: Path
) -> None:
    # Given a folder of photos, each asked two questions and a caption, tagged with and without shrinking
    pictures = photo_folder(tmp_path)
    asked = ["-q", QUESTIONS[0], "-q", QUESTIONS[1], "--prompt", "the"]
    lines, uploaded = {}, {}
    for how in ("--shrink", "--no-shrink"):
        with counting_front(caption_service_url) as (front, sent):
            out = tmp_path / f"{how}.jsonl"
            tagged = blipq_tag_captions(front, str(pictures), *asked, how, "-o", str(out))
        assert tagged.returncode == 0, tagged.stderr
        lines[how] = {
            (record["image"], record.get("question"), record.get("prompt")): (record["status"], record.get("answer"),
                                                                              record.get("caption"))
            for record in map(json.loads, out.read_text().splitlines())
        }  # fmt: skip
        uploaded[how] = sent.bodies("POST", "/v1/batches")

    # Then every line is the same: shrunk pictures get the answers and captions of the originals
    assert len(lines["--shrink"]) == 4 * 3
    assert lines["--shrink"] == lines["--no-shrink"]
    assert {status for status, _, _ in lines["--shrink"].values()} == {"succeeded"}
    # ...each picture was sent once, for the questions and the captions together, and shrunk into a fraction
    assert len(uploaded["--shrink"]) == len(uploaded["--no-shrink"]) == 1, uploaded
    assert uploaded["--shrink"][0] * 20 < uploaded["--no-shrink"][0], uploaded


def test_tag_needs_questions_or_caption_and_a_prompt_goes_with_caption(
    caption_service_url: str, tmp_path: Path
) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(shape_png("red"))

    command = [sys.executable, "-m", "blipq.cli", "tag", str(picture), "-o", str(tmp_path / "out.jsonl")]
    neither = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    command = [sys.executable, "-m", "blipq.cli", "tag", str(picture), "-q", "what?", "--prompt", "the"]
    command += ["-o", str(tmp_path / "out.jsonl")]
    prompt_alone = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    assert neither.returncode == 2 and "--caption" in neither.stderr, neither.stderr
    assert prompt_alone.returncode == 2 and "--prompt" in prompt_alone.stderr, prompt_alone.stderr
    assert not (tmp_path / "out.jsonl").exists()


class FlakyFront:
    """A real HTTP front for the API that misbehaves as networks and proxies do, and counts what it did.

    It answers with HTTP/1.1 keep-alive, then closes every connection after one answer without saying so (the next
    request a client sends on it meets a closed socket); it answers the first `unavailable` requests with 503; and it
    forwards the first batch submission but drops its answer (the client never learns that the batch was made).
    """

    def __init__(self, target: str, unavailable: int) -> None:
        self.target, self.unavailable = target, unavailable
        self.lost_answers = 0
        self.batches_made: list[str] = []  # the id of every batch the API answered a submission with
        self.deletes = 0
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def do_DELETE(self) -> None:
                front.deletes += 1
                self.forward()

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with front.lock:
                    refuse = front.unavailable > 0
                    front.unavailable -= refuse
                    lose = not refuse and self.path == "/v1/batches" and front.lost_answers == 0
                    front.lost_answers += lose
                if refuse:
                    self.reply(503, b'{"error": {"code": "queue_full", "message": "later"}}', "application/json")
                    return
                headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
                answer = requests.request(
                    self.command, front.target + self.path, data=body, headers=headers, timeout=30
                )
                if self.command == "POST" and self.path == "/v1/batches" and answer.status_code == 202:
                    front.batches_made.append(answer.json()["id"])
                if lose:
                    self.close_connection = True  # the batch was made; its answer never reaches the client
                    return
                self.reply(answer.status_code, answer.content, answer.headers.get("Content-Type", "text/plain"))

            def reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True  # and no "Connection: close": the client finds out on its next request

        return Handler


def test_tag_rides_out_dropped_connections_503s_and_a_lost_answer_without_a_second_batch(
    service_url: str, counting_images: tuple[str, Counter[str]], redis_client: redis.Redis, tmp_path: Path
) -> None:
    base, _ = counting_images
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}/{color}.png\n" for color in COLORS))
    front = FlakyFront(service_url, unavailable=3)
    with http_server(front.handler()) as port:
        out = tmp_path / "out.jsonl"
        tagged = blipq_tag(f"http://127.0.0.1:{port}", "--urls", str(urls), "-o", str(out), "--per-request", "2")

    assert tagged.returncode == 0, tagged.stderr
    assert "Traceback" not in tagged.stderr
    assert front.lost_answers == 1 and front.unavailable == 0, "the front misbehaved as it should"
    assert len(read_out(out)) == len(COLORS) * len(QUESTIONS)
    assert all(record["status"] == "succeeded" for record in read_out(out).values())
    assert len(front.batches_made) == len(COLORS) + 1, "the submission whose answer was lost was sent again"
    assert len(set(front.batches_made)) == len(COLORS), "one batch per request: the retry returned the first batch"
    assert front.deletes == len(COLORS), "each batch was deleted once its lines were written"
    assert list(redis_client.scan_iter("blipq:batch:*")) == []


def test_a_ctrl_c_during_a_submission_is_raised_once_the_submission_is_kept() -> None:
    # Given a block standing for a submission, which receives Ctrl-C halfway
    kept = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_after():
        os.kill(os.getpid(), signal.SIGINT)
        kept.append("batch id")  # runs: the interrupt is held
    # Then the block ended before the interrupt was raised, and Ctrl-C behaves as before afterwards
    assert kept == ["batch id"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_during_a_submission_leaves_at_once() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_after():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the second")
    assert reached == []


def test_ctrl_c_cancels_what_is_in_flight_keeps_what_was_written_and_a_rerun_finishes(
    service_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given a run over slow images, one request of one image at a time, that has written its first lines
    ready = threading.Event()

    class Slow(QuietHandler):
        def do_GET(self) -> None:
            if not self.path.startswith("/fast"):
                ready.wait(60)  # held until Ctrl-C went: the requests in flight cannot end before
            self.answer(200, "image/png", shape_png("red"))

    with http_server(Slow) as port:
        urls = tmp_path / "urls.txt"
        urls.write_text(
            f"http://127.0.0.1:{port}/fast/0.png\n" + "".join(f"http://127.0.0.1:{port}/{n}.png\n" for n in range(6))
        )
        out = tmp_path / "out.jsonl"
        command = [sys.executable, "-m", "blipq.cli", "tag", "--urls", str(urls), "-o", str(out), "--url", service_url]
        command += ["-q", QUESTIONS[0], "--per-request", "1", "--in-flight", "2"]
        run = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (out.exists() and out.read_text().count("\n") >= 1):
                assert run.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            # When the user presses Ctrl-C
            run.send_signal(signal.SIGINT)
            _, stderr = run.communicate(timeout=60)
            left = [key.decode().rpartition(":")[2] for key in redis_client.scan_iter("blipq:batch:*")]
            summaries = [requests.get(f"{service_url}/v1/batches/{batch_id}", timeout=10).json() for batch_id in left]
        finally:
            ready.set()
            run.kill()

        # Then it ends cleanly, keeps the line written, and the requests in flight are canceled
        assert run.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert "interrupted" in stderr and "re-run the same command" in stderr
        assert [record["status"] for record in read_out(out).values()] == ["succeeded"]
        # (the slow one, and the one that took the ended one's place if the Ctrl-C came after it went): nothing is left
        # to run on the service, even once the images it waits for come
        assert any(summary["counts"]["canceled"] for summary in summaries), summaries
        assert all(summary["ended"] == summary["count"] for summary in summaries), summaries

        # And a re-run asks only what is missing, and finishes
        rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert len(read_out(out)) == 7
