"""Hostile image files fail fast with a stable code, never crash the decoder, and never allocate what they claim."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.images import SNIFF_BYTES, decode_for_model, decode_image, sniff_image_format
from tests.support import hostile
from tests.support.images import encode
from worker.settings import WorkerSettings

MAX_PIXELS = WorkerSettings().max_image_pixels  # the worker's default limit
FAST_S = 0.5  # a refusal that decoded nothing is far quicker than this, even on a busy CI machine


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hostile.png_claiming(100_000, 100_000), id="png-100000x100000"),
        pytest.param(hostile.png_claiming(7_000, 7_000), id="png-49MP-under-pillow-limit"),
        pytest.param(hostile.png_claiming(9_500, 9_500), id="png-90MP-pillow-warning"),
        pytest.param(hostile.gif_claiming(65_535, 65_535), id="gif-screen"),
        pytest.param(hostile.jpeg_claiming(65_000, 65_000), id="jpeg-sof"),
        pytest.param(hostile.bmp_claiming(100_000, 100_000), id="bmp"),
        pytest.param(hostile.bmp_claiming(100_000, -100_000), id="bmp-top-down"),
        pytest.param(hostile.iso_bmff_claiming("HEIF", 7_000, 7_000), id="heic-49MP"),
        pytest.param(hostile.iso_bmff_claiming("HEIF", 100_000, 100_000), id="heic-libheif-limit"),
        pytest.param(hostile.iso_bmff_claiming("AVIF", 7_000, 7_000), id="avif-49MP"),
    ],
)
def test_a_tiny_file_claiming_huge_dimensions_fails_before_decoding(data: bytes) -> None:
    assert len(data) < 1_000
    for decode in (lambda: decode_image(data, MAX_PIXELS), lambda: decode_for_model(data, (384, 384), 3, MAX_PIXELS)):
        started = time.monotonic()
        with pytest.raises(ImageTooLargeError):
            decode()
        assert time.monotonic() - started < FAST_S


def test_an_avif_claiming_more_than_libavif_allows_is_invalid() -> None:
    # libavif refuses the header itself (its own dimension limit), before Pillow knows a size.
    with pytest.raises(ImageInvalidError):
        decode_for_model(hostile.iso_bmff_claiming("AVIF", 100_000, 100_000), (384, 384), 3, MAX_PIXELS)


@pytest.mark.parametrize(("side", "kind"), [(10_000, "Pillow's bomb check"), (6_400, "the worker's limit")])
def test_a_real_decompression_bomb_is_refused_before_inflating(side: int, kind: str) -> None:
    bomb = hostile.png_zero_bomb(side, side)  # complete and valid: it would decode, into side*side pixels
    assert len(bomb) < 20_000, kind
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, MAX_PIXELS)
    assert time.monotonic() - started < FAST_S


def test_a_metadata_bomb_is_invalid_without_inflating_it() -> None:
    bomb = hostile.png_with_text_bomb()  # a zTXt chunk that inflates to 64 MiB
    started = time.monotonic()
    with pytest.raises(ImageInvalidError):
        decode_image(bomb, MAX_PIXELS)
    assert time.monotonic() - started < FAST_S


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "HEIF", "AVIF"])
def test_a_truncated_file_is_invalid(fmt: str, keep: float) -> None:
    data = hostile.truncated(hostile.noisy(fmt), keep)
    with pytest.raises(ImageInvalidError):
        decode_image(data, MAX_PIXELS)
    with pytest.raises(ImageInvalidError):
        decode_for_model(data, (384, 384), 3, MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hostile.gif_then_html(), id="gif-header-then-html"),
        pytest.param(hostile.html_then_png(), id="html-then-png"),
        pytest.param(hostile.HTML_PAGE, id="html"),
        pytest.param(hostile.SVG_IMAGE, id="svg"),
        pytest.param(hostile.EPS_IMAGE, id="eps-never-ghostscript"),
        pytest.param(encode(Image.new("RGB", (8, 8)), "PPM"), id="ppm"),
        pytest.param(encode(Image.new("RGB", (8, 8)), "ICO"), id="ico"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, id="png-signature-then-garbage"),
        pytest.param(b"\xff\xd8\xff" + b"\x00" * 64, id="jpeg-signature-then-zeros"),
        pytest.param(b"", id="empty"),
    ],
)
def test_what_is_not_an_allowed_image_is_invalid_and_never_crashes(data: bytes) -> None:
    with pytest.raises(ImageInvalidError):
        decode_image(data, MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hostile.jpeg_with_zip(), id="jpeg-with-zip-appended"),
        pytest.param(hostile.png_with_trailing_html(), id="png-with-html-after-iend"),
    ],
)
def test_a_valid_image_with_trailing_bytes_decodes_to_its_pixels_only(data: bytes) -> None:
    image = decode_image(data, MAX_PIXELS)
    assert image.size == (16, 16)
    red, green, blue = image.getpixel((8, 8))
    assert red > 240 and green < 16 and blue < 16


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_decodes_to_its_first_frame(fmt: str) -> None:
    data = hostile.animated(fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == len(hostile.FRAME_COLORS), "the fixture must animate"

    image = decode_image(data, MAX_PIXELS)

    assert image.mode == "RGB"
    assert image.getpixel((8, 8)) == hostile.FRAME_COLORS[0]


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (encode(Image.new("RGB", (4, 4)), "JPEG"), "JPEG"),
        (encode(Image.new("RGB", (4, 4)), "PNG"), "PNG"),
        (encode(Image.new("RGB", (4, 4)), "WEBP"), "WEBP"),
        (encode(Image.new("P", (4, 4)), "GIF"), "GIF"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "BMP"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), "TIFF"),
        (encode(Image.new("RGB", (4, 4)), "HEIF"), "HEIF"),
        (encode(Image.new("RGB", (4, 4)), "AVIF"), "AVIF"),
        (b"\0\0\0\x18ftypmif1\0\0\0\0mif1heic", "HEIF"),  # the generic brand first, as some phones write it
        (b"\0\0\0\x18ftypmif1\0\0\0\0mif1avif", "AVIF"),
        (b"\0\0\0\x18ftypisom\0\0\0\0isomavc1", None),  # an MP4 video
        (hostile.HTML_PAGE, None),
        (hostile.SVG_IMAGE, None),
        (b"RIFF\0\0\0\0WAVE", None),
    ],
)
def test_the_sniffer_names_each_allowed_format_and_nothing_else(data: bytes, fmt: str | None) -> None:
    assert sniff_image_format(data[:SNIFF_BYTES]) == fmt
