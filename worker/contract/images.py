"""Recognise and decode images with bounds on pixels and formats. Imports no torch: the API shares it."""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, ImageOps

from worker.contract.errors import ImageInvalidError, ImageTooLargeError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
SNIFF_BYTES = 12  # enough of a file's start to tell every allowed format

# What Pillow's readers for the allowed formats accept as a file's first bytes, as (prefix, format); WebP is RIFF with
# "WEBP" at offset 8, checked apart.
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

# What Pillow's parsers raise on hostile or broken files: any of these is the file's fault, never the worker's.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error)


def sniff_image_format(head: bytes) -> str | None:
    """The allowed format whose signature `head` (a file's first bytes) starts with, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for prefix, fmt in SIGNATURES if head.startswith(prefix)), None)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes lazily (header only) and check the format and pixel count; raises ImageInvalidError.

    A header that claims more than `max_pixels` fails here, before any pixel buffer is allocated, so a file of a few
    hundred bytes that claims 100000x100000 costs nothing.
    """
    if not data:
        raise ImageInvalidError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLargeError("the image has too many pixels") from None
    except DECODE_ERRORS:
        raise ImageInvalidError(f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    if image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"the image is {image.width}x{image.height}; the limit is {max_pixels} pixels")
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully into an RGB image with its EXIF orientation applied; an animation gives frame 0."""
    image = open_image(data, max_pixels)
    try:
        image.load()  # the first frame only; a truncated file fails here, not later in the model
        image = ImageOps.exif_transpose(image) or image
        return image.convert("RGB")
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        raise ImageInvalidError("the image could not be decoded (truncated or corrupt)") from None
