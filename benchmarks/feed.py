"""The machine's feed limit: how many of these pictures its cores can turn into model input, images/s.

    python -m benchmarks.feed [--mix camera] [--count 100] [--size 384] [--processes N] [--smoke]

What every photo benchmark prints beside the service's rate, measured in the same run on the same bytes: the files
read into memory, then decoded as fast as this machine knows how, to the model's input size (the served model's
processor size: 384 px for BLIP-base), on one process per core (`os.cpu_count()`; no GIL, no queue, no network), with
the EXIF orientation applied and the processor's bicubic resize. Two ways, and the faster one is the limit:

- `pillow-draft`: Pillow with `Image.draft`, which has libjpeg scale a JPEG by 1/2, 1/4 or 1/8 while it decodes (DCT
  domain) to the smallest size still at least the target's; other formats decode fully;
- `simplejpeg` (only when it is importable; not a dependency of the project: `pip install simplejpeg`):
  libjpeg-turbo through simplejpeg's `decode_jpeg(min_width=, min_height=)`, the same scaling; a JPEG that is not
  YCbCr, and every other format, goes the Pillow way.

A service whose worker did only this would run at the feed limit: service / feed limit is the share of the machine's
decoding capacity the service turns into answers. `--smoke`: 4 pictures of the smoke mix (0.3 MP).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

WARM_UP_IMAGES = 2  # decoded by each process before the clock starts: imports, first allocations
BLIP_BASE_SIZE = 384
EXIF_ORIENTATION = 0x0112


def processor_size(model_dir: str | Path) -> tuple[int, int]:
    """(width, height) the model's image processor resizes to, from the files `from_pretrained` reads: a
    preprocessor_config.json, or (as transformers 5 saves a processor) processor_config.json's image_processor."""
    directory = Path(model_dir)
    if (directory / "preprocessor_config.json").exists():
        size = json.loads((directory / "preprocessor_config.json").read_text())["size"]
    else:
        size = json.loads((directory / "processor_config.json").read_text())["image_processor"]["size"]
    return int(size["width"]), int(size["height"])


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels, 16-bit gray scaled to 8 bits (Pillow's own convert clips it to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def pillow_draft(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Pillow, a JPEG scaled while it decodes (draft), the orientation applied, resized bicubically to `size`."""
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", size)
    image = ImageOps.exif_transpose(opened) or opened
    return np.asarray(to_rgb(image).resize(size, Image.Resampling.BICUBIC))


def simplejpeg_or_pillow(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """simplejpeg for YCbCr JPEGs (scaled while decoding), the Pillow way for the rest; as pillow_draft otherwise."""
    import simplejpeg

    if not simplejpeg.is_jpeg(data) or simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
        return pillow_draft(data, size)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1])
    image = Image.fromarray(pixels)
    orientation = Image.open(io.BytesIO(data)).getexif().get(EXIF_ORIENTATION, 1)  # the header only
    transpose = ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC))


# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose applies it).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def methods() -> dict[str, Callable[[bytes, tuple[int, int]], np.ndarray]]:
    """The ways of decoding this process can run: Pillow always, simplejpeg when importable."""
    found: dict[str, Callable[[bytes, tuple[int, int]], np.ndarray]] = {"pillow-draft": pillow_draft}
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return found
    found["simplejpeg"] = simplejpeg_or_pillow
    return found


@dataclass(frozen=True, eq=False)  # one measurement is one limit: compared (and hashed) by identity
class FeedLimit:
    """The feed limit of a set of pictures: images/s of each way of decoding, the fastest, and how it was run."""

    images: int
    size: tuple[int, int]
    processes: int
    rates: dict[str, float] = field(default_factory=dict)
    cpus: tuple[int, ...] | None = None
    # CPU seconds each way spent, all processes together: per image, what sharing the cores with others leaves alone.
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return max(self.rates, key=self.rates.__getitem__)

    @property
    def rate(self) -> float:
        return self.rates[self.method]

    @property
    def cpu_ms_per_image(self) -> float:
        """The CPU milliseconds per image of the way that spent the least (on shared cores, rates swing more)."""
        return 1000 * min(self.cpu_s.values()) / self.images

    def describe(self) -> str:
        """One line: the limit, how, and the other ways' rates."""
        ways = ", ".join(
            f"{name} {rate:.1f}/s, {1000 * self.cpu_s[name] / self.images:.1f} ms CPU"
            for name, rate in self.rates.items()
        )
        missing = "" if "simplejpeg" in self.rates else "; simplejpeg not importable"
        where = f" pinned to CPUs {','.join(map(str, self.cpus))}" if self.cpus else ""
        return (
            f"feed limit {self.rate:.1f} images/s ({ways}{missing}), {self.images} images to"
            f" {self.size[0]}x{self.size[1]}, {self.processes} process(es){where}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "method": self.method, "rates": self.rates, "cpu_s": self.cpu_s,
                "cpu_ms_per_image": self.cpu_ms_per_image, "images": self.images,
                "size": list(self.size), "processes": self.processes, "cpus": self.cpus}  # fmt: skip


def decode_share(
    paths: Sequence[Path], size: tuple[int, int], cpus: tuple[int, ...] | None, barrier: Any, out: Any
) -> None:
    """One process: read its share into memory, warm every way up, then for each way wait for the other processes
    and decode the whole share; puts (way, start, end, CPU seconds) for each."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    data = [path.read_bytes() for path in paths]
    for decode in methods().values():
        for item in data[:WARM_UP_IMAGES]:
            decode(item, size)
    for method, decode in methods().items():
        barrier.wait()  # every process starts each way together (the barrier is cyclic)
        started, cpu = time.perf_counter(), time.process_time()  # perf_counter: one clock for every process
        for item in data:
            decode(item, size)
        out.put((method, started, time.perf_counter(), time.process_time() - cpu))


def measure(
    paths: Sequence[Path], size: int | tuple[int, int] = BLIP_BASE_SIZE, processes: int | None = None,
    cpus: Sequence[int] | None = None,
) -> FeedLimit:  # fmt: skip
    """Each way's images/s on `processes` processes (default one per core), each decoding every n-th picture; from
    the first process's start to the last one's end, way by way."""
    target = (size, size) if isinstance(size, int) else size
    count = processes or os.cpu_count() or 1
    pinned = tuple(cpus) if cpus else None
    context = get_context("spawn")  # the caller may hold threads (an image server, torch): no fork
    barrier, out = context.Barrier(count), context.Queue()
    workers = [
        context.Process(target=decode_share, args=(paths[i::count], target, pinned, barrier, out)) for i in range(count)
    ]
    for worker in workers:
        worker.start()
    spans = collect(out, workers, count * len(methods()))
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for method in methods():
        starts, ends, cpus_s = zip(*[span[1:] for span in spans if span[0] == method], strict=True)
        rates[method], cpu[method] = len(paths) / (max(ends) - min(starts)), float(sum(cpus_s))
    return FeedLimit(len(paths), target, count, rates, pinned, cpu)


def collect(out: Any, workers: Sequence[Any], expected: int) -> list[tuple[str, float, float, float]]:
    """`expected` (way, start, end, CPU seconds)s from the processes, failing at once when one of them died instead of
    waiting."""
    spans: list[tuple[str, float, float, float]] = []
    while len(spans) < expected:
        try:
            spans.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers):
                for worker in workers:
                    worker.kill()
                raise RuntimeError("a decoding process of the feed limit died") from None
    for worker in workers:
        worker.join()
    return spans


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.photos import MIXES, describe, photo_set

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", choices=sorted(MIXES), default="camera", help="which pictures (default camera)")
    parser.add_argument("--count", type=int, default=100, help="pictures (default 100)")
    parser.add_argument("--size", type=int, default=BLIP_BASE_SIZE, help="the model's input size (default 384)")
    parser.add_argument("--processes", type=int, help="decoding processes (default: one per core)")
    parser.add_argument("--smoke", action="store_true", help="4 pictures of the smoke mix (0.3 MP)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mix, args.count = "smoke", 4
    paths = photo_set(args.mix, args.count)
    print(f"{MIXES[args.mix].title}: {describe(paths)}")
    print(measure(paths, args.size, args.processes).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
