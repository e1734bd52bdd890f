"""Camera-sized pictures for the benchmarks: seeded, the same bytes for the same seed, index and library versions.

    python -m benchmarks.photos DIR [--count 100] [--mix camera|camera-12mp|mixed|smoke] [--seed 0]

People who tag images at volume send photos: 1-12 MP JPEGs from phones and cameras (baseline or progressive, some
stored sideways with an EXIF orientation of 6 or 8), PNGs with transparency, 16-bit scans, WebP, the odd CMYK JPEG.
A picture here is a low-frequency random colour field upscaled bicubically, a quarter of a mid-frequency texture and
Gaussian noise of sigma 6: a JPEG of it at quality 90 takes about 2.1 bits per pixel, as a camera's file does, and
costs what a camera's file costs to decode. Three mixes, shared by every benchmark (MIXES), and a fourth for the
benchmarks' smoke runs:

- `camera`: JPEGs of about 1, 2, 5, 8 and 12 MP (5.6 MP on average), 4:3 and 3:2 alike, quality 75-95, a fifth
  progressive (as web exports write them; phones write baseline), a fifth EXIF-rotated (orientation 6 or 8);
- `camera-12mp`: the same of 12 MP only (4032x3024 and 4272x2848), for what the biggest pictures hold in memory;
- `mixed`: half of them camera JPEGs, and WebP (up to 5 MP), PNGs with alpha (transparent pixels store black, as
  most encoders write them), 16-bit PNGs (gray, and RGB, which Pillow does not write: a short writer here) and
  CMYK JPEGs. Every file stays under the service's default 10 MiB per image;
- `smoke`: camera JPEGs of 0.3 MP (640x480 and 640x426), for `--smoke`: the same code paths in a fraction of the time.

`photo_set(mix, count)` writes a set once into ~/.cache/blipq-bench/photos/ ($XDG_CACHE_HOME/blipq-bench/photos/ where
that is set; generation costs about 0.1 s of CPU per MP: 300 camera photos, about a minute on two cores) and returns
the paths; a larger set extends a smaller one.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from statistics import NormalDist

import numpy as np
import PIL
from PIL import Image

GENERATOR_VERSION = 1  # bump when a file's bytes change for the same seed and index
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blipq-bench" / "photos"
NOISE_SIGMA = 6.0  # a camera's sensor noise after its own processing, in 8-bit levels
COARSE_CELL = 64  # pixels per cell of the colour field: the picture's large shapes
TEXTURE_CELL = 8  # pixels per cell of the texture: edges and detail at the JPEG block's scale
TEXTURE_SHARE = 0.25
# (width, height) of camera sensors, about 1, 2, 5, 8 and 12 MP, in 4:3 and 3:2.
CAMERA_SIZES = (
    (1152, 864), (1224, 816), (1632, 1224), (1728, 1152), (2592, 1944),
    (2736, 1824), (3264, 2448), (3456, 2304), (4032, 3024), (4272, 2848),
)  # fmt: skip
SMOKE_SIZES = ((640, 480), (640, 426))  # the smoke mix's: 4:3 and 3:2, 0.3 MP
WEB_SIZES = CAMERA_SIZES[:6]  # WebP and PNG pictures: what a web page or an export holds, up to 5 MP
SCAN_SIZES = ((1280, 960), (1024, 1024))  # 16-bit scans: about 7 MB of RGB, under the 10 MiB per image
JPEG_QUALITIES = (75, 80, 85, 90, 95)
WEBP_QUALITY = 80  # cwebp's and most exporters' default
SUFFIXES = {"jpeg": ".jpg", "jpeg-cmyk": ".jpg", "webp": ".webp", "png-alpha": ".png", "png16-gray": ".png"}
EXIF_ORIENTATION = 0x0112
# Named 4:3 camera sizes, for the benchmarks that time one size at a time (decoding, fidelity).
NAMED_SIZES = {"1MP": (1152, 864), "2MP": (1600, 1200), "5MP": (2592, 1944), "12MP": (4032, 3024)}
QUICK_SIZES = {"0.3MP": (640, 480)}


@dataclass(frozen=True)
class PhotoSpec:
    """One picture to write: its kind (file format and pixel layout), size, and how it is encoded."""

    kind: str  # jpeg, jpeg-cmyk, webp, png-alpha, png16-gray, png16-rgb
    width: int
    height: int
    quality: int = 90
    progressive: bool = False
    orientation: int = 1  # EXIF: 6 and 8 are stored sideways, as a phone held upright writes them

    @property
    def suffix(self) -> str:
        return SUFFIXES.get(self.kind, ".png")

    @property
    def label(self) -> str:
        """The spec in a file name: kind, size, and what else applies."""
        parts = [self.kind, f"{self.width}x{self.height}"]
        parts += [f"q{self.quality}"] if self.kind in ("jpeg", "jpeg-cmyk", "webp") else []
        parts += ["prog"] if self.progressive else []
        parts += [f"o{self.orientation}"] if self.orientation != 1 else []
        return "-".join(parts)


def camera_jpeg(rng: random.Random, sizes: Sequence[tuple[int, int]] = CAMERA_SIZES) -> PhotoSpec:
    """A phone's or a camera's JPEG."""
    width, height = rng.choice(sizes)
    orientation = rng.choices((1, 6, 8), weights=(80, 15, 5))[0]
    return PhotoSpec("jpeg", width, height, rng.choice(JPEG_QUALITIES), rng.random() < 0.2, orientation)


def camera_jpeg_12mp(rng: random.Random) -> PhotoSpec:
    """A 12 MP camera JPEG."""
    return camera_jpeg(rng, CAMERA_SIZES[-2:])


def smoke_jpeg(rng: random.Random) -> PhotoSpec:
    """A camera JPEG of 0.3 MP."""
    return camera_jpeg(rng, SMOKE_SIZES)


def mixed_format(rng: random.Random) -> PhotoSpec:
    """What a folder of pictures from many sources holds."""
    kind = rng.choices(
        ("jpeg", "webp", "png-alpha", "png16-gray", "png16-rgb", "jpeg-cmyk"), weights=(50, 20, 15, 5, 5, 5)
    )[0]
    if kind == "jpeg":
        return camera_jpeg(rng)
    if kind in ("png16-gray", "png16-rgb"):
        return PhotoSpec(kind, *rng.choice(SCAN_SIZES))
    if kind == "jpeg-cmyk":
        return PhotoSpec(kind, *rng.choice(WEB_SIZES), quality=rng.choice(JPEG_QUALITIES))
    return PhotoSpec(kind, *rng.choice(WEB_SIZES), quality=WEBP_QUALITY)


@dataclass(frozen=True)
class Mix:
    """A named way of drawing pictures, the same for every benchmark."""

    name: str
    title: str
    draw: Callable[[random.Random], PhotoSpec]


MIXES = {
    "camera": Mix("camera", "camera JPEGs", camera_jpeg),
    "camera-12mp": Mix("camera-12mp", "12 MP camera JPEGs", camera_jpeg_12mp),
    "mixed": Mix("mixed", "mixed formats", mixed_format),
    "smoke": Mix("smoke", "0.3 MP camera JPEGs", smoke_jpeg),
}


def spec_for(mix: str, index: int, seed: int = 0) -> PhotoSpec:
    """The spec of picture `index` of a mix: a function of (mix, seed, index) alone, so sets nest."""
    return MIXES[mix].draw(random.Random(f"{mix}:{seed}:{index}"))


@cache
def noise_table() -> np.ndarray:
    """256 Gaussian quantiles of sigma NOISE_SIGMA: one random byte per sample becomes noise, ten times faster than
    drawing normal floats, and JPEG sees no difference."""
    normal = NormalDist(0.0, NOISE_SIGMA)
    return np.array([round(normal.inv_cdf((i + 0.5) / 256)) for i in range(256)], dtype=np.int16)


def photo_pixels(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB picture, (height, width, 3) uint8: colour field, texture and noise."""

    def field(cell: int, resample: Image.Resampling) -> Image.Image:
        cells = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
        return Image.fromarray(cells).resize((width, height), resample)

    base = Image.blend(field(COARSE_CELL, Image.Resampling.BICUBIC), field(TEXTURE_CELL, Image.Resampling.BILINEAR),
                       TEXTURE_SHARE)  # fmt: skip
    noise = noise_table()[np.frombuffer(rng.bytes(width * height * 3), dtype=np.uint8).reshape(height, width, 3)]
    pixels: np.ndarray = np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return pixels


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB picture of `size` (width, height), drawn from `seed`."""
    return Image.fromarray(photo_pixels(size[0], size[1], np.random.default_rng(seed)))


def image_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    """An image's bytes in `fmt`, as Pillow writes them with `options`."""
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def encode(spec: PhotoSpec, seed: int) -> bytes:
    """The file of `spec`, its pixels drawn from `seed`."""
    rng = np.random.default_rng(seed)
    pixels = photo_pixels(spec.width, spec.height, rng)
    out = io.BytesIO()
    if spec.kind == "png16-rgb":
        return png16_rgb(pixels.astype(np.uint16) * 257 + rng.integers(0, 257, pixels.shape, dtype=np.uint16))
    image = Image.fromarray(pixels)
    if spec.kind == "jpeg":
        exif = Image.Exif()
        if spec.orientation != 1:
            exif[EXIF_ORIENTATION] = spec.orientation
        image.save(out, "JPEG", quality=spec.quality, progressive=spec.progressive, exif=exif.tobytes())
    elif spec.kind == "jpeg-cmyk":
        image.convert("CMYK").save(out, "JPEG", quality=spec.quality)
    elif spec.kind == "webp":
        image.save(out, "WEBP", quality=spec.quality)
    elif spec.kind == "png-alpha":
        alpha = np.asarray(cutout_mask(spec.width, spec.height))
        rgba = np.dstack([pixels, alpha])
        # Most encoders store a transparent pixel as black: what a decoder that drops alpha shows.
        rgba[alpha == 0, :3] = 0
        Image.fromarray(rgba, "RGBA").save(out, "PNG")
    elif spec.kind == "png16-gray":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray + rng.integers(0, 257, gray.shape, dtype=np.uint16)).save(out, "PNG")
    else:
        raise ValueError(f"unknown kind {spec.kind}")
    return out.getvalue()


def cutout_mask(width: int, height: int) -> Image.Image:
    """A product shot's alpha: an opaque ellipse over a transparent background, soft at its edge."""
    from PIL import ImageDraw, ImageFilter

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 8, height // 8, width * 7 // 8, height * 7 // 8), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(4))


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of (height, width, 3) uint16 pixels, filter 0 on every row (Pillow writes no 48-bit PNG)."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").view(np.uint8).reshape(height, width * 6)
    scanlines = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, truecolour, no interlace
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines, 6)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def write_photo(directory: Path, mix: str, index: int, seed: int) -> Path:
    """Write picture `index` of a mix into `directory` (atomically: a reader never sees half a file)."""
    spec = spec_for(mix, index, seed)
    path = directory / f"{index:05d}-{spec.label}{spec.suffix}"
    if not path.exists():
        data = encode(spec, seed=hash_seed(mix, index, seed))
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(path)
    return path


def hash_seed(mix: str, index: int, seed: int) -> int:
    """A stable integer for numpy's generator from (mix, seed, index) (Python's hash() of a str is salted)."""
    return zlib.crc32(f"{mix}:{seed}:{index}".encode())


def write_photos(directory: Path, mix: str, count: int, seed: int = 0) -> list[Path]:
    """Pictures 0..count-1 of a mix in `directory`, written where missing, on one process per core."""
    directory.mkdir(parents=True, exist_ok=True)
    found = {int(path.name[:5]): path for path in directory.glob("[0-9]" * 5 + "-*") if path.name[:5].isdigit()}
    missing = [index for index in range(count) if index not in found]
    if missing:
        workers = min(len(missing), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            written = pool.map(write_photo, *zip(*[(directory, mix, i, seed) for i in missing], strict=True))
            found |= dict(zip(missing, written, strict=True))
    return [found[index] for index in range(count)]


def photo_set(mix: str, count: int, seed: int = 0) -> list[Path]:
    """`count` pictures of a mix, kept in the cache between runs (keyed by the generator's and libraries' versions)."""
    versions = f"v{GENERATOR_VERSION}-pillow{PIL.__version__}-numpy{np.__version__}"
    return write_photos(CACHE_DIR / versions / f"{mix}-{seed}", mix, count, seed)


def describe(paths: Sequence[Path]) -> str:
    """One line on a set: count, formats, megapixels and megabytes."""
    kinds = Counter(re.sub(r"^\d+-(.+?)-\d+x\d+.*", r"\1", path.name) for path in paths)
    pixels = [image_pixels(path) for path in paths]
    total = sum(path.stat().st_size for path in paths)
    return (
        f"{len(paths)} pictures ({', '.join(f'{k} {n}' for k, n in kinds.most_common())}), mean"
        f" {np.mean(pixels) / 1e6:.1f} MP, {total / len(paths) / 1e6:.2f} MB each,"
        f" {8 * total / sum(pixels):.2f} bits/pixel, largest {max(p.stat().st_size for p in paths) / 1e6:.2f} MB"
    )


def image_pixels(path: Path) -> int:
    with Image.open(path) as image:
        return image.width * image.height


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="where to write the pictures (created if missing)")
    parser.add_argument("--count", type=int, default=100, help="pictures to write (default 100)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="camera", help="which mix (default camera)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
    args = parser.parse_args(argv)
    paths = write_photos(args.directory, args.mix, args.count, args.seed)
    print(f"{args.directory}: {MIXES[args.mix].title}, {describe(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
