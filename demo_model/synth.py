"""Synthetic easy-VQA-style image and question generator (own code).

Images follow the documented easy-VQA recipe: a 128x128 canvas with a background whose RGB channels are each
uniform in [230, 255], one filled shape (rectangle / circle / triangle) in one of 8 colours, sizes in [16, 64]
(an upward equilateral triangle whose base may touch the bottom edge; rectangle and circle fully inside),
drawn with PIL (no anti-aliasing) and then resized to 64x64 with bilinear resampling.  Labels are exact because we
know what we drew.  Questions come from the 24 easy-VQA templates (extracted from the train split), with yes/no
questions balanced between "present" and "absent" and between plain and negated wording.

Also offers the augmentations used in training (PNG / JPEG round trips, upscale + downscale round trips), a
helper to recover the (shape, colour) label of every easy-VQA *train* image from its questions, and the captioning
demo's caption grammar ("a red circle", after a prompt such as "a picture of" when there is one).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "rectangle", "triangle"]
COLORS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
COLOR_NAMES = list(COLORS)
ANSWERS = ["yes", "no", *SHAPES, *COLOR_NAMES]

DRAW_SIZE = 128
IM_SIZE = 64
MIN_SIZE, MAX_SIZE = 16, 64

# The 24 easy-VQA templates. {s} = a shape word, {c} = a colour word.
# kind: 'shape' (answer = the shape), 'color' (answer = the colour),
#       'yn_s' / 'yn_c' (yes/no about a shape / colour), with neg=True when the wording is negated.
TEMPLATES = [
    ("what shape is in the image?", "shape", False),
    ("what shape is present?", "shape", False),
    ("what shape does the image contain?", "shape", False),
    ("what is the {c} shape?", "shape", False),
    ("what color is the shape?", "color", False),
    ("what is the color of the shape?", "color", False),
    ("what color is the {s}?", "color", False),
    ("what is the color of the {s}?", "color", False),
    ("is there a {s}?", "yn_s", False),
    ("is there a {s} in the image?", "yn_s", False),
    ("does the image contain a {s}?", "yn_s", False),
    ("is a {s} present?", "yn_s", False),
    ("is there not a {s}?", "yn_s", True),
    ("is there not a {s} in the image?", "yn_s", True),
    ("does the image not contain a {s}?", "yn_s", True),
    ("is no {s} present?", "yn_s", True),
    ("is there a {c} shape?", "yn_c", False),
    ("is there a {c} shape in the image?", "yn_c", False),
    ("does the image contain a {c} shape?", "yn_c", False),
    ("is a {c} shape present?", "yn_c", False),
    ("is there not a {c} shape?", "yn_c", True),
    ("is there not a {c} shape in the image?", "yn_c", True),
    ("does the image not contain a {c} shape?", "yn_c", True),
    ("is no {c} shape present?", "yn_c", True),
]
OPEN_T = [t for t in TEMPLATES if t[1] in ("shape", "color")]
YN_T = [t for t in TEMPLATES if t[1] in ("yn_s", "yn_c")]


def answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    return "colour"


def draw_image(rng: random.Random, shape: str, color: str) -> Image.Image:
    """One easy-VQA-style 64x64 RGB image."""
    bg = (rng.randint(230, 255), rng.randint(230, 255), rng.randint(230, 255))
    im = Image.new("RGB", (DRAW_SIZE, DRAW_SIZE), bg)
    d = ImageDraw.Draw(im)
    fill = COLORS[color]
    if shape == "rectangle":
        w = rng.randint(MIN_SIZE, MAX_SIZE)
        h = rng.randint(MIN_SIZE, MAX_SIZE)
        x0 = rng.randint(0, DRAW_SIZE - w)
        y0 = rng.randint(0, DRAW_SIZE - h)
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
    elif shape == "circle":
        s = rng.randint(MIN_SIZE, MAX_SIZE)
        x0 = rng.randint(0, DRAW_SIZE - s)
        y0 = rng.randint(0, DRAW_SIZE - s)
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "triangle":
        s = rng.randint(MIN_SIZE, MAX_SIZE)
        # base from (x, y) to (x + s, y), apex above it; the base may sit on the bottom edge (y = 128)
        x = rng.randint(0, DRAW_SIZE - s)
        y = rng.randint(math.ceil(s * math.sin(math.pi / 3)), DRAW_SIZE)
        pts = [(x, y), (x + s, y), (x + s * math.cos(-math.pi / 3), y + s * math.sin(-math.pi / 3))]
        d.polygon(pts, fill=fill)
    else:
        raise ValueError(shape)
    del d
    return im.resize((IM_SIZE, IM_SIZE), resample=Image.BILINEAR)


def random_label(rng: random.Random) -> tuple[str, str]:
    return rng.choice(SHAPES), rng.choice(COLOR_NAMES)


# ---------------------------------------------------------------- augmentation
def jpeg_roundtrip(im: Image.Image, quality: int) -> Image.Image:
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def upscale(im: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    return im.resize((size, size), resample=resample)


def augment(im: Image.Image, rng: random.Random) -> Image.Image:
    """Random mix of the encodings a user may send: identity, JPEG at various qualities, upscaling
    (the processor then brings the image back to 64x64), or JPEG after upscaling."""
    r = rng.random()
    if r < 0.30:
        return im
    if r < 0.60:
        return jpeg_roundtrip(im, rng.randint(60, 100))
    size = rng.choice([96, 128, 160, 192, 224, 256, 320, 384, 512])
    resample = rng.choice([Image.BICUBIC, Image.BICUBIC, Image.BILINEAR, Image.LANCZOS, Image.NEAREST])
    big = upscale(im, size, resample)
    if r < 0.80:
        return big
    return jpeg_roundtrip(big, rng.randint(60, 100))


def back_to_size(im: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Bring an image back to size x size the way a BLIP image processor does (bicubic): PIL bicubic
    (the PIL backend) or torch bicubic with antialiasing (the torchvision backend)."""
    if im.size == (size, size):
        return im
    if rng.random() < 0.5:
        return im.resize((size, size), resample=Image.BICUBIC)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return Image.fromarray(t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


# ---------------------------------------------------------------- questions
def make_question(rng: random.Random, shape: str, color: str) -> tuple[str, str]:
    """A random question about an image with the given shape and colour, and its exact answer.
    Half the questions are yes/no (as in easy-VQA); within yes/no, the asked-about attribute is the true one
    half the time, so 'yes' and 'no' are balanced for plain and negated wordings alike."""
    if rng.random() < 0.5:
        tmpl, kind, _ = rng.choice(OPEN_T)
        q = tmpl.format(s=shape, c=color)
        return q, (shape if kind == "shape" else color)
    tmpl, kind, neg = rng.choice(YN_T)
    if kind == "yn_s":
        present = rng.random() < 0.5
        word = shape if present else rng.choice([s for s in SHAPES if s != shape])
        q = tmpl.format(s=word)
    else:
        present = rng.random() < 0.5
        word = color if present else rng.choice([c for c in COLOR_NAMES if c != color])
        q = tmpl.format(c=word)
    return q, ("yes" if present != neg else "no")


def label_from_questions(questions, answers) -> tuple[str | None, str | None]:
    """Recover (shape, colour) of an easy-VQA image from its questions/answers (train split only)."""
    shape = color = None
    for q, a in zip(questions, answers, strict=False):
        if a in SHAPES:
            shape = a
        elif a in COLORS:
            color = a
        for tmpl, kind, neg in TEMPLATES:
            if kind not in ("yn_s", "yn_c"):
                continue
            words = SHAPES if kind == "yn_s" else COLOR_NAMES
            for w in words:
                if q == tmpl.format(s=w, c=w):
                    present = (a == "yes") != neg
                    if kind == "yn_s" and present:
                        shape = w
                    if kind == "yn_c" and present:
                        color = w
        # "what color is the triangle?" / "what is the red shape?" also name the other attribute
        for tmpl, kind, _ in OPEN_T:
            if kind == "color" and "{s}" in tmpl:
                for s in SHAPES:
                    if q == tmpl.format(s=s):
                        shape = s
            if kind == "shape" and "{c}" in tmpl:
                for c in COLOR_NAMES:
                    if q == tmpl.format(c=c):
                        color = c
    return shape, color


# ---------------------------------------------------------------- captions
# The captioning demo's grammar: "a <colour> <shape>", after the prompt when there is one. Every colour word starts
# with a consonant, so the article is always "a".
CAPTION_FORM = "a {color} {shape}"
CAPTION_PROMPTS = ["a picture of", "a photo of", "an image of"]  # the prompt forms the captioner is trained with


def make_caption(shape: str, color: str, prompt: str = "") -> str:
    """The caption of a picture of one shape in one colour: "a red circle", or "a picture of a red circle" after
    the prompt "a picture of"."""
    caption = CAPTION_FORM.format(color=color, shape=shape)
    return f"{prompt} {caption}" if prompt else caption


def caption_words_match(caption: str, shape: str, color: str) -> bool:
    """Whether the caption names exactly this colour and this shape: one colour word and one shape word, the right
    ones (the prompt forms name neither)."""
    words = caption.split()
    return [w for w in words if w in COLORS] == [color] and [w for w in words if w in SHAPES] == [shape]


# ---------------------------------------------------------------- image banks
def make_bank(n: int, seed: int, augment_frac: float = 0.5, start: int = 0):
    """n synthetic images as a uint8 array (n, 64, 64, 3) + shape/colour index arrays.
    Each image i uses its own RNG seeded from (seed, start + i), so banks are reproducible and can be
    produced in parallel chunks.  A fraction `augment_frac` of the images is passed through `augment`
    and brought back to 64x64 the way the BLIP processor does it (bicubic); the rest are plain."""
    X = np.empty((n, IM_SIZE, IM_SIZE, 3), dtype=np.uint8)
    S = np.empty(n, dtype=np.int64)
    C = np.empty(n, dtype=np.int64)
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + start + i)
        shape, color = random_label(rng)
        im = draw_image(rng, shape, color)
        if rng.random() < augment_frac:
            im = back_to_size(augment(im, rng), IM_SIZE, rng)
        X[i] = np.asarray(im, dtype=np.uint8)
        S[i] = SHAPES.index(shape)
        C[i] = COLOR_NAMES.index(color)
    return X, S, C


def _bank_chunk(args):
    return make_bank(*args)


def make_bank_parallel(n: int, seed: int, augment_frac: float = 0.5, workers: int = 2, chunk: int = 5000):
    from multiprocessing import get_context

    jobs = [(min(chunk, n - s), seed, augment_frac, s) for s in range(0, n, chunk)]
    if workers <= 1:
        parts = [_bank_chunk(j) for j in jobs]
    else:
        with get_context("spawn").Pool(workers) as p:
            parts = p.map(_bank_chunk, jobs)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


if __name__ == "__main__":
    import argparse
    import os

    ap = argparse.ArgumentParser(description="Draw easy-VQA-style images (+ example questions).")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/synth_samples")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    for i in range(a.n):
        shape, color = random_label(rng)
        im = draw_image(rng, shape, color)
        im.save(os.path.join(a.out, f"{i:05d}_{color}_{shape}.png"))
        q, ans = make_question(rng, shape, color)
        print(f"{i:05d} {color:7s} {shape:9s} | {q} -> {ans}")
