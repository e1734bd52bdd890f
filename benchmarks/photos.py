"""Photo-sized test pictures made in memory, for benchmarks/decoding.py and benchmarks/fidelity.py.

No camera photos ship with the repository, so a "photo" is synthetic: smooth colour fields at two scales plus
sensor-like noise, tuned so that JPEG quality 90 costs about 2 bits per pixel, as a phone's 12 MP JPEG does.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

# Camera sizes, 4:3 (width, height): 1, 2, 5 and 12 MP.
CAMERA_SIZES = {"1MP": (1152, 864), "2MP": (1600, 1200), "5MP": (2592, 1944), "12MP": (4032, 3024)}
QUICK_SIZES = {"0.3MP": (640, 480)}
NOISE = 4.0  # the noise's standard deviation, in levels


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A synthetic RGB photo of `size`: broad colour fields, finer detail, noise."""
    width, height = size
    rng = np.random.default_rng(seed)

    def field(cell: int) -> np.ndarray:
        coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)

    pixels = 0.7 * field(64) + 0.3 * field(8) + rng.normal(0, NOISE, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """An image's bytes in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def medians_ms(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The median wall time of each call, in milliseconds; the calls take turns, so that a machine busy with other
    work slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}
