"""Images are downloaded within bounds and decoded upright, or refused with a stable code."""

from __future__ import annotations

import ipaddress

import pytest
from PIL import Image

from tests.conftest import ImageServer
from tests.fixtures.images import encode, rotated_jpeg, shape_png, truncated_png
from worker.contract.errors import ImageFetchError, ImageInvalidError, ImageTooLargeError
from worker.contract.images import decode_image
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.netguard import NetworkPolicy

LIMITS = FetchLimits(max_bytes=50_000, max_pixels=1_000_000, connect_timeout_s=2, total_timeout_s=5)
# The image server listens on 127.0.0.1 on a free port: both need allowing (tests/test_fetch_guard.py says why).
LOCAL = NetworkPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allow_ports=(range(1024, 65536),))


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
