"""What an undisturbed run answers: the inference core in the test's own process, and the model card's own usage."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from contract.images import decode_image
from worker.inference import LoadedModel, answer_questions, load_model


def reference_answers(model_dir: Path, inputs: list[tuple[bytes, str]]) -> list[str]:
    """What an undisturbed run answers: the inference core, in this process, one job at a time."""
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    cache: dict[tuple[bytes, str], str] = {}
    for image, question in inputs:
        if (image, question) not in cache:
            cache[image, question] = answer_questions(loaded, [decode_image(image, 10**6)], [question])[0]
    return [cache[pair] for pair in inputs]


def model_card_answer(loaded: LoadedModel, image: Image.Image, text: str) -> str:
    """The seed model card's usage, one image and question at a time: processor, generate, decode."""
    inputs = loaded.processor(images=image, text=text or None, return_tensors="pt")
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=20)
    return str(loaded.processor.decode(output[0], skip_special_tokens=True)).strip()
