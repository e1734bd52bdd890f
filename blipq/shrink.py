"""Shrinking pictures on the client before they are uploaded, without changing a single answer.

A worker feeds its model the pixels `contract.images.decode_for_model` makes of an image: the picture a viewer
sees, resized to the model's input size with its processor's filter. The client makes those very pixels (the same
function, given the size, filter and decode mode the workers publish in GET /v1/models) and uploads them as a PNG. The
worker then decodes that PNG to the same pixels (an RGB picture at the input size, with no orientation, profile or
transparency: each of the viewer's steps and the resize leave it as it is), so every answer is the one the original
file would get, for a fraction of its bytes; and the worker's decode, the costliest step of a camera photo, becomes
a small PNG's.

Shrinking is lossless only while every live worker of the tasks asked resizes the same way, with the same code:
ShrinkTarget.published finds no target (nothing is shrunk) when their sizes, filters, decode modes or Pillow releases
differ, one does not publish them, or their Pillow is not this process's (libjpeg's DCT scaling and the resize filters
are Pillow's, and a release may round differently).

Why PNG, and why these settings (benchmarks/tag_cli.py, docs/performance.md): a camera photo shrunk to BLIP's 384 px
takes 282 kB as PNG with zlib's run-length strategy at level 1, against 442 kB raw (BMP, TIFF) and 270-308 kB for the
other PNG settings and lossless WebP; it encodes in about 13 ms, where zlib's default strategy takes 19-37 ms and
lossless WebP 8-190 ms for no fewer bytes (a photo's sensor noise leaves deflate's string matching little to find:
the PNG filters and Huffman coding do the work). Pillow writes it; its decoders, resize and encoders release the GIL,
so a thread pool shrinks on every core.
"""

from __future__ import annotations

import io
import os
import zlib
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from contract.errors import ImageTooLargeError
from contract.images import decode_for_model

PNG_OPTIONS: dict[str, Any] = {"compress_level": 1, "compress_type": zlib.Z_RLE}  # see the module's docstring
EXACT_DECODE = "exact"  # the decode mode (BLIPQ_IMAGE_DECODE) that decodes every pixel
DECODE_MODES = ("fast", EXACT_DECODE)


@dataclass(frozen=True)
class ShrinkTarget:
    """What the workers feed their model: the input size (width, height), the PIL filter, the decode mode; and the
    service's limits on an image's bytes and pixels, which refuse a picture as the service would refuse the original
    (a shrunk one would pass them)."""

    width: int
    height: int
    resample: int
    exact: bool
    max_pixels: int
    max_bytes: int

    @classmethod
    def published(cls, models: dict[str, Any], tasks: list[str]) -> ShrinkTarget | None:
        """The target every live worker of `tasks` agrees on (GET /v1/models), or None when they differ, one does
        not say, a task has no live worker, or the service does not publish its limits: then nothing can be shrunk
        without changing an answer (or a refusal)."""
        agreed = _agreed_resize(models, tasks)
        limits = models.get("limits") or {}
        max_pixels, max_bytes = limits.get("max_image_pixels"), limits.get("max_image_bytes")
        if agreed is None or not (isinstance(max_pixels, int) and isinstance(max_bytes, int)):
            return None
        width, height, resample, exact = agreed
        return cls(width, height, resample, exact, max_pixels, max_bytes)


def _agreed_resize(models: dict[str, Any], tasks: list[str]) -> tuple[int, int, int, bool] | None:
    """(width, height, PIL filter, exact) that every live worker of `tasks` publishes, with this process's Pillow;
    else None."""
    entries = {entry.get("task"): entry for entry in models.get("models") or ()}
    published = set()
    for task in tasks:
        workers = (entries.get(task) or {}).get("workers") or ()
        if not workers:
            return None
        published |= {
            (worker.get("image_width"), worker.get("image_height"), worker.get("resample"), worker.get("decode"),
             worker.get("pillow"))
            for worker in workers
        }  # fmt: skip
    if len(published) != 1:
        return None
    width, height, resample, decode, pillow = published.pop()
    filters = {member.name.lower(): member.value for member in Image.Resampling}
    sized = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
    if not sized or resample not in filters or decode not in DECODE_MODES or pillow != PIL.__version__:
        return None
    return width, height, filters[resample], decode == EXACT_DECODE


def shrink(data: bytes, target: ShrinkTarget) -> bytes:
    """The PNG of the pixels the workers would feed their model from `data`, or `data` itself when that is no larger.

    Raises contract.errors.ImageInvalidError or ImageTooLargeError, as the service would for the original.
    """
    if len(data) > target.max_bytes:
        limit = target.max_bytes
        raise ImageTooLargeError(
            f"the file is {len(data)} bytes; the service takes at most {limit} (BLIPQ_MAX_IMAGE_BYTES)"
        )
    pixels = decode_for_model(data, (target.width, target.height), target.resample, target.max_pixels, target.exact)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **PNG_OPTIONS)
    png = buffer.getvalue()
    return png if len(png) < len(data) else data


def shrink_file(path: str | Path, target: ShrinkTarget) -> bytes:
    """`shrink` of a local file's bytes (OSError naming the file when it cannot be read)."""
    return shrink(Path(path).read_bytes(), target)


def shrink_pool() -> Executor:
    """Threads that shrink pictures, one per core this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=cores, thread_name_prefix="blipq-shrink")
