"""The pure inference core: a loaded BLIP model plus images and questions in, answers out.

Knows nothing of Celery, Redis or HTTP. Follows the model card's usage on CPU, on GPU and in float16.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A BLIP VQA model resident on its device, with the processor that prepares its inputs."""

    model: BlipForQuestionAnswering
    processor: BlipProcessor
    model_id: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA (as in the model card) and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def load_model(model_id: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load processor and model with from_pretrained (hub id or local directory), ready for inference."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    processor = BlipProcessor.from_pretrained(model_id)
    model = BlipForQuestionAnswering.from_pretrained(model_id, dtype=torch_dtype)
    model.to(torch_device)  # type: ignore[arg-type]
    model.eval()
    return LoadedModel(model, processor, model_id, torch_device, torch_dtype)


def answer_questions(
    loaded: LoadedModel,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int = 20,
    num_beams: int = 1,
) -> list[str]:
    """Answer questions[i] about images[i] for every i, batching questions of equal token length.

    BlipForQuestionAnswering.generate lets its answer decoder attend to every question position, padding
    included, so a padded batch could answer differently than one question at a time. Grouping questions by
    token length means no question is ever padded, and every answer equals the one-at-a-time answer.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    token_counts = [len(ids) for ids in loaded.processor.tokenizer(questions)["input_ids"]]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, count in enumerate(token_counts):
        groups[count].append(index)
    answers = [""] * len(questions)
    for indices in groups.values():
        group_answers = _generate(
            loaded, [images[i] for i in indices], [questions[i] for i in indices], max_new_tokens, num_beams
        )
        for index, answer in zip(indices, group_answers, strict=True):
            answers[index] = answer
    return answers


def _generate(
    loaded: LoadedModel, images: list[Image.Image], questions: list[str], max_new_tokens: int, num_beams: int
) -> list[str]:
    inputs = loaded.processor(images=images, text=questions, return_tensors="pt", padding=True)
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=inputs["input_ids"].to(loaded.device),
            attention_mask=inputs["attention_mask"].to(loaded.device),
            pixel_values=inputs["pixel_values"].to(loaded.device, loaded.dtype),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
    return [answer.strip() for answer in loaded.processor.batch_decode(output, skip_special_tokens=True)]
