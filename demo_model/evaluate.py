"""Evaluate the demo model on the whole easy-VQA test split (9,673 questions), exact match.

    python demo_model/evaluate.py direct  [--model PATH] [--variant png|jpeg90|up256|all] [--limit N]
    python demo_model/evaluate.py service --url http://127.0.0.1:8000 [--variant ...] [--limit N] [--concurrency 16]

Variants: each test image is first re-encoded as PNG (png), as JPEG quality 90 (jpeg90), or upscaled to 256x256
with PIL bicubic (up256, sent as PNG) before it reaches the processor / the service.
`direct` answers in-process through `worker.inference` (the service's own inference core); `service` submits every
question as a job to a running blipq service (a multipart upload to POST /v1/jobs, then polls GET /v1/jobs/<id>).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from collections import defaultdict

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_MODEL = os.path.join(HERE, "blip-vqa-easy")
VARIANTS = ["png", "jpeg90", "up256"]
SHAPES = {"circle", "rectangle", "triangle"}
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS


def answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


# ---------------------------------------------------------------- data
def load_test(limit: int | None, seed: int = 0):
    """(question, answer, image_id) of the test split, or the first `limit` of a fixed seeded shuffle."""
    from easy_vqa import get_test_image_paths, get_test_questions

    qs, ans, ids = get_test_questions()
    items = list(zip(qs, ans, ids, strict=False))
    if limit:
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        items = [items[i] for i in order[:limit]]
    return items, get_test_image_paths()


def encode_variant(image: str | Image.Image, variant: str) -> tuple[bytes, str]:
    """The bytes a user would send for this variant of an image (a file's path, or a picture), and their type."""
    im = Image.open(image).convert("RGB") if isinstance(image, str) else image
    buf = io.BytesIO()
    if variant == "png":
        im.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    if variant == "jpeg90":
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
    if variant == "up256":
        im.resize((256, 256), resample=Image.BICUBIC).save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise ValueError(variant)


# ---------------------------------------------------------------- reporting
def summarize(variant: str, items, preds, failed: int | None = None, seconds: float | None = None) -> str:
    per = defaultdict(lambda: [0, 0])
    for (_, a, _), p in zip(items, preds, strict=False):
        t = answer_type(a)
        per[t][0] += int(p == a)
        per[t][1] += 1
    n = len(items)
    acc = sum(v[0] for v in per.values()) / max(1, n)
    parts = ", ".join(f"{t} {per[t][0] / max(1, per[t][1]):.4f}" for t in ("yes/no", "shape", "colour"))
    line = f"variant={variant} n={n} accuracy={acc:.4f} ({parts})"
    if failed is not None:
        line += f" failed={failed}"
    if seconds is not None:
        line += f" [{seconds:.0f}s]"
    return line


def confusion(items, preds, top: int = 8) -> str:
    c = defaultdict(int)
    for (_q, a, _), p in zip(items, preds, strict=False):
        if p != a:
            c[(a, p)] += 1
    worst = sorted(c.items(), key=lambda kv: -kv[1])[:top]
    return "  errors (expected->got): " + ", ".join(f"{a}->{p!r} x{n}" for (a, p), n in worst) if worst else ""


# ---------------------------------------------------------------- direct mode
def make_answerer(model_path: str):
    """Returns answer(images, questions) -> answers, through the worker's own inference core."""
    sys.path.insert(0, REPO)
    from worker.inference import answer_questions, load_model

    loaded = load_model(model_path, device="cpu", dtype="float32")
    return lambda images, questions: answer_questions(loaded, images, questions, max_new_tokens=20, num_beams=1)


def run_direct(args, variants):
    import torch

    torch.set_num_threads(args.threads)
    items, paths = load_test(args.limit)
    answer = make_answerer(args.model)
    from contract.images import decode_image  # the worker's own decoder, as for a job

    lines = []
    for v in variants:
        t = time.time()
        cache = {}
        preds = []
        for b in range(0, len(items), args.batch):
            chunk = items[b : b + args.batch]
            imgs = []
            for _, _, i in chunk:
                if i not in cache:
                    cache[i] = decode_image(encode_variant(paths[i], v)[0], MAX_PIXELS)
                imgs.append(cache[i])
            preds += answer(imgs, [q for q, _, _ in chunk])
        line = summarize(v, items, preds, seconds=time.time() - t)
        print(line, flush=True)
        err = confusion(items, preds)
        if err:
            print(err, flush=True)
        lines.append(line)
    return lines


# ---------------------------------------------------------------- service mode
def submit_and_wait(session, url: str, data: bytes, ctype: str, form: dict[str, str], timeout_s: float):
    """Submit one job (an uploaded image and `form`) and poll until it ends: (answer or None, error or None)."""
    import requests

    name = "image" + (".png" if ctype == "image/png" else ".jpg")
    try:
        r = session.post(f"{url}/v1/jobs", files={"image": (name, data, ctype)}, data=form, timeout=60)
    except requests.RequestException as e:
        return None, f"submit: {type(e).__name__}"
    if r.status_code != 202:
        return None, f"submit: HTTP {r.status_code} {r.text[:120]}"
    job_id = r.json()["id"]
    delay, deadline = 0.05, time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
        try:
            g = session.get(f"{url}/v1/jobs/{job_id}", timeout=30)
        except requests.RequestException:
            continue
        if g.status_code != 200:
            continue
        body = g.json()
        if body.get("status") == "succeeded":
            return (body.get("answer") or "").strip(), None
        if body.get("status") in ("failed", "canceled", "expired"):
            err = body.get("error") or {}
            return None, f"{body.get('status')}: {err.get('code')} {err.get('message')}"
    return None, "timeout"


def run_service(args, variants):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    items, paths = load_test(args.limit)
    url = args.url.rstrip("/")
    session_local = __import__("threading").local()

    def session():
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
        return session_local.s

    def one(job):
        """Submit one question, poll until it finishes. Returns (answer or None, error string or None)."""
        q, data, ctype = job
        return submit_and_wait(session(), url, data, ctype, {"question": q}, args.job_timeout)

    lines = []
    for v in variants:
        t = time.time()
        enc = {}
        jobs = []
        for q, _, i in items:
            if i not in enc:
                enc[i] = encode_variant(paths[i], v)
            jobs.append((q, *enc[i]))
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, jobs))
        preds = [a if a is not None else "" for a, _ in results]
        errors = defaultdict(int)
        for _, e in results:
            if e:
                errors[e] += 1
        failed = sum(errors.values())
        line = summarize(v, items, preds, failed=failed, seconds=time.time() - t)
        print(line, flush=True)
        if errors:
            print(
                "  failures: " + ", ".join(f"{e} x{n}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
                flush=True,
            )
        err = confusion(
            [it for it, (a, _) in zip(items, results, strict=False) if a is not None],
            [a for a, _ in results if a is not None],
        )
        if err:
            print(err, flush=True)
        lines.append(line)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["direct", "service"])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (direct mode)")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (service mode)")
    ap.add_argument("--variant", default="all", choices=[*VARIANTS, "all"])
    ap.add_argument("--limit", type=int, default=None, help="first N questions of a fixed seeded sample")
    ap.add_argument("--concurrency", type=int, default=16, help="parallel jobs in flight (service mode)")
    ap.add_argument("--job-timeout", type=float, default=600.0, help="seconds to wait for one job (service mode)")
    ap.add_argument("--batch", type=int, default=512, help="questions per answer call (direct mode)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    variants = VARIANTS if args.variant == "all" else [args.variant]
    if args.mode == "direct":
        run_direct(args, variants)
    else:
        run_service(args, variants)


if __name__ == "__main__":
    main()
