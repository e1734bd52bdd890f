"""Fidelity: how far the fast decoding's pixels and answers move from the model card's processor.

    python -m benchmarks.fidelity [--quick] [--smoke] [--images 100]

(a) Pixels. Synthetic photos (benchmarks/photos.py) at 1, 2, 5 and 12 MP as JPEG quality 75, 90 and 95, and the
12 MP one as PNG (the box reduction instead of the DCT one), each decoded by `decode_for_model` fast and exact to
384 px (BLIP-base's processor: BlipImageProcessor(size={"height": 384, "width": 384})) and to 64 px (the demo
models'): mean absolute difference, largest difference and PSNR of fast against exact, and whether exact equals the
processor's resize of the viewer's picture (`decode_image`) pixel for pixel.

(b) Answers. The shipped demo models (demo_model/blip-vqa-easy and blip-caption-easy, from_pretrained, CPU, float32)
on easy-VQA test pictures (`--images` of them, a fixed sample), each upscaled (bicubic) to the four camera sizes and
JPEG-compressed at quality 75, 90 and 95: every test question of the picture, and an unprompted caption. The
processor's path is `answer_questions` on the viewer's picture (its PIL resize is the processor's, and its answers
the model card's one at a time: tests/unit/test_inference.py); the fast and exact paths are `decode_for_model` then the
same `generate_texts`. Prints how many answers agree (goal: at least 99.5% fast, all exact).

`--quick`: a 0.3 MP photo at quality 90 for (a), 3 pictures at 0.3 MP for (b); `--smoke`, one picture for (b).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.photos import NAMED_SIZES, QUICK_SIZES, image_bytes, photo
from contract.images import decode_for_model, decode_image

BICUBIC = int(Image.Resampling.BICUBIC)
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS
QUALITIES = (75, 90, 95)
SIDES = (384, 64)
SAMPLE_SEED = 20261206
MODELS = Path(__file__).resolve().parent.parent / "demo_model"


def processor_pixels(picture: Image.Image, side: int) -> np.ndarray:
    """BlipImageProcessor's resized uint8 pixels of a picture (no rescale, no normalisation), (H, W, 3)."""
    from transformers import BlipImageProcessorPil

    processor = BlipImageProcessorPil(size={"height": side, "width": side})
    out = processor(images=picture, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return np.asarray(out).transpose(1, 2, 0).astype(np.uint8)


def pixel_row(name: str, data: bytes) -> None:
    """Fast against exact at each side, and exact against the processor."""
    picture = decode_image(data, MAX_PIXELS)
    cells = []
    for side in SIDES:
        exact = decode_for_model(data, (side, side), BICUBIC, MAX_PIXELS, exact=True)
        fast = decode_for_model(data, (side, side), BICUBIC, MAX_PIXELS)
        difference = np.abs(fast.astype(np.int16) - exact.astype(np.int16))
        mse = float(np.mean(difference.astype(np.float64) ** 2))
        psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
        identical = np.array_equal(exact, processor_pixels(picture, side))
        cells.append(
            f"{side:3d} px: mean {difference.mean():5.2f} max {int(difference.max()):3d} PSNR {psnr:5.1f} dB"
            f" exact=processor {'yes' if identical else 'NO'}"
        )
    print(f"  {name:22s} " + " | ".join(cells))


def pixels(sizes: dict[str, tuple[int, int]], qualities: tuple[int, ...]) -> None:
    """Section (a)."""
    print("(a) pixels, fast against exact (levels 0-255), and exact against the processor")
    for name, size in sizes.items():
        picture = photo(size)
        for quality in qualities:
            pixel_row(f"{name} JPEG q{quality}", image_bytes(picture, "JPEG", quality=quality))
    largest = list(sizes)[-1]
    pixel_row(f"{largest} PNG", image_bytes(photo(sizes[largest]), "PNG", compress_level=1))


@dataclass
class Agreement:
    """Answers compared with the processor's path, by path."""

    total: int = 0
    fast: int = 0
    exact: int = 0
    differences: list[str] = field(default_factory=list)

    def add(self, texts: list[str], reference: list[str], fast: list[str], exact: list[str], where: str) -> None:
        self.total += len(texts)
        self.fast += sum(a == b for a, b in zip(fast, reference, strict=True))
        self.exact += sum(a == b for a, b in zip(exact, reference, strict=True))
        self.differences += [
            f"{where} {text!r}: processor {want!r}, fast {got!r}"
            for text, want, got in zip(texts, reference, fast, strict=True)
            if want != got
        ]

    def line(self, what: str) -> str:
        return (
            f"  {what}: {self.total} answers; fast agrees {self.fast} ({self.fast / max(1, self.total):.2%}),"
            f" exact agrees {self.exact} ({self.exact / max(1, self.total):.2%})"
        )


def answer_paths(loaded: Any, data: bytes, picture: Image.Image, texts: list[str]) -> tuple[list[str], ...]:
    """The processor path's answers to `texts`, then the fast path's, then the exact path's."""
    from worker.inference import answer_questions, generate_texts, image_tensor

    reference = answer_questions(loaded, [picture] * len(texts), texts)
    decoded = [decode_for_model(data, loaded.image_size, loaded.resample, MAX_PIXELS, exact) for exact in (False, True)]
    rows = [0] * len(texts)
    fast, exact = (generate_texts(loaded, [image_tensor(pixels)], rows, texts) for pixels in decoded)
    return reference, fast, exact


def answers(count: int, sizes: dict[str, tuple[int, int]], qualities: tuple[int, ...]) -> None:
    """Section (b)."""
    from easy_vqa import get_test_image_paths, get_test_questions

    from worker.inference import load_model

    models = {
        "blip-vqa-easy, every test question": load_model(str(MODELS / "blip-vqa-easy"), "cpu", "float32"),
        "blip-caption-easy, unprompted captions": load_model(str(MODELS / "blip-caption-easy"), "cpu", "float32"),
    }
    questions, _, image_ids = get_test_questions()
    paths = get_test_image_paths()
    by_image: dict[int, list[str]] = {}
    for question, image_id in zip(questions, image_ids, strict=True):
        by_image.setdefault(image_id, []).append(question)
    agreement = {name: Agreement() for name in models}
    for done, image_id in enumerate(random.Random(SAMPLE_SEED).sample(sorted(by_image), count)):
        print(f"  picture {done + 1}/{count}", file=sys.stderr, flush=True)
        small = Image.open(paths[image_id]).convert("RGB")
        for size in sizes.values():
            upscaled = small.resize(size, Image.Resampling.BICUBIC)
            for quality in qualities:
                data = image_bytes(upscaled, "JPEG", quality=quality)
                picture = decode_image(data, MAX_PIXELS)
                for name, loaded in models.items():
                    texts = by_image[image_id] if loaded.task == "vqa" else [""]
                    where = f"image {image_id} {size[0]}x{size[1]} q{quality}"
                    agreement[name].add(texts, *answer_paths(loaded, data, picture, texts), where)
    print(f"(b) answers, {count} easy-VQA test pictures x {len(sizes)} sizes x {len(qualities)} JPEG qualities")
    for name, tally in agreement.items():
        print(tally.line(name))
        for line in tally.differences[:10]:
            print(f"    differs: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.3 MP, quality 90, 3 pictures")
    parser.add_argument("--smoke", action="store_true", help="as --quick, one picture for (b)")
    parser.add_argument("--images", type=int, default=100, help="easy-VQA test pictures for (b)")
    args = parser.parse_args()
    small = args.quick or args.smoke
    sizes = QUICK_SIZES if small else NAMED_SIZES
    qualities = (90,) if small else QUALITIES
    pixels(sizes, qualities)
    answers(1 if args.smoke else 3 if args.quick else args.images, sizes, qualities)


if __name__ == "__main__":
    main()
