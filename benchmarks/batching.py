"""Batching on the real architecture: BLIP-base (random weights) at batch 1, 4 and 16 on the CPU, service vs bare loop.

    python -m benchmarks.batching [--batch-sizes 1,4,16] [--answers 4] [--rounds 3] [--max-new-tokens 5] [--smoke]

The model is Salesforce/blip-vqa-base's architecture (`BlipConfig()` defaults, 384 px images, a tokenizer of the real
vocabulary's size) with random weights, built once by benchmarks/blip_base.py into ~/.cache/blipq-bench: the hub
is out of reach here, and the compute does not depend on the weights' values. Random weights never end an answer
early, so every answer runs to --max-new-tokens (5), the same in the service and the bare loop.

For each batch size, in one run on one machine, over the same items (easy-VQA test images, each asked the same 4
questions of 5 to 9 words, image by image; max(--answers, batch) answers per round), --rounds times one after the
other so that a busy spell of this shared machine hits both:
(a) the bare loop in this process: `worker.inference.answer_questions` on decoded images, `batch` answers per call
    (the worker's inference core; an image asked several questions in one call is encoded once);
(b) the service: its own Redis, the API under gunicorn, one worker serving that checkpoint with
    BLIPQ_BATCH_MAX_SIZE=batch (restarted for each batch size), sent the same items as one `POST /v1/batches` with
    the images uploaded, waited for (summary read every 0.1 s) and its results read back.
Both use --torch-threads (2). Prints answers/s of both over all rounds, service / bare over all rounds and the
median of the rounds' ratios (goal >= 0.9), and how many answers differ. BLIP-base does 1-3 answers/s on two cores,
so the counts are small (12 answers per point and side at batch 1 and 4, 48 at 16): a run takes about 3-4 minutes
on this machine. `--smoke`: batch 2, one round, 2 tokens, on blip_base.py's narrow variant: seconds.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.blip_base import CACHE_DIR, QUESTIONS, SMALL_CACHE_DIR, build_blip_base
from benchmarks.fleet import Fleet, easy_vqa_image_paths, run_batch, wait_until_serving

QUESTIONS_PER_IMAGE = 4  # a tagging batch's shape: every question asked of every image


def bare_loop(
    loaded: Any, items: list[tuple[Any, str]], batch_size: int, max_new_tokens: int
) -> tuple[float, list[str]]:
    """Wall seconds of the inference core answering `items`, `batch_size` per call, and its answers."""
    from worker.inference import answer_questions

    answers: list[str] = []
    started = time.perf_counter()
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        images, questions = [image for image, _ in batch], [question for _, question in batch]
        answers += answer_questions(loaded, images, questions, max_new_tokens)
    return time.perf_counter() - started, answers


def measure_point(
    fleet: Fleet, loaded: Any, photos: list[tuple[Path, Any]], batch_size: int, args: argparse.Namespace
) -> tuple[int, int, float, float, list[float], int]:
    """Bare loop then service, --rounds times, at one batch size (the worker already started with it).

    Returns (batch size, answers per side, bare answers/s, service answers/s, each round's ratio, answers differing).
    """
    questions = list(QUESTIONS[:QUESTIONS_PER_IMAGE])
    count = -(-max(args.answers, batch_size) // QUESTIONS_PER_IMAGE)  # images per round
    paths = [path for path, _ in photos[:count]]
    items = [(image, question) for _, image in photos[:count] for question in questions]  # image by image
    run_batch(fleet.base, paths[:1], questions[:1])  # warm-up of the service's batch path
    bare_loop(loaded, items[:1], 1, args.max_new_tokens)  # warm-up of this process
    bare_s = service_s = 0.0
    ratios, differing = [], 0
    for _ in range(args.rounds):  # alternated, so that a busy spell of the machine hits both
        seconds, bare_answers = bare_loop(loaded, items, batch_size, args.max_new_tokens)
        bare_s += seconds
        served_s, results = run_batch(fleet.base, paths, questions)
        service_s += served_s
        ratios.append(seconds / served_s)
        differing += sum(result.get("answer") != answer for result, answer in zip(results, bare_answers, strict=True))
    answers = len(items) * args.rounds
    print(f"batch {batch_size}: bare {answers / bare_s:.2f}, service {answers / service_s:.2f} answers/s", flush=True)
    return batch_size, answers, answers / bare_s, answers / service_s, ratios, differing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated (default 1,4,16)")
    parser.add_argument("--answers", type=int, default=4, help="answers per round, at least the batch (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="bare then service, this many times (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=5, help="in the bare loop and the worker (default 5)")
    parser.add_argument("--torch-threads", type=int, default=2, help="in this process and the worker (default 2)")
    parser.add_argument("--model-dir", type=Path, help=f"where the BLIP-base checkpoint is kept (default {CACHE_DIR})")
    parser.add_argument("--smoke", action="store_true", help="batch 2, one round, 2 tokens, the narrow model")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.answers, args.rounds, args.max_new_tokens, args.torch_threads = "2", 2, 1, 2, 1
    args.model_dir = args.model_dir or (SMALL_CACHE_DIR if args.smoke else CACHE_DIR)
    return args


def main() -> int:
    args = parse_args()
    import torch
    from PIL import Image

    from worker.inference import load_model

    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    torch.set_num_threads(args.torch_threads)
    model_dir = str(build_blip_base(args.model_dir, small=args.smoke))
    image_count = -(-max(args.answers, *batch_sizes) // QUESTIONS_PER_IMAGE)
    paths = easy_vqa_image_paths(image_count)
    images = [Image.open(path).convert("RGB") for path in paths]
    loaded = load_model(model_dir, device="cpu", dtype="float32")

    env = {
        "BLIPQ_MODEL": model_dir,
        "BLIPQ_DEVICE": "cpu",
        "BLIPQ_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "BLIPQ_TORCH_THREADS": str(args.torch_threads),
        "BLIPQ_METRICS_PORT": "0",  # other services may hold the default port on this machine
    }
    rows = []
    fleet = Fleet(1, time_limit_s=900, env={**env, "BLIPQ_BATCH_MAX_SIZE": str(batch_sizes[0])})
    try:
        for index, batch_size in enumerate(batch_sizes):
            if index:  # the worker reads its batch size when it starts
                fleet.env["BLIPQ_BATCH_MAX_SIZE"] = str(batch_size)
                fleet.restart_worker(fleet.workers[0], signal.SIGTERM)
            wait_until_serving(fleet, (paths[0].read_bytes(), QUESTIONS[0], ""))  # and its model loaded
            rows.append(measure_point(fleet, loaded, list(zip(paths, images, strict=True)), batch_size, args))
    finally:
        fleet.stop()

    model = "BLIP-base's narrow variant" if args.smoke else "BLIP-base architecture"
    print(
        f"{model} (random weights), CPU float32, {args.torch_threads} torch threads, max_new_tokens"
        f" {args.max_new_tokens}, {QUESTIONS_PER_IMAGE} questions per image, one worker, this machine"
    )
    print("batch  answers  bare answers/s  service answers/s  service/bare  median of rounds (goal >= 0.9)  differing")
    for batch_size, count, bare, service, ratios, differing in rows:
        figures = f"{bare:14.2f}  {service:17.2f}  {service / bare:12.2f}  {statistics.median(ratios):30.2f}"
        print(f"{batch_size:5d}  {count:7d}  {figures}  {differing:9d}")
        print(f"       rounds: {' '.join(f'{ratio:.2f}' for ratio in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
