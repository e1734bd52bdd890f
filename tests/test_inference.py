"""The inference core answers like one-question-at-a-time generate, in any batch and in half precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures.images import shape_png
from worker.images import decode_image
from worker.inference import answer_questions, load_model

QUESTIONS = [
    "what color?",
    "how many dogs are in the picture?",
    "is there a red circle in the image?",
    "what shape?",
    "how many?",
    "is the big square on the left or the right?",
]


def images() -> list[Image.Image]:
    colors = ["red", "green", "blue", "black", "white", "yellow"]
    return [decode_image(shape_png(color, (32 + 8 * i, 48)), 10**6) for i, color in enumerate(colors)]


def test_a_mixed_batch_answers_exactly_like_one_at_a_time(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    pictures = images()

    batched = answer_questions(loaded, pictures, QUESTIONS)
    one_by_one = [
        answer_questions(loaded, [image], [question])[0] for image, question in zip(pictures, QUESTIONS, strict=True)
    ]

    assert batched == one_by_one
    assert len(set(batched)) > 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_casts_the_inputs_to_the_model_dtype(tiny_model_dir: Path, dtype: str) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)

    answers = answer_questions(loaded, images()[:2], QUESTIONS[:2])

    assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_auto_is_float32_on_the_cpu(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="auto", dtype="auto")
    assert (loaded.device.type, loaded.dtype) == ("cpu", torch.float32)
