"""Photos decoded on the GPU (nvJPEG, through torchvision) against the worker's CPU path: part (3) of benchmarks/gpu.py.

Camera JPEGs (benchmarks/photos.py, 1-12 MP) to BLIP-base's 384 px input, images/s:

- the CPU path as the worker runs it: `decode_for_model` (fast mode: libjpeg's DCT scaling, the viewer's picture,
  the processor's bicubic resize) in the worker's decoder processes (worker.decoders.DecoderPool), one per core;
- nvJPEG: `torchvision.io.decode_jpeg(..., device="cuda")` on batches of --gpu-decode-batch files, then a bicubic,
  antialiased resize of each on the GPU (`torch.nn.functional.interpolate`), timed to the last kernel's end. It
  decodes every pixel (no DCT scaling), applies no EXIF orientation, ICC profile or CMYK conversion, and its pixels
  differ from the CPU path's by the mean absolute difference printed.

Runs only where torchvision is importable (it is no dependency of the project: the worker's path is the CPU one);
otherwise the part says it was skipped and why.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SIZE = (384, 384)
BICUBIC = 3  # PIL's, as BLIP's processor resizes
MAX_PIXELS = 40_000_000
GPU_BATCHES = (1, 8, 32, 64)
REPEATS = 3


def decode_figures(device: str, photo_count: int = 64, batches: tuple[int, ...] = GPU_BATCHES) -> dict[str, Any]:
    """The CPU path's and nvJPEG's images/s on the same camera JPEGs, or why nvJPEG was not measured."""
    if importlib.util.find_spec("torchvision") is None:
        return {"skipped": "torchvision is not importable (pip install torchvision, matching torch)"}
    from benchmarks.photos import describe, photo_set

    paths = photo_set("camera", photo_count)
    photos = [path.read_bytes() for path in paths]
    figures: dict[str, Any] = {"photos": describe(paths), "size": list(SIZE)}
    figures["cpu"] = cpu_path(photos)
    print(f"decode, CPU path: {figures['cpu']['images_per_s']:.1f} images/s on {figures['cpu']['processes']} cores")
    figures["nvjpeg"] = nvjpeg_path(photos, device, batches)
    for row in figures["nvjpeg"]["batches"]:
        print(f"decode, nvJPEG batch {row['batch']}: {row['images_per_s']:.1f} images/s")
    return figures


def cpu_path(photos: list[bytes]) -> dict[str, Any]:
    """decode_for_model in the worker's decoder processes, one per core, every photo handed over at once."""
    from worker.decoders import DecoderPool
    from worker.settings import usable_cores
    from worker.stages import StageClock

    cores = usable_cores()
    pool = DecoderPool(cores, StageClock()).start()
    try:
        with ThreadPoolExecutor(4 * cores) as callers:  # the decoders block their callers, as the fetch threads
            list(callers.map(lambda data: pool.decode(data, SIZE, BICUBIC, MAX_PIXELS), photos[:cores]))  # warm
            rates = []
            for _ in range(REPEATS):
                started = time.perf_counter()
                list(callers.map(lambda data: pool.decode(data, SIZE, BICUBIC, MAX_PIXELS), photos))
                rates.append(len(photos) / (time.perf_counter() - started))
    finally:
        pool.close()
    return {"processes": cores, "images_per_s": statistics.median(rates), "runs": rates}


def nvjpeg_path(photos: list[bytes], device: str, batches: tuple[int, ...]) -> dict[str, Any]:
    """torchvision's batched nvJPEG decode and a GPU resize, by batch size; the pixels against the CPU path's."""
    import numpy as np
    import torch
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    from contract.images import decode_for_model

    files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in photos]

    def to_input(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        decoded = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
        return [
            torch.nn.functional.interpolate(image[None].float(), size=SIZE[::-1], mode="bicubic", antialias=True)
            .clamp_(0, 255)
            .round_()
            .to(torch.uint8)[0]
            for image in decoded
        ]

    rows = []
    for batch in batches:
        groups = [files[start : start + batch] for start in range(0, len(files), batch)]
        to_input(groups[0])  # nvJPEG's handles and CUDA kernels made
        torch.cuda.synchronize(device)
        rates = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            for group in groups:
                to_input(group)
            torch.cuda.synchronize(device)
            rates.append(len(files) / (time.perf_counter() - started))
        rows.append({"batch": batch, "images_per_s": statistics.median(rates), "runs": rates})
    # Pixels: nvJPEG's full decode and GPU resize against the CPU path's (which applies EXIF orientation too: the
    # rotated photos are left out of the comparison).
    upright = [n for n, data in enumerate(photos) if not _rotated(data)][:16]
    gpu = to_input([files[n] for n in upright])
    differences = [
        float(
            np.abs(
                image.permute(1, 2, 0).cpu().numpy().astype(np.int16)
                - decode_for_model(photos[n], SIZE, BICUBIC, MAX_PIXELS)
            ).mean()
        )
        for n, image in zip(upright, gpu, strict=True)
    ]
    return {
        "torchvision": torchvision.__version__,
        "batches": rows,
        "mean_abs_difference_vs_cpu_path": statistics.mean(differences) if differences else None,
    }


def _rotated(data: bytes) -> bool:
    """Whether a JPEG's EXIF orientation turns or flips it."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) != 1
