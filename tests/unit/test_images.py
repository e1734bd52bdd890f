"""Images are downloaded within bounds and decoded as a viewer sees them, as far as the model needs, or refused with a
stable code."""

from __future__ import annotations

import io
import ipaddress
import math

import numpy as np
import pytest
from PIL import Image
from transformers import BlipImageProcessorPil

from contract.errors import ImageFetchError, ImageInvalidError, ImageTooLargeError
from contract.images import (
    decode_for_model,
    decode_image,
    open_image,
    reduce_jpeg_in_decoder,
    reduced_for_resize,
)
from contract.viewer import upright, viewers_picture
from tests.support import hostile, profiles
from tests.support.encodings import encodings
from tests.support.images import EXIF_ORIENTATION, encode, rotated_jpeg, shape_png, truncated_png
from tests.support.service import ImageServer
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.netguard import NetworkPolicy

LIMITS = FetchLimits(max_bytes=50_000, max_pixels=1_000_000, connect_timeout_s=2, total_timeout_s=5)
# The image server listens on 127.0.0.1 on a free port: both need allowing (tests/service/test_fetch_guard.py says why).
LOCAL = NetworkPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allow_ports=(range(1024, 65536),))
# A picture with a shape, its background plain: what the exact-mode comparisons encode.
PICTURE = Image.open(io.BytesIO(shape_png("red", (300, 200)))).convert("RGB")


def test_exif_orientation_is_applied() -> None:
    image = decode_image(rotated_jpeg(width=40, height=20), LIMITS.max_pixels)
    assert image.size == (20, 40)
    assert image.mode == "RGB"


def test_palette_and_alpha_images_become_rgb() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert decode_image(encode(rgba, "PNG"), LIMITS.max_pixels).mode == "RGB"
    assert decode_image(encode(rgba.convert("P"), "GIF"), LIMITS.max_pixels).mode == "RGB"


def test_truncated_image_is_invalid() -> None:
    with pytest.raises(ImageInvalidError):
        decode_image(truncated_png(), LIMITS.max_pixels)


def test_format_outside_the_allow_list_is_invalid() -> None:
    with pytest.raises(ImageInvalidError):
        decode_image(encode(Image.new("RGB", (8, 8)), "PPM"), LIMITS.max_pixels)


def test_too_many_pixels_fails_before_decoding() -> None:
    huge = encode(Image.new("1", (2000, 1000)), "PNG")  # 2 MP in a few kB
    with pytest.raises(ImageTooLargeError):
        decode_image(huge, max_pixels=1_000_000)


def test_download_over_the_byte_cap_is_refused(image_server: ImageServer) -> None:
    image_server.routes["/big.png"] = (200, "image/png", b"\0" * (LIMITS.max_bytes + 1))
    with pytest.raises(ImageTooLargeError):
        fetch_image_bytes(new_session(LOCAL), image_server.url("/big.png"), LIMITS)


def test_download_of_a_missing_image_fails(image_server: ImageServer) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetch_image_bytes(new_session(LOCAL), image_server.url("/nowhere.png"), LIMITS)


def test_download_returns_the_served_bytes(image_server: ImageServer) -> None:
    image_server.routes["/ok.png"] = (200, "image/png", shape_png("teal"))
    assert fetch_image_bytes(new_session(LOCAL), image_server.url("/ok.png"), LIMITS) == shape_png("teal")


def jpeg_of(stored: tuple[int, int], orientation: int = 1) -> bytes:
    """A JPEG whose stored pixels are `stored` (width, height), tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.new("RGB", stored, "teal"), "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize(
    ("stored", "orientation", "shown_target", "scale"),
    [
        ((4032, 3024), 1, (384, 384), 4),  # 1/8 would be 504x378: under 384
        ((3072, 3072), 1, (384, 384), 8),  # exactly 8 times: 1/8 is 384x384
        ((3071, 3072), 1, (384, 384), 4),  # one pixel short of that
        ((1600, 1200), 1, (384, 384), 2),
        ((800, 600), 1, (384, 384), 1),  # 1/2 would be 400x300
        ((4032, 3024), 1, (64, 64), 8),
        ((4096, 2048), 6, (256, 512), 8),  # shown 2048x4096: the target's sides swap into the stored axes
        ((4096, 2048), 1, (256, 512), 4),  # the same pixels unrotated: the height limits
        ((2048, 4096), 8, (512, 256), 8),
    ],
)
def test_a_jpeg_is_decoded_at_the_smallest_dct_scale_that_still_covers_the_models_input(
    stored: tuple[int, int], orientation: int, shown_target: tuple[int, int], scale: int
) -> None:
    image = open_image(jpeg_of(stored, orientation), max_pixels=50_000_000)

    assert reduce_jpeg_in_decoder(image, shown_target) == scale
    image.load()

    assert image.size == (math.ceil(stored[0] / scale), math.ceil(stored[1] / scale))
    shown = upright(image).size
    assert shown[0] >= shown_target[0] and shown[1] >= shown_target[1]


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("stored", [(4032, 3024), (3000, 400), (1000, 999), (385, 385), (200, 100)])
def test_fast_decoding_never_holds_fewer_pixels_than_the_model_needs(stored: tuple[int, int], orientation: int) -> None:
    # Every step of the fast mode before the processor's resize: DCT reduction, box reduction, the viewer's steps.
    target = (384, 256)
    for data in (jpeg_of(stored, orientation), encode(Image.new("RGB", stored, "teal"), "PNG")):
        image = open_image(data, max_pixels=50_000_000)
        reduce_jpeg_in_decoder(image, target)
        image.load()
        picture = viewers_picture(reduced_for_resize(image, target))

        shown = (stored[1], stored[0]) if orientation == 6 and image.format == "JPEG" else stored
        assert picture.width >= min(target[0], shown[0]) and picture.height >= min(target[1], shown[1])


@pytest.mark.parametrize("size", [(384, 384), (64, 64), (160, 96)])
@pytest.mark.parametrize("name", ["png-rgba-black-under-transparent", "png-palette-trns", "png-16-bit-rgb", "gif"])
def test_exact_decoding_is_the_processors_resize_of_the_viewers_picture(name: str, size: tuple[int, int]) -> None:
    encoding = encodings(PICTURE)[name]
    processor = BlipImageProcessorPil(size={"width": size[0], "height": size[1]})
    expected = processor(images=encoding.picture, do_rescale=False, do_normalize=False, return_tensors="np")

    pixels = decode_for_model(encoding.data, size, int(Image.Resampling.BICUBIC), LIMITS.max_pixels, exact=True)

    assert pixels.shape == (size[1], size[0], 3)
    assert np.array_equal(pixels, expected["pixel_values"][0].transpose(1, 2, 0).astype(np.uint8))


def test_a_16_bit_gray_picture_is_scaled_to_8_bits_not_clipped() -> None:
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(levels * 257), "PNG")

    picture = decode_image(data, LIMITS.max_pixels)

    assert np.array_equal(np.asarray(picture)[:, :, 0], levels)


def test_a_png_with_a_profile_over_pillows_text_limit_is_accepted_and_a_text_bomb_is_not() -> None:
    profile = profiles.padded_srgb(1_200_000)
    data = encode(Image.new("RGB", (8, 8), "red"), "PNG", icc_profile=profile)

    assert open_image(data, LIMITS.max_pixels).info["icc_profile"] == profile
    assert decode_image(data, LIMITS.max_pixels).getpixel((4, 4)) == (255, 0, 0)
    with pytest.raises(ImageInvalidError):
        decode_image(hostile.png_with_text_bomb(), LIMITS.max_pixels)
