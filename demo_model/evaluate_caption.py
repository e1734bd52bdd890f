"""Evaluate the captioning demo model on held-out pictures it never saw in training, with no prompt and with each
trained prompt.

    python demo_model/evaluate_caption.py direct  [--model PATH] [--set synth|easyvqa|all] [--variant png|...|all]
    python demo_model/evaluate_caption.py service --url http://127.0.0.1:8000 [--set ...] [--variant ...]

Sets:
- synth: N pictures (default 2,000) drawn by synth.py with the held-out seed HELDOUT_SEED (training draws with
  seed 0, image i from its own RNG seeded with seed * 1,000,003 + i: the two never meet), plain (no augmentation);
- easyvqa: the easy-VQA *test* split's images whose shape and colour its questions name (880 of 1,000); training
  uses only the train split.

Variants: each picture reaches the model as PNG (png), as JPEG quality 90 (jpeg90), or upscaled to 256x256 with PIL
bicubic (up256, sent as PNG).

Scores, per prompt: colour+shape (the caption names exactly the right colour word and shape word, and no other) and
exact (the caption is exactly the grammar's: "a red circle", or "a picture of a red circle" after "a picture of").
`direct` captions in-process through `worker.inference` (the service's own inference core: load_model, then the
caption path of answer_questions); `service` submits every caption as a job to a running blipq service whose caption
workers serve this model (a multipart upload to POST /v1/jobs with task=caption, then polls GET /v1/jobs/<id>).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from demo_model import synth
from demo_model.evaluate import encode_variant, submit_and_wait

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_MODEL = os.path.join(HERE, "blip-caption-easy")
HELDOUT_SEED = 20261128  # never used in training
SETS = ["synth", "easyvqa"]
VARIANTS = ["png", "jpeg90", "up256"]
PROMPTS = ["", *synth.CAPTION_PROMPTS]
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS


# ---------------------------------------------------------------- data
def heldout_pictures(n: int, seed: int = HELDOUT_SEED) -> list[tuple[Image.Image, str, str]]:
    """n easy-VQA-style pictures (64x64 RGB) with their (shape, colour), drawn as synth.make_bank draws image i of
    a bank with this seed, without augmentation."""
    pictures = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        shape, colour = synth.random_label(rng)
        pictures.append((synth.draw_image(rng, shape, colour), shape, colour))
    return pictures


def easyvqa_test_pictures() -> list[tuple[Image.Image, str, str]]:
    """The easy-VQA test images whose shape and colour their questions name, with those labels."""
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    per: dict[int, tuple[list[str], list[str]]] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        per.setdefault(i, ([], []))
        per[i][0].append(q)
        per[i][1].append(a)
    pictures = []
    for i in sorted(per):
        shape, colour = synth.label_from_questions(*per[i])
        if shape is not None and colour is not None:
            pictures.append((Image.open(paths[i]).convert("RGB"), shape, colour))
    return pictures


def load_set(name: str, n: int) -> list[tuple[Image.Image, str, str]]:
    return heldout_pictures(n) if name == "synth" else easyvqa_test_pictures()


# ---------------------------------------------------------------- reporting
def summarize(label: str, pictures, prompt: str, captions: list[str | None]) -> str:
    n = len(pictures)
    words = exact = colour_ok = shape_ok = 0
    for (_, shape, colour), caption in zip(pictures, captions, strict=True):
        got = caption or ""
        words += int(synth.caption_words_match(got, shape, colour))
        exact += int(got == synth.make_caption(shape, colour, prompt))
        found = got.split()
        colour_ok += int([w for w in found if w in synth.COLORS] == [colour])
        shape_ok += int([w for w in found if w in synth.SHAPES] == [shape])
    return (
        f"{label} prompt={prompt!r:15s} n={n} colour+shape={words / n:.4f} exact={exact / n:.4f} "
        f"(colour {colour_ok / n:.4f}, shape {shape_ok / n:.4f})"
    )


def errors(pictures, prompt: str, captions: list[str | None], top: int = 6) -> str:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for (_, shape, colour), got in zip(pictures, captions, strict=True):
        expected = synth.make_caption(shape, colour, prompt)
        if got != expected:
            counts[(expected, got or "")] += 1
    worst = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return "  errors (expected->got): " + ", ".join(f"{e!r}->{g!r} x{k}" for (e, g), k in worst) if worst else ""


# ---------------------------------------------------------------- direct mode
def make_captioner(model_path: str):
    """Returns caption(images, prompts) -> captions, through the worker's own inference core."""
    from worker.inference import answer_questions, load_model

    loaded = load_model(model_path, device="cpu", dtype="float32")
    return lambda images, prompts: answer_questions(loaded, images, prompts, max_new_tokens=20, num_beams=1)


def run_direct(args) -> list[str]:
    import torch

    from contract.images import decode_image  # the worker's own decoder, as for a job

    torch.set_num_threads(args.threads)
    caption = make_captioner(args.model)
    lines = []
    for name in args.sets:
        pictures = load_set(name, args.n)
        for variant in args.variants:
            t = time.time()
            images = [decode_image(encode_variant(im, variant)[0], MAX_PIXELS) for im, _, _ in pictures]
            for prompt in args.prompts:
                captions: list[str | None] = []
                for b in range(0, len(images), args.batch):
                    chunk = images[b : b + args.batch]
                    captions += caption(chunk, [prompt] * len(chunk))
                lines.append(report(f"set={name} variant={variant}", pictures, prompt, captions))
            print(f"  [{time.time() - t:.0f}s]", flush=True)
    return lines


def report(label: str, pictures, prompt: str, captions: list[str | None], suffix: str = "") -> str:
    line = summarize(label, pictures, prompt, captions) + suffix
    print(line, flush=True)
    err = errors(pictures, prompt, captions)
    if err:
        print(err, flush=True)
    return line


# ---------------------------------------------------------------- service mode
def run_service(args) -> list[str]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    url = args.url.rstrip("/")
    local = threading.local()

    def one(job: tuple[bytes, str, str]) -> tuple[str | None, str | None]:
        """Submit one caption job, poll until it ends. Returns (caption or None, error or None)."""
        data, ctype, prompt = job
        if not hasattr(local, "session"):
            local.session = requests.Session()
        form = {"task": "caption", **({"prompt": prompt} if prompt else {})}
        return submit_and_wait(local.session, url, data, ctype, form, args.job_timeout)

    lines = []
    for name in args.sets:
        pictures = load_set(name, args.n)
        for variant in args.variants:
            t = time.time()
            encoded = [encode_variant(im, variant) for im, _, _ in pictures]
            for prompt in args.prompts:
                with ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(one, [(data, ctype, prompt) for data, ctype in encoded]))
                failures: dict[str, int] = defaultdict(int)
                for _, e in results:
                    if e:
                        failures[e] += 1
                label = f"set={name} variant={variant}"
                line = report(label, pictures, prompt, [c for c, _ in results], f" failed={sum(failures.values())}")
                if failures:
                    worst = sorted(failures.items(), key=lambda kv: -kv[1])[:5]
                    print("  failures: " + ", ".join(f"{e} x{k}" for e, k in worst), flush=True)
                lines.append(line)
            print(f"  [{time.time() - t:.0f}s]", flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["direct", "service"])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (direct mode)")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (service mode)")
    ap.add_argument("--set", default="all", choices=[*SETS, "all"])
    ap.add_argument("--variant", default="png", choices=[*VARIANTS, "all"])
    ap.add_argument("--n", type=int, default=2000, help="held-out synthetic pictures (set synth)")
    ap.add_argument("--prompt", action="append", help="a prompt to evaluate, repeatable ('' for none; default: all)")
    ap.add_argument("--concurrency", type=int, default=16, help="parallel jobs in flight (service mode)")
    ap.add_argument("--job-timeout", type=float, default=600.0, help="seconds to wait for one job (service mode)")
    ap.add_argument("--batch", type=int, default=512, help="captions per generate call (direct mode)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.sets = SETS if args.set == "all" else [args.set]
    args.variants = VARIANTS if args.variant == "all" else [args.variant]
    args.prompts = PROMPTS if args.prompt is None else args.prompt
    if args.mode == "direct":
        run_direct(args)
    else:
        run_service(args)


if __name__ == "__main__":
    main()
