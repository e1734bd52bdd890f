"""The inference core answers like one-question-at-a-time generate, in any batch and in half precision."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from contract.images import decode_image
from tests.support.answers import model_card_answer
from tests.support.images import shape_png
from worker.inference import answer_questions, load_model, pixel_tensor, pixel_values
from worker.settings import DEMO_MODEL_DIR

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


def mixed_pairs() -> list[tuple[Image.Image, str]]:
    """Every image with every question, shuffled: questions of different lengths, images repeated, in one batch."""
    pairs = [(image, question) for image in images() for question in QUESTIONS]
    random.Random(7).shuffle(pairs)
    return pairs


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_a_mixed_batch_answers_exactly_like_the_model_card_one_at_a_time(tiny_model_dir: Path, model: str) -> None:
    loaded = load_model(str(tiny_model_dir if model == "tiny" else DEMO_MODEL_DIR), device="cpu", dtype="float32")
    pairs = mixed_pairs()

    batched = answer_questions(loaded, [image for image, _ in pairs], [question for _, question in pairs])

    assert batched == [model_card_answer(loaded, image, question) for image, question in pairs]
    assert len(set(batched)) > 1


def test_the_decoder_ignores_padded_question_positions(tiny_model_dir: Path) -> None:
    # transformers 5.x drops the decoder's cross-attention mask (inference.honour_cross_attention_masks): without
    # the fix, a padded question is answered from its padding too; with it, exactly as the unpadded one.
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    decoder = loaded.model.text_decoder
    torch.manual_seed(0)
    question = torch.randn(1, 4, decoder.config.hidden_size)
    padded = torch.cat([question, torch.randn(1, 9, decoder.config.hidden_size)], dim=1)
    mask = torch.tensor([[1] * 4 + [0] * 9])
    start = torch.tensor([[loaded.model.decoder_start_token_id]])

    with torch.inference_mode():
        alone = decoder(input_ids=start, encoder_hidden_states=question, is_decoder=True).logits
        masked = decoder(input_ids=start, encoder_hidden_states=padded, encoder_attention_mask=mask).logits
        unmasked = decoder(input_ids=start, encoder_hidden_states=padded, is_decoder=True).logits

    assert torch.allclose(masked, alone, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_pixels_resized_in_the_fetch_thread_equal_the_processors(tiny_model_dir: Path) -> None:
    loaded = load_model(str(DEMO_MODEL_DIR), device="cpu", dtype="float32")
    pictures = [*images(), images()[0].resize((300, 97)), images()[1].convert("L")]

    ours = pixel_values(loaded, [pixel_tensor(loaded, image) for image in pictures])
    theirs = loaded.processor(images=[image.convert("RGB") for image in pictures], return_tensors="pt")

    assert ours.shape == theirs["pixel_values"].shape
    assert torch.allclose(ours, theirs["pixel_values"], atol=1e-5)


def test_captions_in_a_mixed_batch_equal_the_model_card_one_at_a_time(tiny_caption_model_dir: Path) -> None:
    loaded = load_model(str(tiny_caption_model_dir), device="cpu", dtype="float32")
    prompts = ["", "a picture of", "", "a photo of a big", "there is"]
    pairs = [(image, prompts[i % len(prompts)]) for i, image in enumerate(images() * 2)]

    batched = answer_questions(loaded, [image for image, _ in pairs], [prompt for _, prompt in pairs])

    assert loaded.task == "caption"
    assert batched == [model_card_answer(loaded, image, prompt) for image, prompt in pairs]
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
