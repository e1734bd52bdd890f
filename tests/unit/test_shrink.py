"""Shrinking on the client (blipq/shrink.py): a worker feeds its model the same pixels from a shrunk upload as from the
original, for every accepted encoding, in both decode modes and with two filters; and pictures are shrunk only where
every live worker of the tasks asked resizes the same way."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import PIL
import pytest
from easy_vqa import get_test_image_paths
from PIL import Image

from blipq.shrink import ShrinkTarget, shrink
from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.images import decode_for_model
from tests.support.encodings import encodings
from tests.support.images import truncated_png

MAX_PIXELS = 40_000_000
MAX_BYTES = 40_000_000
CAMERA_SIZE = (1200, 900)  # a photo's size and aspect: the fast mode reduces it before the resize
PICTURE = Image.open(get_test_image_paths()[0]).convert("RGB").resize(CAMERA_SIZE, Image.Resampling.BICUBIC)
ENCODINGS = {name: encoding.data for name, encoding in encodings(PICTURE).items()}
# BLIP's input and filter in the fast mode; a small input of another aspect and filter in the exact mode.
TARGETS = {
    "384-bicubic-fast": ShrinkTarget(384, 384, Image.Resampling.BICUBIC, False, MAX_PIXELS, MAX_BYTES),
    "64x48-bilinear-exact": ShrinkTarget(64, 48, Image.Resampling.BILINEAR, True, MAX_PIXELS, MAX_BYTES),
}


def model_pixels(data: bytes, target: ShrinkTarget) -> np.ndarray:
    """What a worker that resizes as `target` says feeds its model from an upload of `data`."""
    return decode_for_model(data, (target.width, target.height), target.resample, MAX_PIXELS, target.exact)


@pytest.mark.parametrize("target_name", sorted(TARGETS))
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_a_shrunk_upload_reaches_the_model_as_the_original_does(name: str, target_name: str) -> None:
    data, target = ENCODINGS[name], TARGETS[target_name]

    shrunk = shrink(data, target)

    assert np.array_equal(model_pixels(shrunk, target), model_pixels(data, target))
    assert len(shrunk) <= len(data), "a file already smaller than its shrunk pixels is sent as it is"


def test_a_photo_shrinks_to_a_png_of_the_models_input() -> None:
    photo = ENCODINGS["jpeg-exif-rotated"]

    shrunk = shrink(photo, TARGETS["384-bicubic-fast"])

    opened = Image.open(io.BytesIO(shrunk))
    assert (opened.format, opened.size, opened.mode) == ("PNG", (384, 384), "RGB")
    assert len(shrunk) < len(photo) / 2


def test_a_picture_the_service_would_refuse_is_refused_with_its_code() -> None:
    bmp = ENCODINGS["bmp"]  # 1,080,000 pixels in 3.2 MB
    with pytest.raises(ImageInvalidError):
        shrink(truncated_png(), TARGETS["384-bicubic-fast"])
    bicubic = TARGETS["384-bicubic-fast"]
    with pytest.raises(ImageTooLargeError, match="limit is 1000000 pixels"):
        shrink(bmp, dataclasses.replace(bicubic, max_pixels=1_000_000))
    with pytest.raises(ImageTooLargeError, match="BLIPQ_MAX_IMAGE_BYTES"):
        shrink(bmp, dataclasses.replace(bicubic, max_bytes=len(bmp) - 1))


def worker(**fields: Any) -> dict[str, Any]:
    """A worker's record as GET /v1/models lists it."""
    record = {"image_width": 384, "image_height": 384, "resample": "bicubic", "decode": "fast"}
    return record | {"pillow": PIL.__version__} | fields


def models(vqa: list[dict[str, Any]], caption: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entries = [{"task": "vqa", "workers": vqa}, {"task": "caption", "workers": caption or []}]
    return {"limits": {"max_image_pixels": 6_000_000, "max_image_bytes": 5_000_000}, "models": entries}


def test_a_target_is_what_every_live_worker_of_the_tasks_publishes_alike() -> None:
    bicubic = ShrinkTarget(384, 384, Image.Resampling.BICUBIC, False, 6_000_000, 5_000_000)

    assert ShrinkTarget.published(models([worker(), worker()]), ["vqa"]) == bicubic
    assert ShrinkTarget.published(models([worker()], [worker()]), ["vqa", "caption"]) == bicubic
    exact = ShrinkTarget.published(models([worker(decode="exact", resample="lanczos")]), ["vqa"])
    assert exact == ShrinkTarget(384, 384, Image.Resampling.LANCZOS, True, 6_000_000, 5_000_000)


@pytest.mark.parametrize(
    "other",
    [
        {"image_width": 480},
        {"image_height": 512},
        {"resample": "bilinear"},
        {"decode": "exact"},
        {"pillow": "0.1.0"},  # another release may round otherwise
        {"resample": ""},  # a worker that does not say
        {"decode": ""},
        {"image_width": 0},
        {"pillow": ""},
    ],
)
def test_nothing_is_shrunk_where_a_worker_resizes_otherwise_or_does_not_say(other: dict[str, Any]) -> None:
    assert ShrinkTarget.published(models([worker(), worker(**other)]), ["vqa"]) is None
    assert ShrinkTarget.published(models([worker()], [worker(**other)]), ["vqa", "caption"]) is None
    assert ShrinkTarget.published(models([worker()], [worker(**other)]), ["vqa"]) is not None, "the other task's"


def test_nothing_is_shrunk_for_a_task_no_live_worker_serves_or_by_a_service_that_hides_its_limits() -> None:
    assert ShrinkTarget.published(models([worker()]), ["vqa", "caption"]) is None
    assert ShrinkTarget.published({"models": []}, ["vqa"]) is None
    assert ShrinkTarget.published({"models": models([worker()])["models"]}, ["vqa"]) is None
