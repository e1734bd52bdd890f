"""Hostile and odd image files, made in memory: bombs, lying headers, truncations, polyglots, animations."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from PIL import Image

import contract.images  # noqa: F401  registers the HEIF plugin, which writes the HEIC files here
from tests.support.images import encode

FRAME_COLORS = ((255, 0, 0), (0, 0, 255), (0, 255, 0))  # frame 0 is red
HTML_PAGE = b"<!doctype html>\n<html><body><h1>Login</h1><form>...</form></body></html>\n"
SVG_IMAGE = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
EPS_IMAGE = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height grey pixels (one row of data follows)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real, complete 1-bit PNG of width x height black pixels: its zeros compress about 1000 to 1."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_text_bomb(inflated_bytes: int = 64 * 1024 * 1024) -> bytes:
    """A small valid PNG carrying a zTXt chunk that inflates to `inflated_bytes` (far over Pillow's text limit)."""
    png = encode(Image.new("RGB", (8, 8), "red"), "PNG")
    compressor = zlib.compressobj(9)
    zeros = b"\x00" * (1024 * 1024)
    text = b"".join(compressor.compress(zeros) for _ in range(inflated_bytes // len(zeros))) + compressor.flush()
    bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + text)
    ihdr_end = 8 + 25  # signature, then the IHDR chunk: text chunks follow it
    return png[:ihdr_end] + bomb + png[ihdr_end:]


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims width x height, holding one 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A small BMP whose info header is patched to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (4, 4), "red"), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of a file."""
    return data[: int(len(data) * keep)]


def noisy(fmt: str, size: tuple[int, int] = (128, 128)) -> bytes:
    """A noise image (it does not compress, so a cut lands in pixel data) in `fmt`."""
    image = Image.effect_noise(size, 64).convert("L" if fmt == "GIF" else "RGB")
    return encode(image, fmt)


def gif_then_html() -> bytes:
    """A GIF signature and screen descriptor followed by an HTML page: a polyglot that is no image."""
    return gif_claiming(10, 10)[:13] + HTML_PAGE


def jpeg_with_zip() -> bytes:
    """A valid JPEG with a zip archive appended (a classic polyglot): decoders stop at the JPEG's end."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.html", HTML_PAGE)
    return encode(Image.new("RGB", (16, 16), (255, 0, 0)), "JPEG", quality=95) + archive.getvalue()


def png_with_trailing_html() -> bytes:
    """A valid PNG followed by an HTML page after its IEND chunk."""
    return encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG") + HTML_PAGE


def html_then_png() -> bytes:
    """An HTML page with a whole PNG after it: a body that only contains an image."""
    return HTML_PAGE + encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG")


def animated(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    """An animation (GIF, WEBP or PNG, that is APNG) of solid frames in FRAME_COLORS, red first."""
    frames = [Image.new("RGB", size, color) for color in FRAME_COLORS]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        options["lossless"] = True
    return encode(frames[0], fmt, **options)


def iso_bmff_claiming(fmt: str, width: int, height: int) -> bytes:
    """A small HEIF or AVIF file whose image spatial extents (its `ispe` boxes) claim width x height."""
    data = bytearray(encode(Image.new("RGB", (64, 64), "red"), fmt))  # 64x64: no cropping box hides the claim
    found = data.find(b"ispe")
    assert found > 0
    while found > 0:
        data[found + 8 : found + 16] = struct.pack(">II", width, height)  # after the type, a version and flags
        found = data.find(b"ispe", found + 4)
    return bytes(data)
