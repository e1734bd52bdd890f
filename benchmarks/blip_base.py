"""A stand-in for Salesforce/blip-vqa-base: its architecture (`BlipConfig()` defaults, 384 px), random weights.

The hub is out of reach here, and the compute of a forward pass does not depend on the weights' values, so the
benchmarks build the model and save it as a local checkpoint (model, BlipProcessor, a WordPiece tokenizer of the real
vocabulary's size and special-token ids) that `from_pretrained`, and so the worker's BLIPQ_MODEL, load like the real
one. Built once per cache directory; a re-run only loads it.

The smoke runs of the benchmarks that measure it (batching, gpu) build a narrow variant through the same code
(`small=True`: the same tokenizer, special ids and 384 px processor, one narrow layer per stack), into a directory of
its own.

    python -m benchmarks.blip_base [--dir DIR] [--small]   # build (or find) the checkpoint and print where it is
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blipq-bench" / "blip-vqa-base-random"
VOCAB_SIZE = 30524  # BlipTextConfig's default: bert-base-uncased's 30522 plus [DEC] and [ENC]
SMALL_CACHE_DIR = CACHE_DIR.with_name("blip-vqa-base-small")
IMAGE_SIZE = 384  # Salesforce/blip-vqa-base's processor size
# The narrow variant's layers (smoke runs): a forward pass in milliseconds; 32 px patches over the 384 px input.
SMALL_LAYERS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
SMALL_TEXT = {**SMALL_LAYERS, "encoder_hidden_size": 32}
SMALL_VISION = {**SMALL_LAYERS, "patch_size": 32}
# Special tokens at the ids they have in Salesforce/blip-vqa-base's tokenizer, which BlipConfig()'s defaults name.
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522, "[ENC]": 30523}
# Questions of the lengths VQA v2 users ask (5 to 12 words), about photos; their words are in the vocabulary.
QUESTIONS = (
    "what color is the car?",
    "how many people are in the picture?",
    "is there a dog in the image?",
    "what is the man holding in his hand?",
    "what is the woman wearing on her head?",
    "is it raining outside?",
    "what room is this?",
    "what sport is being played in this photo?",
    "how many animals are on the grass near the tree?",
    "are there any clouds in the sky?",
    "what is on the table next to the plate?",
    "is the person on the left smiling at the camera?",
    "what kind of food is this?",
    "where is the cat sitting?",
    "what time of day is it?",
    "does the street have any cars parked on it?",
)
EXTRA_WORDS = ("yes", "no", "one", "two", "three", "red", "blue", "green", "white", "black", "kitchen", "tennis")


def vocabulary() -> dict[str, int]:
    """A WordPiece vocabulary of VOCAB_SIZE entries: the special tokens at their real ids, real words, fillers."""
    words = sorted({word for question in QUESTIONS for word in question.rstrip("?").split()} | set(EXTRA_WORDS))
    words += ["?", ".", ","]
    free_ids = [index for index in range(VOCAB_SIZE) if index not in SPECIAL_IDS.values()]
    fillers = [f"##w{index}" for index in range(len(free_ids) - len(words))]  # never produced by the questions
    return {**SPECIAL_IDS, **dict(zip(words + fillers, free_ids, strict=True))}


def build_blip_base(directory: Path = CACHE_DIR, seed: int = 0, small: bool = False) -> Path:
    """The checkpoint in `directory`, built there first if it is not complete yet; returns the directory. `small`:
    the narrow variant (SMALL_TEXT, SMALL_VISION) of the smoke runs."""
    if (directory / "model.safetensors").exists() and (directory / "processor_config.json").exists():
        return directory
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    vocab = vocabulary()
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    sep = SPECIAL_IDS["[SEP]"]
    config = BlipConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "pad_token_id": SPECIAL_IDS["[PAD]"],
            "bos_token_id": SPECIAL_IDS["[DEC]"],
            "sep_token_id": sep,
            "eos_token_id": sep,  # the decoder ends an answer with [SEP], as blip-vqa-base's does
            **(SMALL_TEXT if small else {}),
        },
        vision_config={"image_size": IMAGE_SIZE, **(SMALL_VISION if small else {})},
        **({"projection_dim": 32} if small else {}),
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    partial = directory.with_name(directory.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(partial)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(directory)  # whole or not at all: an interrupted build is not mistaken for a checkpoint
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help=f"where the checkpoint is kept (default {CACHE_DIR})")
    parser.add_argument("--small", action="store_true", help=f"the smoke runs' narrow variant ({SMALL_CACHE_DIR})")
    args = parser.parse_args()
    print(build_blip_base(args.dir or (SMALL_CACHE_DIR if args.small else CACHE_DIR), small=args.small))
    return 0


if __name__ == "__main__":
    sys.exit(main())
