"""The shipped demo captioning model, served by a real caption worker, captions pictures it never saw in training:
with no prompt ("a red circle") and continuing a prompt ("a picture of a red circle")."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from blipq.up_redis import RedisProcess, stop_process
from demo_model import synth
from demo_model.evaluate_caption import heldout_pictures
from tests.support.service import WorkerProcess, api_client, start_worker, wait_for_job, wait_for_worker_record
from worker.settings import DEMO_MODEL_DIR

CAPTION_MODEL_DIR = DEMO_MODEL_DIR.parent / "blip-caption-easy"
EXAMPLES = DEMO_MODEL_DIR.parent / "examples"
SAMPLE_SIZE = 40  # held-out pictures (evaluate_caption.py's held-out seed), half of them captioned after a prompt
MIN_MATCH = 0.9  # colour and shape words right; evaluate_caption.py measures 0.99+ on 2,000 such pictures
PROMPT = "a picture of"


@pytest.fixture(scope="module")
def caption_worker(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A caption worker serving the checkpoint the repository ships, its model loaded."""
    log_path = tmp_path_factory.mktemp("logs") / "demo-caption.log"
    worker = start_worker(redis_server.url, CAPTION_MODEL_DIR, "demo-caption", log_path, BLIPQ_TASK="caption")
    wait_for_worker_record(redis_server.url, worker.queue, 1, worker)
    yield worker
    stop_process(worker.process)


@pytest.fixture
def caption_api(redis_server: RedisProcess, caption_worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    """The API with caption jobs routed to the demo caption worker's queue (no VQA worker is needed here)."""
    return api_client(redis_server.url, f"{caption_worker.queue}-vqa", caption_queue=caption_worker.queue)


def submit_caption(client: FlaskClient, image: bytes, prompt: str = "") -> str:
    """Upload an image as a caption job (multipart), with the prompt when there is one; returns the job's id."""
    form = {"task": "caption", "image": (io.BytesIO(image), "image.png", "image/png")}
    if prompt:
        form["prompt"] = prompt
    response = client.post("/v1/jobs", data=form, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def caption(client: FlaskClient, worker: WorkerProcess, image: bytes, prompt: str = "") -> str:
    job = wait_for_job(client, submit_caption(client, image, prompt), worker)
    assert job["status"] == "succeeded", job
    assert job["task"] == "caption"
    return str(job["answer"])


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("red-circle.png", "a red circle"),
        ("blue-triangle.png", "a blue triangle"),
        ("green-rectangle.png", "a green rectangle"),
    ],
)
def test_the_shipped_examples_are_captioned(
    caption_api: FlaskClient, caption_worker: WorkerProcess, example: str, expected: str
) -> None:
    image = (EXAMPLES / example).read_bytes()

    assert caption(caption_api, caption_worker, image) == expected
    assert caption(caption_api, caption_worker, image, PROMPT) == f"{PROMPT} {expected}"


def test_held_out_pictures_are_captioned_with_and_without_a_prompt(
    caption_api: FlaskClient, caption_worker: WorkerProcess
) -> None:
    # Given: pictures drawn with the held-out seed (never trained on), every other one with a trained prompt.
    pictures = heldout_pictures(SAMPLE_SIZE)
    prompts = ["" if i % 2 == 0 else synth.CAPTION_PROMPTS[i // 2 % 3] for i in range(SAMPLE_SIZE)]
    uploads = []
    for image, _, _ in pictures:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uploads.append(buffer.getvalue())

    # When: each is uploaded as a caption job...
    job_ids = [submit_caption(caption_api, data, prompt) for data, prompt in zip(uploads, prompts, strict=True)]
    jobs = [wait_for_job(caption_api, job_id, caption_worker) for job_id in job_ids]

    # ...then: every job succeeds, a prompted caption continues its prompt, and colour and shape are right.
    assert [job["status"] for job in jobs] == ["succeeded"] * SAMPLE_SIZE, jobs
    captions = [str(job["answer"]) for job in jobs]
    for text, prompt in zip(captions, prompts, strict=True):
        assert text.split()[: len(prompt.split()) + 1] == [*prompt.split(), "a"], (text, prompt)
    matched = [
        synth.caption_words_match(text, shape, colour)
        for text, (_, shape, colour) in zip(captions, pictures, strict=True)
    ]
    exact = [
        text == synth.make_caption(shape, colour, prompt)
        for text, (_, shape, colour), prompt in zip(captions, pictures, prompts, strict=True)
    ]
    match_rate, exact_rate = sum(matched) / SAMPLE_SIZE, sum(exact) / SAMPLE_SIZE
    print(f"demo captioner through the service: colour+shape {match_rate:.3f}, exact {exact_rate:.3f}")
    for half, name in ((slice(0, None, 2), "no prompt"), (slice(1, None, 2), "a prompt")):
        assert sum(matched[half]) / len(matched[half]) >= MIN_MATCH, (name, list(zip(captions, prompts, strict=True)))
    assert exact_rate >= MIN_MATCH, list(zip(captions, prompts, strict=True))


def test_the_checkpoint_is_a_standard_captioning_checkpoint() -> None:
    from transformers import BlipConfig

    config = BlipConfig.from_pretrained(CAPTION_MODEL_DIR)
    assert config.architectures == ["BlipForConditionalGeneration"]
    assert (CAPTION_MODEL_DIR / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in Path(CAPTION_MODEL_DIR).iterdir()) < 10 * 1024 * 1024
