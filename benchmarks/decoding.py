"""Decoding photos for the model: what full decodes cost, and what the fast mode saves, side by side.

    python -m benchmarks.decoding [--quick] [--smoke] [--repeats 7] [--size 2MP] [--size 12MP]

Synthetic photos (benchmarks/photos.py) at 2 and 12 MP, median milliseconds of one image in one thread, the
compared calls taking turns: (1) JPEG quality 90, decode only: Pillow in full, Pillow with `draft` at 384 px,
simplejpeg at 384 px (when it is installed: `pip install simplejpeg==1.9.0`; it is not a dependency); (2) JPEG, end
to end to the model's input (bytes in, uint8 pixels out): `decode_for_model` exact and fast at 384 px (BLIP-base) and
at 64 px (the demo models), and simplejpeg's scaled decode plus the same PIL resize (no EXIF, ICC or CMYK: a lower
bound); (3) the same JPEG with a non-sRGB ICC profile against none, fast and exact (the cost of colour management);
(4) the photo as PNG, WebP (quality 90), HEIC and AVIF (quality 80), exact and fast at 384 px (fast: the box
reduction before the resize), and as PNG and HEIC with the non-sRGB profile; (5) eight images decoded fast by two
threads against one (Pillow releases the GIL). `--quick`: a 0.3 MP photo, 2 repeats; `--smoke`, one repeat.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.photos import NAMED_SIZES, QUICK_SIZES, image_bytes, photo
from contract.images import decode_for_model
from tests.support.profiles import swapped_srgb

BICUBIC = int(Image.Resampling.BICUBIC)
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS
BENCH_SIZES = ("2MP", "12MP")
THREADED_IMAGES = 8


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


def to_model(data: bytes, side: int, exact: bool = False) -> Callable[[], Any]:
    """A call of decode_for_model to side x side px, bicubic."""
    return lambda: decode_for_model(data, (side, side), BICUBIC, MAX_PIXELS, exact)


def pillow_decode(data: bytes, draft: tuple[int, int] | None) -> Callable[[], Any]:
    """A call that decodes a JPEG with Pillow, reduced by `draft` when given."""

    def decode() -> None:
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                image.draft(None, draft)
            image.load()

    return decode


def simplejpeg_decode(data: bytes, side: int, resize: bool) -> Callable[[], Any]:
    """A call of simplejpeg's DCT-scaled decode to at least side x side, and then the processor's PIL resize."""
    import simplejpeg

    def decode() -> Any:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=side, min_height=side)
        if resize:
            return np.array(Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC))
        return pixels

    return decode


def print_row(title: str, figures: dict[str, float], ratios: list[tuple[str, str]]) -> None:
    cells = [f"{name} {ms:7.1f}" for name, ms in figures.items()]
    cells += [f"{a} / {b} {figures[a] / figures[b]:.2f}x" for a, b in ratios]
    print(f"    {title:28s} " + " | ".join(cells))


def jpeg_rows(picture: Image.Image, repeats: int, has_simplejpeg: bool) -> bytes:
    """Decode-only, end-to-end and colour-management figures of the picture as a JPEG quality 90; its bytes."""
    data = image_bytes(picture, "JPEG", quality=90)
    calls = {"Pillow full": pillow_decode(data, None), "Pillow draft": pillow_decode(data, (384, 384))}
    ratios = [("Pillow full", "Pillow draft")]
    if has_simplejpeg:
        calls["simplejpeg"] = simplejpeg_decode(data, 384, resize=False)
        ratios.append(("Pillow draft", "simplejpeg"))
    print_row("JPEG decode only (384)", medians_ms(calls, repeats), ratios)
    for side in (384, 64):
        calls = {"exact": to_model(data, side, exact=True), "fast": to_model(data, side)}
        ratios = [("exact", "fast")]
        if has_simplejpeg:
            calls["simplejpeg+resize"] = simplejpeg_decode(data, side, resize=True)
            ratios.append(("fast", "simplejpeg+resize"))
        print_row(f"JPEG to {side} px", medians_ms(calls, repeats), ratios)
    profiled = image_bytes(picture, "JPEG", quality=90, icc_profile=swapped_srgb())
    for exact in (False, True):
        calls = {"no profile": to_model(data, 384, exact), "ICC profile": to_model(profiled, 384, exact)}
        figures = medians_ms(calls, repeats)
        print_row(f"JPEG {'exact' if exact else 'fast'} to 384 px", figures, [("ICC profile", "no profile")])
    return data


def format_rows(picture: Image.Image, repeats: int) -> None:
    """Exact and fast to 384 px of the picture in the other formats."""
    encodings = {
        "PNG": image_bytes(picture, "PNG"),
        "WebP q90": image_bytes(picture, "WEBP", quality=90),
        "HEIC q80": image_bytes(picture, "HEIF", quality=80),
        "AVIF q80": image_bytes(picture, "AVIF", quality=80),
    }
    for name, data in encodings.items():
        figures = medians_ms({"exact": to_model(data, 384, exact=True), "fast": to_model(data, 384)}, repeats)
        print_row(f"{name} to 384 px", figures, [("exact", "fast")])
    for name, fmt, options in (("PNG", "PNG", {}), ("HEIC q80", "HEIF", {"quality": 80})):
        data = image_bytes(picture, fmt, icc_profile=swapped_srgb(), **options)
        figures = medians_ms({"exact": to_model(data, 384, exact=True), "fast": to_model(data, 384)}, repeats)
        print_row(f"{name} + ICC to 384 px", figures, [("exact", "fast")])


def threads_row(data: bytes, repeats: int) -> None:
    """Eight images decoded fast to 384 px, by one thread and by two."""

    def run(threads: int) -> Callable[[], Any]:
        def decode_all() -> None:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _: to_model(data, 384)(), range(THREADED_IMAGES)))

        return decode_all

    figures = medians_ms({"1 thread": run(1), "2 threads": run(2)}, repeats)
    print_row(f"{THREADED_IMAGES} JPEGs fast to 384 px", figures, [("1 thread", "2 threads")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 0.3 MP photo, 2 repeats")
    parser.add_argument("--smoke", action="store_true", help="one 0.3 MP photo, one repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", choices=BENCH_SIZES, action="append", help="only these photo sizes")
    args = parser.parse_args()
    repeats = 1 if args.smoke else 2 if args.quick else args.repeats
    sizes = QUICK_SIZES if args.quick or args.smoke else {name: NAMED_SIZES[name] for name in args.size or BENCH_SIZES}
    has_simplejpeg = importlib.util.find_spec("simplejpeg") is not None
    print(f"median ms of one image (one thread unless said), {repeats} repeats; simplejpeg installed: {has_simplejpeg}")
    for name, size in sizes.items():
        picture = photo(size)
        print(f"{name} photo, {size[0]}x{size[1]}")
        data = jpeg_rows(picture, repeats, has_simplejpeg)
        format_rows(picture, repeats)
        threads_row(data, repeats)


if __name__ == "__main__":
    main()
