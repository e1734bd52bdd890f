"""One picture, as a viewer sees it, encoded in every hostile-but-legal way the accepted formats allow.

Each encoding comes with the picture the processor is to be given for it (an RGBA or palette picture where the file
is transparent: the processor composites it on white itself) and whether it is lossless.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

import contract.images  # noqa: F401  registers the HEIF plugin, which writes the HEIC files here
from tests.support import profiles
from tests.support.hostile import png_chunk
from tests.support.images import EXIF_ORIENTATION, ROTATED_90_CW, encode

TRANSPARENT_INDEX = 255  # the palette entry of the transparent pixels


@dataclass(frozen=True)
class Encoding:
    """A file, the picture a viewer sees in it (as the processor is to be given it), and whether it is lossless."""

    data: bytes
    picture: Image.Image
    lossless: bool


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W) gray or (H, W, C) gray-alpha, RGB or RGBA samples (Pillow writes 16-bit gray only)."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def tiff16(samples: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit TIFF of (H, W, 3) RGB samples, one strip."""
    height, width, channels = samples.shape
    pixels = samples.astype("<u2").tobytes()
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or offset
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, channels, 0),  # bits per sample: an offset, filled below
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, 0),  # strip offset, filled below
        (277, 3, 1, channels),
        (278, 3, 1, height),
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),  # chunky
    ]
    directory_end = 8 + 2 + 12 * len(entries) + 4
    bits_offset, pixels_offset = directory_end, directory_end + 2 * channels
    out = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, given in entries:
        value = {258: bits_offset, 273: pixels_offset}.get(tag, given)
        out += (
            struct.pack("<HHII", tag, kind, count, value)
            if kind == 4 or tag == 258
            else struct.pack("<HHIHH", tag, kind, count, value, 0)
        )
    return out + struct.pack("<I", 0) + struct.pack(f"<{channels}H", *[16] * channels) + pixels


def transparent_around(picture: Image.Image) -> Image.Image:
    """The picture as RGBA, its background (the colour of its corner) fully transparent and stored black."""
    rgb = np.asarray(picture.convert("RGB"))
    shape = np.any(rgb != rgb[0, 0], axis=2)
    rgba = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    rgba[shape, :3] = rgb[shape]
    rgba[shape, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def palette_with_transparency(rgba: Image.Image) -> Image.Image:
    """An RGBA picture of binary alpha as a palette picture whose last entry is transparent."""
    indices = np.array(rgba.convert("RGB").quantize(TRANSPARENT_INDEX))
    palette = rgba.convert("RGB").quantize(TRANSPARENT_INDEX).getpalette() or []
    indices[np.asarray(rgba)[:, :, 3] == 0] = TRANSPARENT_INDEX
    image = Image.fromarray(indices, "P")
    image.putpalette([*(palette + [0] * 768)[: 3 * TRANSPARENT_INDEX], 0, 0, 0])  # 256 entries, the last black
    image.info["transparency"] = TRANSPARENT_INDEX
    return image


def encodings(picture: Image.Image) -> dict[str, Encoding]:
    """The RGB `picture` in each way, by name."""
    rgba = transparent_around(picture)
    gray = picture.convert("L")
    gray_alpha = Image.merge("LA", (gray, rgba.getchannel("A")))
    palette = palette_with_transparency(rgba)
    quantized = picture.quantize(256)
    rgb = np.asarray(picture).astype(np.uint16)
    red, green, blue = picture.split()
    inks = [channel.point(lambda value: 255 - value) for channel in (blue, green, red)]  # the traded CMYK's inks
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    return {
        "png-rgba-black-under-transparent": Encoding(encode(rgba, "PNG"), rgba, True),
        "png-palette-trns": Encoding(encode(palette, "PNG", transparency=TRANSPARENT_INDEX), palette, True),
        "png-la": Encoding(encode(gray_alpha, "PNG"), gray_alpha, True),
        "png-16-bit-gray": Encoding(
            encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"), gray, True
        ),
        "png-16-bit-rgb": Encoding(png16(rgb * 257), picture, True),
        "png-16-bit-rgba": Encoding(png16(np.asarray(rgba).astype(np.uint16) * 257), rgba, True),
        "tiff-16-bit-gray": Encoding(
            encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "TIFF"), gray, True
        ),
        "tiff-16-bit-rgb": Encoding(tiff16(rgb * 257), picture, True),
        "png-icc-over-1mb": Encoding(
            encode(picture, "PNG", icc_profile=profiles.padded_srgb(1_200_000)), picture, True
        ),
        "png-icc-traded-primaries": Encoding(
            encode(Image.merge("RGB", (blue, green, red)), "PNG", icc_profile=profiles.swapped_srgb()), picture, False
        ),
        "jpeg-cmyk": Encoding(encode(picture.convert("CMYK"), "JPEG", quality=95), picture, False),
        "jpeg-cmyk-icc": Encoding(
            encode(
                Image.merge("CMYK", (*inks, Image.new("L", picture.size, 0))),
                "JPEG",
                quality=95,
                icc_profile=profiles.swapped_cmyk(),
            ),
            picture,
            False,
        ),
        "jpeg-progressive": Encoding(encode(picture, "JPEG", quality=90, progressive=True), picture, False),
        "jpeg-exif-rotated": Encoding(
            encode(picture.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes()),
            picture,
            False,
        ),
        "webp-alpha": Encoding(encode(rgba, "WEBP", quality=90), rgba, False),
        "gif": Encoding(encode(quantized, "GIF"), quantized, True),
        "bmp": Encoding(encode(picture, "BMP"), picture, True),
        "heic": Encoding(encode(picture, "HEIF", quality=90), picture, False),
        "avif": Encoding(encode(picture, "AVIF", quality=90), picture, False),
        "avif-alpha": Encoding(encode(rgba, "AVIF", quality=90), rgba, False),
    }
