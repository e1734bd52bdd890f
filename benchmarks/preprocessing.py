"""Preprocessing: the model thread's share of preparing a batch of images, the processor's way and the worker's.

    python -m benchmarks.preprocessing [--images 32] [--repeats 7] [--smoke]

`--images` random 640x480 RGB images, a BLIP-base processor (384 px, bicubic): (1) `BlipImageProcessor` on the
batch (resize, rescale, normalise: what the model card runs, on the thread that calls the model); (2) the worker's
`pixel_tensor` per image (the resize, done by the fetch threads); (3) the worker's `pixel_values` on the resized batch
(rescale and normalise in place: what is left for the model's thread). Prints medians, the ratio (1) / (3) and the
largest difference between the two results. One torch thread. `--smoke`: 2 images, one repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any


def median_s(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="2 images, one repeat")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.repeats = 2, 1

    import numpy as np
    import torch
    from PIL import Image
    from transformers import BlipImageProcessor

    from worker.inference import LoadedModel, pixel_tensor, pixel_values

    torch.set_num_threads(1)
    processor = BlipImageProcessor(size={"height": 384, "width": 384})
    # A LoadedModel without a model: pixel_tensor and pixel_values read only its processor's image settings (through
    # its own properties, so that what they read stays the worker's), its device and its dtype.
    loaded = LoadedModel(
        model=None,  # type: ignore[arg-type]
        processor=SimpleNamespace(image_processor=processor),  # type: ignore[arg-type]
        model_id="",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(args.images)]
    resized = [pixel_tensor(loaded, image) for image in images]

    processor_s = median_s(lambda: processor(images=images, return_tensors="pt"), args.repeats)
    resize_s = median_s(lambda: [pixel_tensor(loaded, image) for image in images], args.repeats)
    normalise_s = median_s(lambda: pixel_values(loaded, resized), args.repeats)
    difference = (processor(images=images, return_tensors="pt")["pixel_values"] - pixel_values(loaded, resized)).abs()

    print(f"{args.images} images of 640x480 to 384x384, median of {args.repeats}, one torch thread")
    print(f"  processor (resize + rescale + normalise), on the model's thread: {processor_s * 1000:8.1f} ms")
    print(f"  worker: resize per image, in the fetch threads:                  {resize_s * 1000:8.1f} ms")
    print(f"  worker: rescale + normalise, on the model's thread:              {normalise_s * 1000:8.1f} ms")
    print(f"  model-thread time, processor / worker: {processor_s / normalise_s:.1f}x")
    print(f"  largest difference in pixel values: {difference.max().item():.2e}")


if __name__ == "__main__":
    main()
