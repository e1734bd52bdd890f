"""Train the small BLIP captioning demo model on synthetic easy-VQA-style images (+ the easy-VQA train split).

The result is a standard `BlipForConditionalGeneration` + `BlipProcessor` checkpoint (safetensors), in the format of
Salesforce/blip-image-captioning-base: it loads with `from_pretrained` and captions through `model.generate`, with no
prompt (the decoder starts from `[DEC]`) or continuing a prompt ("a picture of" -> "a picture of a red circle").

Captions follow one grammar (synth.make_caption, synth.CAPTION_PROMPTS): "a <colour> <shape>", after the prompt when
there is one. Training sequences are exactly what BLIP's generate (and the service's caption path, worker.inference)
feeds the text decoder: `[DEC]`, the prompt's tokens (the tokenizer's own, its [CLS] replaced by [DEC], its [SEP]
dropped), then the caption and `[SEP]`; the loss covers the caption and `[SEP]`, never the prompt. Half the captions
are trained after one of the prompts, half with none.

With `--init-vision demo_model/blip-vqa-easy` the vision encoder starts from the VQA demo's, which was trained on the
same kind of pictures (and on no picture of the held-out sets evaluate_caption.py uses); the text decoder always
starts from random weights. Seeded and deterministic (single process, fixed data order); meant for 2 CPU threads:

    python demo_model/train_caption.py --init-vision demo_model/blip-vqa-easy --out demo_model/blip-caption-easy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for worker/
import synth
from train import (
    SPECIALS,
    AuxHead,
    ImageStream,
    build_config,
    get_bank,
    real_train_images,
)
from train import build_processor as build_demo_processor
from training import begin_run, train
from transformers import (
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = synth.CAPTION_PROMPTS


# ---------------------------------------------------------------- tokenizer / processor / config
def build_vocab() -> list[str]:
    words = set(synth.COLOR_NAMES) | set(synth.SHAPES)
    for shape in synth.SHAPES:
        words.update(synth.make_caption(shape, synth.COLOR_NAMES[0]).split())
    for prompt in PROMPTS:
        words.update(prompt.split())
    return [*SPECIALS, *sorted(words)]


def prompt_ids(tok, prompt: str) -> list[int]:
    """The decoder's input for `prompt`, as worker.inference (and BlipForConditionalGeneration.generate) builds it:
    the tokenized prompt with its [CLS] replaced by [DEC] and its [SEP] dropped; no prompt: [DEC] alone."""
    dec = tok.convert_tokens_to_ids("[DEC]")
    if not prompt:
        return [dec]
    ids = tok(prompt)["input_ids"][:-1]
    ids[0] = dec
    return ids


def sequence(tok, prompt: str, shape: str, colour: str) -> tuple[list[int], int]:
    """Token ids of one training sequence (`[DEC] prompt caption [SEP]`) and the length of its prefix (`[DEC]
    prompt`), whose tokens are given, not predicted."""
    prefix = prompt_ids(tok, prompt)
    caption = tok(synth.make_caption(shape, colour))["input_ids"][1:]  # the caption's tokens and [SEP]
    return prefix + caption, len(prefix)


# ---------------------------------------------------------------- data
class Batcher:
    """Deterministic batches of (image, caption sequence): each image (train.ImageStream) gets a prompt from PROMPTS
    with probability `prompt_frac`, else none."""

    def __init__(self, bank, real, tok, batch, real_frac, prompt_frac, seed, mean, std):
        self.images = ImageStream(bank, real, real_frac, seed, mean, std)
        self.real, self.rng = self.images.real, self.images.rng
        self.tok, self.batch, self.prompt_frac = tok, batch, prompt_frac
        self.pad = tok.pad_token_id

    def next(self):
        imgs, shp, col, seqs, prefixes = [], [], [], [], []
        for _ in range(self.batch):
            x, s, c = self.images.draw()
            prompt = self.rng.choice(PROMPTS) if self.rng.random() < self.prompt_frac else ""
            ids, prefix = sequence(self.tok, prompt, synth.SHAPES[s], synth.COLOR_NAMES[c])
            imgs.append(x)
            shp.append(s)
            col.append(c)
            seqs.append(ids)
            prefixes.append(prefix)
        px = self.images.pixels(imgs)
        width = max(len(ids) for ids in seqs)
        input_ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        targets = torch.full((len(seqs), width), -100, dtype=torch.long)  # the token each position predicts
        for i, (ids, prefix) in enumerate(zip(seqs, prefixes, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            # position p predicts token p + 1; the prompt's own tokens (given at inference) are not predicted
            targets[i, prefix - 1 : len(ids) - 1] = torch.tensor(ids[prefix:])
        return px, input_ids, mask, targets, torch.tensor(shp), torch.tensor(col)


# ---------------------------------------------------------------- training
def forward_loss(model, aux, px, input_ids, mask, targets, shp, col, aux_w):
    img = model.vision_model(pixel_values=px).last_hidden_state
    logits = model.text_decoder(
        input_ids=input_ids,
        attention_mask=mask,
        encoder_hidden_states=img,
        encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
    ).logits
    lm = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    predicted = targets != -100
    # the sequence is right when every predicted token is (greedy, teacher-forced)
    seq_ok = ((logits.argmax(-1) == targets) | ~predicted).all(-1).float().mean()
    if aux is not None and aux_w > 0:
        ls, lc = aux(img)
        aux_loss = F.cross_entropy(ls, shp) + F.cross_entropy(lc, col)
    else:
        aux_loss = torch.zeros(())
    return lm, aux_loss, seq_ok


@torch.no_grad()
def validate(model, processor, held):
    """Greedy captions through the service's own inference core (worker.inference: the caption path) on held-out
    easy-VQA train images: colour+shape match and full-caption exact match, with no prompt and with each prompt."""
    from contract.states import JobTask
    from worker.inference import LoadedModel, answer_questions

    model.eval()
    loaded = LoadedModel(model, processor, "in-training", torch.device("cpu"), torch.float32, JobTask.CAPTION)
    images = [Image.fromarray(x) for x, _, _, _ in held]
    out = {}
    for prompt in ["", *PROMPTS]:
        captions = answer_questions(loaded, images, [prompt] * len(images))
        exact = words = 0
        for (_, s, c, _), got in zip(held, captions, strict=True):
            shape, colour = synth.SHAPES[s], synth.COLOR_NAMES[c]
            exact += int(got == synth.make_caption(shape, colour, prompt))
            words += int(synth.caption_words_match(got, shape, colour))
        out[prompt or "(none)"] = (words / len(held), exact / len(held))
    model.train()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "blip-caption-easy"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=48, help="images (captions) per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the auxiliary shape/colour loss")
    ap.add_argument(
        "--init-vision",
        default=None,
        help="start the vision encoder from this BLIP checkpoint's (e.g. demo_model/blip-vqa-easy); else random",
    )
    ap.add_argument("--prompt-frac", type=float, default=0.5, help="share of captions trained after a prompt")
    ap.add_argument("--real-frac", type=float, default=0.15, help="share of images from the easy-VQA train split")
    ap.add_argument("--bank", type=int, default=40000, help="synthetic images drawn up front")
    ap.add_argument("--cache", default="/tmp/blipq_cache")
    ap.add_argument("--holdout", type=int, default=300, help="train-split images held out for validation")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    args = ap.parse_args()

    t0 = begin_run(args)

    processor = build_demo_processor(args.image_size, build_vocab())
    tok = processor.tokenizer
    model = BlipForConditionalGeneration(build_config(args, tok))
    if args.init_vision:
        donor = BlipForQuestionAnswering.from_pretrained(args.init_vision)
        model.vision_model.load_state_dict(donor.vision_model.state_dict(), strict=True)
        print(f"[model] vision encoder from {args.init_vision}", flush=True)
        del donor
    aux = AuxHead(args.vision_hidden)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[model] {n_params / 1e6:.3f}M parameters; vision {args.vision_layers}x{args.vision_hidden} patch "
        f"{args.patch} ({(args.image_size // args.patch) ** 2} tokens); text decoder {args.text_layers}x"
        f"{args.text_hidden}; vocab {len(tok)}",
        flush=True,
    )

    real, held = real_train_images(args.holdout, args.seed)
    held = [h for h in held if h[1] is not None and h[2] is not None]
    bank = get_bank(args.bank if not args.bench else 2000, args.seed, args.cache, workers=args.threads)
    ip = processor.image_processor
    batcher = Batcher(
        bank, real, tok, args.batch, args.real_frac, args.prompt_frac, args.seed, ip.image_mean, ip.image_std
    )
    print(
        f"[data] {len(real)} train-split images ({len(batcher.real)} fully labelled), {len(held)} held out, "
        f"{len(bank[0])} synthetic in bank; setup {time.time() - t0:.1f}s",
        flush=True,
    )

    params = list(model.parameters()) + list(aux.parameters())

    def step(batch):
        px, input_ids, mask, targets, shp, col = batch
        lm, aux_loss, seq_ok = forward_loss(model, aux, px, input_ids, mask, targets, shp, col, args.aux)
        loss = lm + args.aux * aux_loss
        return loss, [("loss", lm), ("aux", aux_loss), ("train-caption-acc", seq_ok)]

    def validation(_last):
        parts = ", ".join(f"{p!r} {w:.4f}/{e:.4f}" for p, (w, e) in validate(model, processor, held).items())
        return f"held-out train-split images, colour+shape/exact by prompt: {parts}"

    train(model, processor, params, args, batcher.next, step, validation, t0)


if __name__ == "__main__":
    main()
