"""Train the small BLIP VQA demo model on easy-VQA (train split) + synthetic easy-VQA-style images.

The result is a standard `BlipForQuestionAnswering` + `BlipProcessor` checkpoint (safetensors) that loads with
`from_pretrained` and answers through `model.generate`.  The easy-VQA *test* split is never touched here.

Seeded and deterministic (single process, fixed data order); meant for 2 CPU cores:

    python demo_model/train.py --out demo_model/blip-vqa-easy --steps 4000 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for worker/
import synth
from training import begin_run, train
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


# ---------------------------------------------------------------- tokenizer / processor / config
def build_vocab() -> list[str]:
    words = set()
    for tmpl, _, _ in synth.TEMPLATES:
        words.update(w for w in tmpl.replace("?", " ").split() if not w.startswith("{"))
    words.update(synth.ANSWERS)
    return [*SPECIALS, "?", *sorted(words)]


def build_processor(image_size: int, vocab: list[str] | None = None) -> BlipProcessor:
    """The tokenizer (`vocab`, the VQA words by default) and image processor of a demo model."""
    vocab = vocab or build_vocab()
    tok = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        model_max_length=64,
    )
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=ip, tokenizer=tok)


def build_config(args, tok) -> BlipConfig:
    ids = dict(
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),  # decoder start token, as in blip-vqa-base
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,  # the answer decoder's end token
        eos_token_id=tok.sep_token_id,
    )
    text_config = dict(
        vocab_size=len(tok),
        hidden_size=args.text_hidden,
        encoder_hidden_size=args.vision_hidden,
        intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers,
        num_attention_heads=max(1, args.text_hidden // 32),
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        label_smoothing=0.0,
        **ids,
    )
    vision_config = dict(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 32),
        image_size=args.image_size,
        patch_size=args.patch,
        attention_dropout=0.0,
    )
    cfg = BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=args.text_hidden,
        image_text_hidden_size=args.text_hidden,
    )
    cfg.decoder_start_token_id = ids["bos_token_id"]
    cfg.pad_token_id = ids["pad_token_id"]
    cfg.bos_token_id = ids["bos_token_id"]
    cfg.eos_token_id = ids["sep_token_id"]
    cfg.sep_token_id = ids["sep_token_id"]
    return cfg


# ---------------------------------------------------------------- data
def real_train_images(holdout: int, seed: int):
    """easy-VQA *train* images with their (shape, colour) recovered from the train questions.
    Returns (train part, held-out part): lists of (uint8 array, shape_idx, colour_idx, [(q, a), ...])."""
    from easy_vqa import get_train_image_paths, get_train_questions

    qs, ans, ids = get_train_questions()
    paths = get_train_image_paths()
    per: dict[int, tuple[list, list]] = {}
    for q, a, i in zip(qs, ans, ids, strict=False):
        per.setdefault(i, ([], []))
        per[i][0].append(q)
        per[i][1].append(a)
    order = sorted(per)
    random.Random(seed).shuffle(order)
    held, train = [], []
    for k, i in enumerate(order):
        s, c = synth.label_from_questions(*per[i])
        x = np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.uint8)
        item = (
            x,
            None if s is None else synth.SHAPES.index(s),
            None if c is None else synth.COLOR_NAMES.index(c),
            list(zip(*per[i], strict=False)),
        )
        (held if k < holdout else train).append(item)
    return train, held


def get_bank(n: int, seed: int, cache_dir: str, workers: int):
    path = os.path.join(cache_dir, f"synth_bank_n{n}_s{seed}.npz")
    if os.path.exists(path):
        d = np.load(path)
        return d["X"], d["S"], d["C"]
    t = time.time()
    X, S, C = synth.make_bank_parallel(n, seed=seed, augment_frac=0.5, workers=workers)
    print(f"[bank] drew {n} synthetic images in {time.time() - t:.1f}s", flush=True)
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, X=X, S=S, C=C)
    return X, S, C


class ImageStream:
    """Training pictures, one at a time, deterministically: from the synthetic bank (shuffled per epoch) or, with
    probability `real_frac`, from the easy-VQA train split (augmented on the fly). Its `rng` is the batch's: the
    texts drawn for each picture come from the same stream, in the same order."""

    def __init__(self, bank, real, real_frac, seed, mean, std):
        self.X, self.S, self.C = bank
        self.real = [r for r in real if r[1] is not None and r[2] is not None]
        self.real_frac = real_frac
        self.rng = random.Random(seed)
        self.nprng = np.random.RandomState(seed)
        self.perm, self.pos = self.nprng.permutation(len(self.X)), 0
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def _next_bank(self):
        if self.pos >= len(self.perm):
            self.perm, self.pos = self.nprng.permutation(len(self.X)), 0
        j = self.perm[self.pos]
        self.pos += 1
        return self.X[j], int(self.S[j]), int(self.C[j])

    def draw(self):
        """The next picture (uint8 HxWx3) with its shape and colour indices."""
        if self.real and self.rng.random() < self.real_frac:
            x, s, c, _ = self.real[self.rng.randrange(len(self.real))]
            im = Image.fromarray(x)
            if self.rng.random() < 0.6:
                im = synth.back_to_size(synth.augment(im, self.rng), x.shape[0], self.rng)
            return np.asarray(im, dtype=np.uint8), s, c
        return self._next_bank()

    def pixels(self, imgs):
        """The model's pixel values for a list of pictures, normalized as the processor does."""
        px = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
        return (px - self.mean) / self.std


class Batcher:
    """Deterministic batches: each image (ImageStream) gets `k` questions (template, asked attribute and negation
    drawn from the same seeded RNG)."""

    def __init__(self, bank, real, tok, batch, k, real_frac, seed, mean, std):
        self.images = ImageStream(bank, real, real_frac, seed, mean, std)
        self.real, self.rng = self.images.real, self.images.rng
        self.tok, self.batch, self.k = tok, batch, k
        self.vocab = tok.get_vocab()
        self.dec, self.sep = self.vocab["[DEC]"], self.vocab["[SEP]"]

    def next(self):
        imgs, shp, col, qs, ans = [], [], [], [], []
        for _ in range(self.batch):
            x, s, c = self.images.draw()
            imgs.append(x)
            shp.append(s)
            col.append(c)
            for _ in range(self.k):
                q, a = synth.make_question(self.rng, synth.SHAPES[s], synth.COLOR_NAMES[c])
                qs.append(q)
                ans.append(a)
        px = self.images.pixels(imgs)
        enc = self.tok(qs, padding=True, return_tensors="pt")
        labels = torch.tensor([[self.dec, self.vocab[a], self.sep] for a in ans])
        return px, enc["input_ids"], enc["attention_mask"], labels, torch.tensor(shp), torch.tensor(col)


# ---------------------------------------------------------------- model pieces
class AuxHead(torch.nn.Module):
    """Training-only auxiliary classifier on the vision encoder output (not saved in the checkpoint):
    predicts shape and colour from [CLS] + mean-pooled patch tokens, so the ViT gets a direct signal."""

    def __init__(self, hidden):
        super().__init__()
        self.fc = torch.nn.Linear(2 * hidden, len(synth.SHAPES) + len(synth.COLOR_NAMES))

    def forward(self, img):
        z = torch.cat([img[:, 0], img[:, 1:].mean(1)], -1)
        out = self.fc(z)
        return out[:, : len(synth.SHAPES)], out[:, len(synth.SHAPES) :]


class MatchHead(torch.nn.Module):
    """Training-only auxiliary classifier on the question encoder output (not saved in the checkpoint).

    At each colour or shape word of a question it predicts the answer bit: for a yes/no question, the answer
    (the word matches the image, flipped by a negation anywhere in the question); for an open question, whether
    the word matches the image.  Yes/no questions hinge on this comparison, an XOR of the match and the negation;
    without a direct signal the small text stack sits at chance on them for thousands of steps (measured: yes/no
    0.48-0.52 at steps 600-2,400, while shape and colour reached 0.98-1.00)."""

    def __init__(self, hidden, tok):
        super().__init__()
        self.fc = torch.nn.Linear(hidden, 1)
        self.register_buffer("color_ids", torch.tensor(tok.convert_tokens_to_ids(synth.COLOR_NAMES)))
        self.register_buffer("shape_ids", torch.tensor(tok.convert_tokens_to_ids(synth.SHAPES)))
        self.yes_id, self.no_id = tok.convert_tokens_to_ids(["yes", "no"])

    def loss(self, q, ids, shp, col, answer_ids):
        """Binary cross-entropy over the colour and shape words of the questions (other tokens are ignored)."""
        is_color = (ids.unsqueeze(-1) == self.color_ids).any(-1)
        is_shape = (ids.unsqueeze(-1) == self.shape_ids).any(-1)
        present = (ids == self.color_ids[col].unsqueeze(1)) | (ids == self.shape_ids[shp].unsqueeze(1))
        yes_no = ((answer_ids == self.yes_id) | (answer_ids == self.no_id)).unsqueeze(1)
        target = torch.where(yes_no, (answer_ids == self.yes_id).unsqueeze(1).expand_as(present), present)
        mask = is_color | is_shape
        if not mask.any():
            return torch.zeros(())
        logits = self.fc(q).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits[mask], target[mask].float())


def forward_loss(model, aux, px, ids, am, labels, shp, col, k, aux_w, match=None):
    img = model.vision_model(pixel_values=px).last_hidden_state
    img_k = img.repeat_interleave(k, 0)
    q = model.text_encoder(
        input_ids=ids,
        attention_mask=am,
        encoder_hidden_states=img_k,
        encoder_attention_mask=torch.ones(img_k.shape[:-1], dtype=torch.long),
    )[0]
    logits = model.text_decoder(
        input_ids=labels,
        encoder_hidden_states=q,
        encoder_attention_mask=am,
    ).logits
    # next-token loss on the answer word and on the closing [SEP]
    vqa = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    if match is not None:
        match_loss = match.loss(q, ids, shp.repeat_interleave(k), col.repeat_interleave(k), labels[:, 1])
    else:
        match_loss = torch.zeros(())
    first_ok = (logits[:, 0].argmax(-1) == labels[:, 1]).float().mean()
    if aux is not None and aux_w > 0:
        ls, lc = aux(img)
        aux_loss = F.cross_entropy(ls, shp) + F.cross_entropy(lc, col)
    else:
        aux_loss = torch.zeros(())
    return vqa, aux_loss, match_loss, first_ok


@torch.no_grad()
def validate(model, processor, held, max_q=None):
    """Greedy answers through the service's own inference core (worker.inference: model.generate, questions
    batched only with others of the same token length) on held-out *train* images and their easy-VQA questions."""
    from worker.inference import LoadedModel, answer_questions

    model.eval()
    items = [(x, q, a) for x, _, _, qa in held for q, a in qa][:max_q]
    loaded = LoadedModel(model, processor, "in-training", torch.device("cpu"), torch.float32)
    correct = {"yes/no": [0, 0], "shape": [0, 0], "colour": [0, 0]}
    for b in range(0, len(items), 512):
        chunk = items[b : b + 512]
        preds = answer_questions(loaded, [Image.fromarray(x) for x, _, _ in chunk], [q for _, q, _ in chunk])
        for (_, _, a), p in zip(chunk, preds, strict=True):
            t = synth.answer_type(a)
            correct[t][0] += int(p == a)
            correct[t][1] += 1
    model.train()
    n = sum(v[1] for v in correct.values())
    acc = sum(v[0] for v in correct.values()) / max(1, n)
    return acc, {k: v[0] / max(1, v[1]) for k, v in correct.items()}, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "blip-vqa-easy"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=48, help="images per step")
    ap.add_argument("--k", type=int, default=4, help="questions per image per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the auxiliary shape/colour loss")
    ap.add_argument("--match", type=float, default=1.0, help="weight of the auxiliary word-image match loss")
    ap.add_argument("--init", default=None, help="start from this checkpoint instead of random weights (probes)")
    ap.add_argument("--real-frac", type=float, default=0.15, help="share of images from the easy-VQA train split")
    ap.add_argument("--bank", type=int, default=150000, help="synthetic images drawn up front")
    ap.add_argument("--cache", default="/tmp/blipq_cache")
    ap.add_argument("--holdout", type=int, default=300, help="train-split images held out for validation")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=192)
    ap.add_argument("--vision-layers", type=int, default=6)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    args = ap.parse_args()
    # BLIP's answer decoder cross-attends to the question encoder with the same text config, so the text
    # hidden size has to equal the vision hidden size (encoder_hidden_size), as in blip-vqa-base (768/768).
    args.text_hidden = args.vision_hidden

    t0 = begin_run(args)

    processor = build_processor(args.image_size)
    tok = processor.tokenizer
    cfg = build_config(args, tok)
    model = BlipForQuestionAnswering.from_pretrained(args.init) if args.init else BlipForQuestionAnswering(cfg)
    aux = AuxHead(args.vision_hidden)
    match = MatchHead(args.text_hidden, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[model] {n_params / 1e6:.3f}M parameters; vision {args.vision_layers}x{args.vision_hidden} patch "
        f"{args.patch} ({(args.image_size // args.patch) ** 2} tokens); text {args.text_layers}x{args.text_hidden}; "
        f"vocab {len(tok)}",
        flush=True,
    )

    real, held = real_train_images(args.holdout, args.seed)
    bank = get_bank(args.bank if not args.bench else 2000, args.seed, args.cache, workers=args.threads)
    ip = processor.image_processor
    batcher = Batcher(bank, real, tok, args.batch, args.k, args.real_frac, args.seed, ip.image_mean, ip.image_std)
    print(
        f"[data] {len(real)} train-split images ({len(batcher.real)} fully labelled), {len(held)} held out, "
        f"{len(bank[0])} synthetic in bank; setup {time.time() - t0:.1f}s",
        flush=True,
    )

    params = list(model.parameters()) + list(aux.parameters()) + list(match.parameters())

    def step(batch):
        px, ids, am, labels, shp, col = batch
        vqa, aux_loss, match_loss, first_ok = forward_loss(
            model, aux, px, ids, am, labels, shp, col, args.k, args.aux, match if args.match > 0 else None
        )
        loss = vqa + args.aux * aux_loss + args.match * match_loss
        return loss, [("loss", vqa), ("aux", aux_loss), ("match", match_loss), ("train-acc", first_ok)]

    def validation(last):
        acc, per, n = validate(model, processor, held, max_q=None if last else 1500)
        return (
            f"held-out train-split acc {acc:.4f} on {n} "
            f"(yes/no {per['yes/no']:.4f}, shape {per['shape']:.4f}, colour {per['colour']:.4f})"
        )

    train(model, processor, params, args, batcher.next, step, validation, t0)


if __name__ == "__main__":
    main()
