"""Recognise images, and decode each into the picture a viewer sees, only as far as the model needs. Imports no torch.

The API opens headers only (`open_image`: the format and the pixel count of an upload); the worker decodes, in its
decoder processes (worker/decoders.py), with `decode_for_model`: bytes and a model's input size in, uint8 pixels out,
the picture a viewer sees resized exactly as the model card's processor resizes it (PIL, its filter, its size), in two
halves that the worker times apart (`picture_for_model`, then `resized_for_model`).

The viewer's picture (contract.viewer): EXIF orientation applied; 16-bit and float samples scaled to 8 bits;
embedded ICC profiles (CMYK ones too) converted to sRGB with LittleCMS; transparency composited on white, as the
processor's `convert_to_rgb` does.

Fast mode (the default) decodes only what the model needs. A JPEG is reduced in the DCT domain, by Pillow's `draft`,
to the smallest of libjpeg's 1/2, 1/4, 1/8 scales whose both sides are still at least the model's input (the sides
swapped for an EXIF rotation of 90 degrees); any image still over `REDUCING_GAP` times the input is then box-reduced
by an integer factor (Pillow's `reduce`, the first step of its own `resize(reducing_gap=...)`); then the viewer's
steps, then the processor's resize. Exact mode decodes in full: pixel for pixel what the processor makes of the
viewer's picture. benchmarks/decoding.py and benchmarks/fidelity.py give the figures (docs/performance.md).

Why Pillow's `draft` rather than simplejpeg: both are libjpeg-turbo's DCT scaling, and simplejpeg was 1-4 % faster
on a 12 MP photo, decode only, 2-5 % end to end (benchmarks/decoding.py), while it reads neither EXIF nor ICC nor
CMYK (each would need a second parser) and would be one more compiled dependency. Why the box reduction for other
formats: it gains little where their decoders are the cost, but it puts the viewer's steps (colour management,
compositing) on a fraction of the pixels; pixels move by a fifth of a level on average at 384 px.

HEIC/HEIF comes through pillow-heif (libheif), the maintained Pillow plugin, registered below so that the API's
sniffing sees it too; AVIF through Pillow's own plugin.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import TYPE_CHECKING

import pillow_heif
from PIL import Image, JpegImagePlugin

from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.viewer import EXIF_ORIENTATION, viewers_picture

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# AVIF before HEIF: a file of the generic `mif1` brand is tried as AVIF (Pillow) first, then as HEIF (pillow-heif).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF"
SNIFF_BYTES = 32  # enough of a file's start to tell every allowed format (an ISO-BMFF file's first brands)

# What Pillow's readers for the allowed formats accept as a file's first bytes, as (prefix, format); WebP (RIFF with
# "WEBP" at offset 8) and the ISO-BMFF formats (an `ftyp` box and its brands) are checked apart.
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
# The `ftyp` brands of HEIC/HEIF (what pillow-heif opens) and of AVIF; `mif1`/`msf1` are the generic image and
# sequence brands of both, told apart by the compatible brands that follow.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})

# What Pillow's parsers raise on hostile or broken files: the file's fault, never the worker's; pillow-heif raises
# RuntimeError for libheif's allocation errors, its security limits among them (a header claiming 100000x100000).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, RuntimeError)
LIBHEIF_LIMIT = "Security limit exceeded"  # how libheif's refusals of too large an image begin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An embedded ICC profile may inflate to this much: JPEG's own ceiling (255 APP2 segments of 65,519 bytes). Pillow's
# PNG reader bounds it by its text-chunk limit, 1 MB, which real print profiles pass; text chunks keep that limit.
MAX_ICC_PROFILE_BYTES = 16 * 1024 * 1024
JPEG_DCT_SCALES = (8, 4, 2)  # libjpeg's reductions that Pillow's `draft` asks for, largest first
# Fast mode box-reduces an image still over this many times the model's input (Pillow's `reducing_gap`: from 3 on
# the result is "indistinguishable from fair resampling in most cases").
REDUCING_GAP = 3.0
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the picture by 90 degrees
# Modes whose samples average (Pillow premultiplies alpha as it reduces); other images are resized in full.
REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})

# Thumbnails off: a HEIC's embedded thumbnail may show another picture than the image; depth and auxiliary images
# are never used either.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


def sniff_image_format(head: bytes) -> str | None:
    """The allowed format whose signature `head` (a file's first bytes) starts with, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return _iso_bmff_format(head)
    return next((fmt for prefix, fmt in SIGNATURES if head.startswith(prefix)), None)


def _iso_bmff_format(head: bytes) -> str | None:
    """HEIF or AVIF by an `ftyp` box's major brand, or, for a generic one, by the compatible brands in `head`."""
    major = head[8:12]
    if major in HEIF_BRANDS:
        return "HEIF"
    if major in AVIF_BRANDS:
        return "AVIF"
    if major not in GENERIC_BRANDS:
        return None
    box_end = min(len(head), struct.unpack(">I", head[:4])[0])
    compatible = {head[i : i + 4] for i in range(16, box_end - 3, 4)}
    return "AVIF" if compatible & AVIF_BRANDS else "HEIF"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes lazily (header only) and check the format and pixel count; raises ImageInvalidError.

    A header that claims more than `max_pixels` fails here, before any pixel buffer is allocated, so a file of a few
    hundred bytes that claims 100000x100000 costs nothing.
    """
    if not data:
        raise ImageInvalidError("the image is empty")
    data, profile = _png_without_profile(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLargeError("the image has too many pixels") from None
    except DECODE_ERRORS as error:
        if LIBHEIF_LIMIT in str(error):
            raise ImageTooLargeError("the image has too many pixels") from None
        raise ImageInvalidError(f"not an image in an accepted format ({FORMAT_NAMES})") from None
    if image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"the image is {image.width}x{image.height}; the limit is {max_pixels} pixels")
    if profile is not None:
        image.info["icc_profile"] = profile
    return image


def _png_without_profile(data: bytes) -> tuple[bytes, bytes | None]:
    """A PNG without its iCCP chunk, and the profile it held, inflated within MAX_ICC_PROFILE_BYTES; other files as
    they are. Pillow would refuse a profile over its 1 MB text limit; the chunks before the pixels are walked by their
    lengths, so a text bomb among them is skipped here, and refused by Pillow as before."""
    if not data.startswith(PNG_SIGNATURE):
        return data, None
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length  # length, type, data, CRC
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"iCCP":
            return data[:position] + data[end:], _inflate_profile(data[position + 8 : position + 8 + length])
        position = end
    return data, None


def _inflate_profile(chunk: bytes) -> bytes | None:
    """An iCCP chunk's profile: a name, a NUL, a compression method (0: zlib), the compressed profile."""
    name_end = chunk.find(b"\0")
    if name_end < 0 or chunk[name_end + 1 : name_end + 2] != b"\0":
        raise ImageInvalidError("the image's colour profile chunk is malformed")
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(chunk[name_end + 2 :], MAX_ICC_PROFILE_BYTES)
    except zlib.error:
        return None  # as Pillow does: a profile that does not inflate is ignored, the picture shown without it
    if inflater.unconsumed_tail:
        raise ImageInvalidError(f"the image's colour profile is over {MAX_ICC_PROFILE_BYTES} bytes")
    return profile


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully into the picture a viewer sees (contract.viewer), in RGB; an animation gives
    frame 0."""
    image = open_image(data, max_pixels)
    try:
        image.load()  # the first frame only; a truncated file fails here, not later in the model
        return viewers_picture(image)
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        raise ImageInvalidError("the image could not be decoded (truncated or corrupt)") from None


def decode_for_model(
    data: bytes, size: tuple[int, int], resample: int, max_pixels: int, exact: bool = False
) -> npt.NDArray[np.uint8]:
    """The picture a viewer sees, resized to `size` (width, height) with the PIL filter `resample`, as uint8
    (height, width, 3); decoded only as far as that needs unless `exact`. Raises ImageInvalidError,
    ImageTooLargeError.

    Exact: pixel for pixel what the model card's processor makes of the picture `decode_image` gives.
    """
    return resized_for_model(picture_for_model(data, size, max_pixels, exact), size, resample)


def picture_for_model(data: bytes, size: tuple[int, int], max_pixels: int, exact: bool = False) -> Image.Image:
    """decode_for_model's first half: the picture a viewer sees, in RGB, decoded only as far as resizing it to `size`
    needs unless `exact`. Raises ImageInvalidError, ImageTooLargeError."""
    image = open_image(data, max_pixels)
    try:
        if not exact:
            reduce_jpeg_in_decoder(image, size)
        image.load()
        if not exact:
            image = reduced_for_resize(image, size)  # the full-size one is dropped here
        return viewers_picture(image)
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        raise ImageInvalidError("the image could not be decoded (truncated or corrupt)") from None


def resized_for_model(picture: Image.Image, size: tuple[int, int], resample: int) -> npt.NDArray[np.uint8]:
    """decode_for_model's second half: a picture resized to `size` with the PIL filter `resample`, as uint8
    (height, width, 3)."""
    import numpy as np  # the worker's: the API, which imports this module for `open_image`, never loads numpy

    try:
        resized = picture.resize(size, resample=Image.Resampling(resample))
    except DECODE_ERRORS:
        raise ImageInvalidError("the image could not be decoded (truncated or corrupt)") from None
    return np.array(resized, dtype=np.uint8)


def reduce_jpeg_in_decoder(image: Image.Image, size: tuple[int, int]) -> int:
    """Ask a JPEG not yet loaded to decode at the smallest DCT scale whose both sides are still at least `size` as
    shown (width, height); returns the reduction (1: none, or not a JPEG)."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    width, height = shown_to_stored(image, size)
    scale = jpeg_dct_scale(image.size, (width, height))
    if scale > 1:
        # Pillow's draft picks the largest scale s with both stored sides at least s times the size it is given.
        image.draft(None, (width, height))
    return scale


def jpeg_dct_scale(stored: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) that leaves both sides of `stored` at least `target`'s."""
    return next((s for s in JPEG_DCT_SCALES if stored[0] >= s * target[0] and stored[1] >= s * target[1]), 1)


def shown_to_stored(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """A (width, height) as shown, in the stored pixels' axes: swapped when the EXIF orientation turns the picture."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (size[1], size[0]) if orientation in TRANSPOSED_ORIENTATIONS else size


def reduced_for_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A loaded image box-reduced by the integer factors Pillow's `resize(reducing_gap=REDUCING_GAP)` would use
    first, before the viewer's steps (so that they run on fewer pixels); the image itself when under that."""
    width, height = shown_to_stored(image, size)
    factors = (int(image.width / width / REDUCING_GAP) or 1, int(image.height / height / REDUCING_GAP) or 1)
    if factors == (1, 1) or image.mode not in REDUCIBLE_MODES or "transparency" in image.info:
        return image  # a palette's indices, bits, 16-bit samples or a transparent colour key are not box-averaged
    return image.reduce(factors)
