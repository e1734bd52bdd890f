"""Tagging: one 5,000-answer batch (images x questions) through the real service, side by side with its baselines.

    python -m benchmarks.tagging [--images 500] [--questions 10] [--via upload|url] [--batch-size 32] [--photos 500]
        [--out FILE] [--smoke]

In one run on one machine, over the same easy-VQA test images and questions, with the shipped demo model and the
same number of torch threads everywhere (--torch-threads):
(1) the service: its own Redis, the API under gunicorn and one worker (BLIPQ_BATCH_MAX_SIZE=--batch-size), sent every
    question about every image as one `POST /v1/batches` (the images uploaded in the request with the Python client's
    `submit_batch`, or, with --via url, as URLs the worker fetches from a local HTTP server), its summary read every
    0.1 s until every item ended, and its results read back; timed from the submission to the last result line;
(2) the bare loop the model card suggests, in this process: `processor(images=..., text=..., padding=True)` and
    `model.generate` on batches of --batch-size items, the images already decoded (the goal: service >= 0.8 x this);
(3) the inference core in this process (`worker.inference.answer_questions`, the same batches): what the worker
    itself runs, for reference;
(4) what a user would write instead, the model card's loop: `processor(image, question)` and `generate` for
    each image and question, one at a time;
(5) a bare Celery no-op round trip, one task per item (`delay` + `get` from 16 threads, blipq's Celery configuration,
    the same Redis, --noop-tasks of them), as benchmarks/single_jobs.py runs it.
Prints answers/s, the ratios of the service to each, and how many of the service's answers differ from the one-at-a-time
loop's (the reference: no padding) and from the bare batched loop's; the service must change none.
(6) photos, on a service of their own (the same settings): --photos of --photo-mix (benchmarks/photos.py: camera
    JPEGs unless told) x 10
    questions (the same 5,000 answers with the default 500) and x 1, uploaded and by URL, each against the feed limit
    of the same bytes at the demo model's 64 px (benchmarks/feed.py), with the CPU per image of each process and, where
    the worker exports it, of each of its stages (benchmarks/photo_runs.py); --photos 0 leaves them out.
About 3 minutes on a 2-core machine: 1.5 for the easy-VQA runs (most of it the one-at-a-time loop), 1.5 for photos.
`--smoke`: 2 images x 2 questions, 4 no-op tasks, 2 photos of the smoke mix: the path end to end in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import feed
from benchmarks.fleet import (
    Fleet,
    easy_vqa_image_paths,
    noop_celery_rate,
    run_batch,
    wait_until_serving,
)
from benchmarks.image_server import ImageServer
from benchmarks.photo_runs import (
    PHOTO_QUESTIONS,
    PhotoRun,
    add_photo_options,
    photo_run,
    photo_service,
    print_photo_runs,
)
from benchmarks.photos import MIXES, describe, photo_set

MAX_NEW_TOKENS = 20  # the worker's default BLIPQ_MAX_NEW_TOKENS, given to every loop here
NOOP_CLIENTS = 16  # threads of the no-op Celery baseline, as in single_jobs.py


def tagging_questions(count: int) -> list[str]:
    """The `count` questions asked most often in easy-VQA's test split: the tags a user would ask of every image."""
    from easy_vqa import get_test_questions

    questions, _, _ = get_test_questions()
    return [question for question, _ in Counter(questions).most_common(count)]


def timed(loop: Callable[[], list[str]]) -> tuple[float, list[str]]:
    """(wall seconds, answers) of one call of `loop`."""
    started = time.perf_counter()
    answers = loop()
    return time.perf_counter() - started, answers


def model_card_batched(processor: Any, model: Any, items: list[tuple[Any, str]], batch_size: int) -> list[str]:
    """The model card's usage on batches: processor with padding, then `generate`, `batch_size` items at a time."""
    import torch

    answers: list[str] = []
    with torch.inference_mode():
        for first in range(0, len(items), batch_size):
            batch = items[first : first + batch_size]
            images, questions = [image for image, _ in batch], [question for _, question in batch]
            inputs = processor(images=images, text=questions, return_tensors="pt", padding=True)
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
            answers += [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]
    return answers


def model_card_one_by_one(processor: Any, model: Any, items: list[tuple[Any, str]]) -> list[str]:
    """The model card's loop: processor and `generate` for one image and one question at a time."""
    import torch

    answers = []
    with torch.inference_mode():
        for image, question in items:
            inputs = processor(image, question, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
            answers.append(processor.decode(output[0], skip_special_tokens=True).strip())
    return answers


def inference_core_batched(loaded: Any, items: list[tuple[Any, str]], batch_size: int) -> list[str]:
    """The worker's inference core on the same batches (an image asked several questions in a batch is encoded once)."""
    from worker.inference import answer_questions

    answers: list[str] = []
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        images, questions = [image for image, _ in batch], [question for _, question in batch]
        answers += answer_questions(loaded, images, questions, MAX_NEW_TOKENS)
    return answers


def mismatches(answers: list[str], reference: list[str]) -> int:
    return sum(answer != expected for answer, expected in zip(answers, reference, strict=True))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="easy-VQA test images (default 500)")
    parser.add_argument("--questions", type=int, default=10, help="questions asked of every image (default 10)")
    parser.add_argument("--via", choices=("upload", "url"), default="upload", help="how the images reach the service")
    parser.add_argument("--batch-size", type=int, default=32, help="answers per generate, everywhere (default 32)")
    parser.add_argument("--torch-threads", type=int, default=1, help="in this process and the worker (default 1)")
    parser.add_argument("--noop-tasks", type=int, default=2000, help="tasks of the no-op Celery baseline")
    add_photo_options(parser, 500, "run 6")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="2 images x 2 questions, 4 no-op tasks, 2 small photos")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.questions, args.noop_tasks, args.photos, args.photo_mix = 2, 2, 4, 2, "smoke"
    return args


def serve_batch(args: argparse.Namespace, paths: list[Path], questions: list[str]) -> tuple[float, list[dict], float]:
    """The service's seconds for the batch and its result lines, then the no-op Celery rate on the same Redis."""
    server = ImageServer(paths[0].parent) if args.via == "url" else None
    env = {
        "BLIPQ_TORCH_THREADS": str(args.torch_threads),
        "BLIPQ_BATCH_MAX_SIZE": str(args.batch_size),
        "BLIPQ_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "BLIPQ_METRICS_PORT": "0",  # other services may hold the default port on this machine
        **(server.fetch_env() if server else {}),
    }
    fleet = Fleet(1, time_limit_s=300, env=env)
    try:
        wait_until_serving(fleet, (paths[0].read_bytes(), questions[0], ""))
        sources = [server.url(path.name) for path in paths] if server else paths
        service_s, results = run_batch(fleet.base, sources, questions)
        noop_rate = noop_celery_rate(fleet, args.noop_tasks, NOOP_CLIENTS)
    finally:
        fleet.stop()
        if server:
            server.stop()
    return service_s, results, noop_rate


def photo_mixes(args: argparse.Namespace) -> list[PhotoRun]:
    """Run 6: camera photos x 10 and x 1 questions, uploaded and by URL, against the feed limit of their bytes."""
    from worker.settings import DEMO_MODEL_DIR

    photos = photo_set(args.photo_mix, args.photos)
    print(f"6 photos: {MIXES[args.photo_mix].title}, {describe(photos)}", flush=True)
    env = {"BLIPQ_TORCH_THREADS": str(args.torch_threads), "BLIPQ_BATCH_MAX_SIZE": str(args.batch_size),
           "BLIPQ_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}  # fmt: skip
    runs = []
    with photo_service(env, photos[0].parent, photos[0]) as service:
        limit = feed.measure(photos, feed.processor_size(DEMO_MODEL_DIR))
        print(limit.describe(), flush=True)
        for count in (len(PHOTO_QUESTIONS), 1):
            for via, sources in (("upload", photos), ("url", service.urls(photos))):
                name = f"6 photos {len(photos)}x{count} {via}"
                runs.append(photo_run(name, service.meter, service.fleet.base, sources, PHOTO_QUESTIONS[:count], limit))
    return runs


def main() -> int:
    args = parse_args()
    import torch
    from PIL import Image
    from transformers import BlipForQuestionAnswering, BlipProcessor

    from worker.inference import load_model
    from worker.settings import DEMO_MODEL_DIR

    torch.set_num_threads(args.torch_threads)
    model_dir = str(DEMO_MODEL_DIR)
    paths = easy_vqa_image_paths(args.images)
    questions = tagging_questions(args.questions)
    images = [Image.open(path).convert("RGB") for path in paths]  # decoded once, before any clock starts
    items = [(image, question) for image in images for question in questions]  # the batch's order: image by image

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForQuestionAnswering.from_pretrained(model_dir).eval()  # as the model card loads it
    loaded = load_model(model_dir, device="cpu", dtype="float32")  # as the worker loads it
    bare_s, bare = timed(lambda: model_card_batched(processor, model, items, args.batch_size))
    core_s, core = timed(lambda: inference_core_batched(loaded, items, args.batch_size))
    single_s, single = timed(lambda: model_card_one_by_one(processor, model, items))
    service_s, results, noop_rate = serve_batch(args, paths, questions)
    photos = photo_mixes(args) if args.photos else []

    service_answers = [result.get("answer") or "" for result in results]
    failed = Counter(result["status"] for result in results if result["status"] != "succeeded")
    service, count = len(items) / service_s, len(items)
    print(
        f"{count} answers ({args.images} easy-VQA images x {args.questions} questions), demo model, images by"
        f" {args.via}, batch {args.batch_size}, {args.torch_threads} torch thread(s), one worker, this machine"
    )
    print(f"service (one batch over HTTP, results read back)    {service:8.1f} answers/s")
    print(f"bare loop, model card batched (processor+generate)  {count / bare_s:8.1f} answers/s")
    print(f"inference core batched, in process                  {count / core_s:8.1f} answers/s")
    print(f"model card loop, one question at a time             {count / single_s:8.1f} answers/s")
    print(f"bare Celery no-op round trip (per item, 16 threads) {noop_rate:8.1f} tasks/s")
    print(f"ratio service / bare batched loop    {service * bare_s / count:6.2f}   (goal >= 0.8)")
    print(f"ratio service / inference core       {service * core_s / count:6.2f}")
    print(f"ratio service / one-at-a-time loop   {service * single_s / count:6.2f}")
    print(f"ratio service / bare Celery no-op    {service / noop_rate:6.2f}")
    print(f"items not succeeded: {sum(failed.values())} {dict(failed) if failed else ''}")
    print(f"answers differing: service vs one-at-a-time loop {mismatches(service_answers, single)} (must be 0),")
    print(
        f"  service vs bare batched {mismatches(service_answers, bare)},"
        f" bare batched vs one-at-a-time {mismatches(bare, single)},"
    )
    print(f"  inference core vs one-at-a-time {mismatches(core, single)}")
    if photos:
        title = MIXES[args.photo_mix].title
        print(f"\n6 photos, {title}, demo model, batch {args.batch_size}, {args.torch_threads} torch thread(s)")
        print_photo_runs(photos)
    if args.out:
        rates = {"service": service, "bare_batched": count / bare_s, "core": count / core_s,
                 "one_at_a_time": count / single_s, "noop_celery": noop_rate}  # fmt: skip
        summary = {"settings": {**vars(args), "out": str(args.out)}, "answers": count, "rates": rates,
                   "photos": [run.as_dict() for run in photos]}  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
