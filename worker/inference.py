"""The pure inference core: a loaded BLIP model plus images and texts in, answers (or captions) out.

Knows nothing of Celery, Redis or HTTP. Follows the model card's usage on CPU, on GPU and in float16, with three
changes that keep every answer and make batches pay:
- an image is resized once, by the thread that decoded it (contract.images.decode_for_model, or
  `pixel_tensor` for a PIL image: the processor's own PIL resize), and the model thread only stacks, rescales and
  normalises uint8 tensors on the device;
- the vision encoder runs once per distinct image, however many questions ask about it;
- questions of different lengths share one batch: the answer decoder is given the questions' real attention mask,
  where `BlipForQuestionAnswering.generate` builds an all-ones mask that lets it attend to padding.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipProcessor

from contract.errors import SettingsError
from contract.states import JobTask
from contract.viewer import on_white

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CAPTION_ARCHITECTURE = "BlipForConditionalGeneration"


@dataclass(frozen=True)
class LoadedModel:
    """A BLIP model resident on its device, with the processor that prepares its inputs, and its task."""

    model: BlipForQuestionAnswering | BlipForConditionalGeneration
    processor: BlipProcessor
    model_id: str
    device: torch.device
    dtype: torch.dtype
    task: JobTask = JobTask.VQA

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) the processor resizes every image to."""
        size = self.processor.image_processor.size
        return int(size["width"]), int(size["height"])

    @property
    def resample(self) -> int:
        """The PIL filter the processor resizes with."""
        return int(self.processor.image_processor.resample)

    @property
    def resample_name(self) -> str:
        """The PIL filter the processor resizes with, by its name in lower case (`bicubic`), as workers publish it."""
        return Image.Resampling(self.resample).name.lower()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; a CUDA device this machine does not have is
    refused with a SettingsError that names BLIPQ_DEVICE (before the model loads, rather than at its first job)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else f"torch (CUDA {torch.version.cuda}) sees no GPU"
        )
        raise SettingsError(
            f"BLIPQ_DEVICE={name}, but CUDA is not available here ({why}): set BLIPQ_DEVICE=cpu (or auto), or run "
            "the worker where a GPU and a CUDA build of torch are (docs/deployment.md)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SettingsError(
            f"BLIPQ_DEVICE={name}, but this machine has {count} CUDA devices (cuda:0 to cuda:{count - 1})"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA (as in the model card) and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def model_task(model_id: str) -> JobTask:
    """`caption` for a BlipForConditionalGeneration checkpoint (its config's architectures), else `vqa`."""
    architectures = BlipConfig.from_pretrained(model_id).architectures or []
    return JobTask.CAPTION if CAPTION_ARCHITECTURE in architectures else JobTask.VQA


def load_model(model_id: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load processor and model with from_pretrained (hub id or local directory), ready for inference.

    A captioning checkpoint (Salesforce/blip-image-captioning-base) loads as BlipForConditionalGeneration, any other
    BLIP checkpoint as BlipForQuestionAnswering (Salesforce/blip-vqa-base).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    task = model_task(model_id)
    processor = BlipProcessor.from_pretrained(model_id)
    model_class = BlipForConditionalGeneration if task is JobTask.CAPTION else BlipForQuestionAnswering
    model = model_class.from_pretrained(model_id, dtype=torch_dtype)
    model.to(torch_device)  # type: ignore[arg-type]
    model.eval()
    honour_cross_attention_masks(model)
    return LoadedModel(model, processor, model_id, torch_device, torch_dtype, task)


def honour_cross_attention_masks(model: torch.nn.Module) -> int:
    """Make the text decoder's cross-attention apply the encoder attention mask it is given; returns the layers fixed.

    transformers 5.x's BlipTextLayer hands that mask to its cross-attention as `attention_mask`, and
    BlipTextSelfAttention, seeing `encoder_hidden_states`, then reads `encoder_attention_mask` (None): the mask is
    dropped, and a padded question would be attended to. The hook passes it where it is read (and changes nothing
    where it already arrives).
    """

    def pass_mask(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:  # type: ignore[type-arg]
        if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
        return args, kwargs

    fixed = 0
    for name, module in model.named_modules():
        if name.startswith("text_decoder.") and name.endswith(".crossattention.self"):
            module.register_forward_pre_hook(pass_mask, with_kwargs=True)
            fixed += 1
    return fixed


def pixel_tensor(loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
    """A PIL image as the model's processor prepares it (transparency on white, its PIL resize and filter), as uint8
    (3, H, W).

    Cheap for the model thread to batch, and made by whichever thread decoded the image (PIL releases the GIL).
    """
    resized = on_white(image).resize(loaded.image_size, resample=Image.Resampling(loaded.resample))
    return image_tensor(np.array(resized, dtype=np.uint8))


def image_tensor(pixels: npt.NDArray[np.uint8]) -> torch.Tensor:
    """uint8 (H, W, 3) pixels (contract.images.decode_for_model's) as the uint8 (3, H, W) tensor that
    `pixel_values` stacks."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pixel_values(loaded: LoadedModel, pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 images from `pixel_tensor` into the model's normalised input, on its device and in its dtype."""
    image_processor = loaded.processor.image_processor
    batch = torch.stack(pixels).to(loaded.device, non_blocking=True).float()
    mean = torch.tensor(image_processor.image_mean, device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=loaded.device).view(1, 3, 1, 1)
    # (x * rescale - mean) / std in two passes over the batch, in place.
    return batch.mul_(float(image_processor.rescale_factor) / std).sub_(mean / std).to(loaded.dtype)


def answer_questions(
    loaded: LoadedModel,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int = 20,
    num_beams: int = 1,
) -> list[str]:
    """Answer questions[i] about images[i] (or, for a captioning model, caption with prompt questions[i]).

    The same image object given several times is encoded once.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} texts")
    index_of: dict[int, int] = {}
    pixels: list[torch.Tensor] = []
    rows: list[int] = []
    for image in images:
        if id(image) not in index_of:
            index_of[id(image)] = len(pixels)
            pixels.append(pixel_tensor(loaded, image))
        rows.append(index_of[id(image)])
    return generate_texts(loaded, pixels, rows, questions, max_new_tokens, num_beams)


def generate_texts(
    loaded: LoadedModel,
    pixels: list[torch.Tensor],
    rows: list[int],
    texts: list[str],
    max_new_tokens: int = 20,
    num_beams: int = 1,
) -> list[str]:
    """One batch: texts[i] is about the image pixels[rows[i]]; answers (or captions) in the same order."""
    if not texts:
        return []
    generate = _generate_captions if loaded.task is JobTask.CAPTION else _generate_answers
    with torch.inference_mode():
        image_embeds = loaded.model.vision_model(pixel_values=pixel_values(loaded, pixels))[0]
        row_index = torch.tensor(rows, device=image_embeds.device)
        output = generate(loaded, image_embeds, row_index, texts, max_new_tokens, num_beams)
    return [text.strip() for text in loaded.processor.batch_decode(output, skip_special_tokens=True)]


def _generate_answers(
    loaded: LoadedModel,
    image_embeds: torch.Tensor,
    rows: torch.Tensor,
    questions: list[str],
    max_new_tokens: int,
    num_beams: int,
) -> torch.Tensor:
    """BlipForQuestionAnswering.generate, step by step, with the questions' attention mask given to the decoder."""
    model = loaded.model
    assert isinstance(model, BlipForQuestionAnswering)
    tokens = loaded.processor.tokenizer(questions, padding=True, return_tensors="pt").to(loaded.device)
    image_embeds = image_embeds.index_select(0, rows)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    question_embeds = model.text_encoder(
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
        return_dict=False,
    )[0]
    start = torch.full((len(questions), 1), model.decoder_start_token_id, device=question_embeds.device)
    text_config: Any = model.config.text_config  # a BlipTextConfig (typed as a union in transformers)
    return model.text_decoder.generate(
        input_ids=start,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=question_embeds,
        encoder_attention_mask=tokens["attention_mask"],  # the real mask: padding is never attended to
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )


def _generate_captions(
    loaded: LoadedModel,
    image_embeds: torch.Tensor,
    rows: torch.Tensor,
    prompts: list[str],
    max_new_tokens: int,
    num_beams: int,
) -> torch.Tensor:
    """BlipForConditionalGeneration.generate for prompts of one token length at a time (a prompt is continued from
    its end: padding would sit between a prompt and its continuation); "" is an unconditional caption."""
    model = loaded.model
    assert isinstance(model, BlipForConditionalGeneration)
    text_config: Any = model.config.text_config  # a BlipTextConfig (typed as a union in transformers)
    by_length: dict[int, list[int]] = defaultdict(list)
    prompt_ids = []
    for index, prompt in enumerate(prompts):
        # A prompt without its closing [SEP] (as generate drops it); no prompt: the start token alone.
        ids = loaded.processor.tokenizer(prompt)["input_ids"][:-1] if prompt else [model.decoder_input_ids]
        ids[0] = text_config.bos_token_id
        prompt_ids.append(ids)
        by_length[len(ids)].append(index)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for indices in by_length.values():
        group_rows = rows[torch.tensor(indices, device=rows.device)]
        embeds = image_embeds.index_select(0, group_rows)
        generated = model.text_decoder.generate(
            input_ids=torch.tensor([prompt_ids[i] for i in indices], device=embeds.device),
            eos_token_id=text_config.sep_token_id,
            pad_token_id=text_config.pad_token_id,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
        for index, row in zip(indices, generated, strict=True):
            outputs[index] = row
    pad = text_config.pad_token_id
    return torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True, padding_value=pad)
