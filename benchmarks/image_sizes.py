"""The bytes of camera originals at 24-40 MP: what BLIPQ_MAX_IMAGE_BYTES must admit for BLIPQ_MAX_IMAGE_PIXELS.

    python -m benchmarks.image_sizes [--qualities 90,92,95,98] [--png] [--smoke]

Makes seeded synthetic photos with the bits per pixel of camera JPEGs (about 2 at quality 90): a low-frequency random
colour field upscaled bicubically, plus a mid-frequency texture upscaled bilinearly, plus Gaussian noise of sigma 6
(sensor noise). Encodes each at 24, 33 and 40 MP with Pillow's JPEG encoder (baseline, its default 4:2:0 chroma
subsampling, as phones and most cameras write) at each quality, and at the highest quality also with 4:2:2 and 4:4:4
(less or no chroma subsampling: some cameras' finest settings); prints each file's size in MB and MiB and its bytes
per pixel, and the largest bytes per pixel of a JPEG. The default byte limit follows from them
(contract/settings.py IMAGE_BYTES_PER_PIXEL). With --png, also the size of the 40 MP photo as a PNG (Pillow's
default compression), which no byte limit sized for JPEGs admits. About 20 s on two cores (ten more with --png);
peak memory about 1 GB. `--smoke`: one 0.3 MP photo at quality 90, and as a PNG.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

# (name, width, height): common sensor sizes, 3:2.
SIZES = (("24 MP", 6000, 4000), ("33 MP", 7008, 4672), ("40 MP", 7744, 5163))
SMOKE_SIZES = (("0.3 MP", 672, 448),)
NOISE_SIGMA = 6.0  # sensor noise, in 8-bit levels: what keeps a photo's JPEG from compressing like a drawing
STRIP_ROWS = 512  # rows of noise made at once, to bound memory


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A camera-like photo: smooth colour areas, a mid-frequency texture and sensor noise, the same for a seed."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC))
    texture = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    mid = np.asarray(Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, STRIP_ROWS):
        rows = slice(top, top + STRIP_ROWS)
        strip = base[rows].astype(np.float32) * 0.75 + mid[rows].astype(np.float32) * 0.25
        strip += rng.standard_normal(strip.shape, dtype=np.float32) * NOISE_SIGMA
        pixels[rows] = np.clip(strip, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encoded_size(image: Image.Image, **options: object) -> int:
    """The bytes of `image` saved with these options."""
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.tell()


def main() -> None:
    """Print the size of each photo at each quality, and the largest bytes per pixel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qualities", default="90,92,95,98", help="JPEG qualities, comma-separated")
    parser.add_argument("--png", action="store_true", help="also the 40 MP photo as a PNG (slow)")
    parser.add_argument("--smoke", action="store_true", help="one 0.3 MP photo at quality 90, and as a PNG")
    args = parser.parse_args()
    qualities = [90] if args.smoke else [int(quality) for quality in args.qualities.split(",")]
    sizes = SMOKE_SIZES if args.smoke else SIZES
    print(f"{'size':>6} {'pixels':>11} {'encoding':>16} {'MB':>7} {'MiB':>7} {'bytes/pixel':>12}")
    most = 0.0
    for seed, (name, width, height) in enumerate(sizes):
        photo = synthetic_photo(width, height, seed)
        pixels = width * height
        encodings = [(f"JPEG q{quality} 4:2:0", {"quality": quality}) for quality in qualities]
        for label, subsampling in (("4:2:2", 1), ("4:4:4", 0)):
            encodings.append((f"JPEG q{qualities[-1]} {label}", {"quality": qualities[-1], "subsampling": subsampling}))
        if (args.png or args.smoke) and name == sizes[-1][0]:
            encodings.append(("PNG", {}))
        for label, options in encodings:
            started = time.perf_counter()
            size = encoded_size(photo, format="PNG" if label == "PNG" else "JPEG", **options)
            per_pixel = size / pixels
            if label != "PNG":
                most = max(most, per_pixel)
            print(
                f"{name:>6} {pixels:>11,} {label:>16} {size / 1e6:>7.1f} {size / 2**20:>7.1f} {per_pixel:>12.3f}"
                f"   ({time.perf_counter() - started:.1f} s)"
            )
    print(f"largest JPEG bytes per pixel: {most:.3f}")


if __name__ == "__main__":
    main()
