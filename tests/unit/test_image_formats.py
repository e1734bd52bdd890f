"""Every accepted format, encoded in hostile-but-legal ways, is answered as the model card answers the picture a
viewer sees in it: the worker's decoding (fast, the default) then its batched generate, against the processor on
the viewer's picture, one question at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from easy_vqa import get_test_image_paths
from PIL import Image
from transformers import BlipImageProcessorPil

from contract.images import decode_for_model
from tests.support.encodings import Encoding, encodings
from worker.inference import LoadedModel, generate_texts, image_tensor, load_model
from worker.settings import DEMO_MODEL_DIR

MAX_PIXELS = 40_000_000
PICTURE_ID = 0  # an easy-VQA test picture: a red triangle
CAMERA_SIZE = (1200, 900)  # upscaled to a photo's size and aspect (so the fast mode reduces it)
QUESTIONS = {
    "what is the color of the shape?": "red",
    "what is the red shape?": "triangle",
    "is there a blue shape in the image?": "no",
}
# Lossless files reach the model as the processor prepares the viewer's picture: exactly, in exact mode; in fast
# mode within these (levels 0-255), the cost of reducing before the resize.
FAST_MAX_DIFFERENCE = 2
FAST_MEAN_DIFFERENCE = 0.05

PICTURE = Image.open(get_test_image_paths()[PICTURE_ID]).convert("RGB").resize(CAMERA_SIZE, Image.Resampling.BICUBIC)
ENCODINGS = encodings(PICTURE)


@pytest.fixture(scope="module")
def demo() -> Iterator[LoadedModel]:
    yield load_model(str(DEMO_MODEL_DIR), device="cpu", dtype="float32")


def model_card_answer(loaded: LoadedModel, picture: Image.Image, question: str) -> str:
    """The model card's usage: processor, generate, decode."""
    inputs = loaded.processor(images=picture, text=question, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=20)
    return str(loaded.processor.decode(output[0], skip_special_tokens=True)).strip()


def worker_answers(loaded: LoadedModel, data: bytes, questions: list[str]) -> list[str]:
    """The worker's path: decode_for_model (fast), then one batched generate for all the questions."""
    pixels = decode_for_model(data, loaded.image_size, loaded.resample, MAX_PIXELS)
    return generate_texts(loaded, [image_tensor(pixels)], [0] * len(questions), questions)


def processor_pixels(picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The processor's resize of a picture, as uint8 (H, W, 3)."""
    processor = BlipImageProcessorPil(size={"width": size[0], "height": size[1]})
    resized = processor(images=picture, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return np.asarray(resized).transpose(1, 2, 0).astype(np.uint8)


def test_the_model_card_answers_the_viewers_picture_right(demo: LoadedModel) -> None:
    # What the comparisons below stand on: through the processor, the picture's true colours give the true answers.
    assert [model_card_answer(demo, PICTURE, question) for question in QUESTIONS] == list(QUESTIONS.values())


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_each_encoding_is_answered_as_the_model_card_answers_the_viewers_picture(demo: LoadedModel, name: str) -> None:
    encoding: Encoding = ENCODINGS[name]
    questions = list(QUESTIONS)

    answers = worker_answers(demo, encoding.data, questions)

    assert answers == [model_card_answer(demo, encoding.picture, question) for question in questions]


@pytest.mark.parametrize("name", [name for name, encoding in ENCODINGS.items() if encoding.lossless])
def test_a_lossless_file_reaches_the_model_as_the_processor_prepares_the_viewers_picture(
    demo: LoadedModel, name: str
) -> None:
    encoding = ENCODINGS[name]
    expected = processor_pixels(encoding.picture, demo.image_size).astype(np.int16)

    exact = decode_for_model(encoding.data, demo.image_size, demo.resample, MAX_PIXELS, exact=True)
    fast = decode_for_model(encoding.data, demo.image_size, demo.resample, MAX_PIXELS)

    assert np.array_equal(exact, expected)
    difference = np.abs(fast.astype(np.int16) - expected)
    assert difference.max() <= FAST_MAX_DIFFERENCE
    assert difference.mean() <= FAST_MEAN_DIFFERENCE
