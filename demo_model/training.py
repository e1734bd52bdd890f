"""The training loop both demo trainers share (train.py: VQA, train_caption.py: captions), and what goes around it:
the run's seeding, the optimizer and its schedule, saving the checkpoint. Each trainer keeps its own data, model
and losses, and hands the loop a batch source, a step (a batch's loss and the terms to log) and a validation."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch

# A step's loss to minimize, and the terms logged (averaged over the steps since the last line), in order.
StepResult = tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]


def begin_run(args) -> float:
    """Seed every RNG, pin the CPU threads and ask torch for deterministic kernels; returns when the run began."""
    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return t0


def optimizer(params, args):
    """AdamW (no weight decay on biases and norms) and its learning rate by step: linear warm-up, then cosine down
    to 2% of `args.lr`."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))

    return opt, lr_at


def train(
    model,
    processor,
    params,
    args,
    next_batch: Callable[[], tuple],
    step: Callable[[tuple], StepResult],
    validate: Callable[[bool], str],
    t0: float,
) -> None:
    """Train `model` for `args.steps` steps (20 with --bench), then save it (finish).

    Each step takes `next_batch()`, minimizes the loss `step` makes of it (gradients clipped to norm 1), and every
    `args.log_every` steps prints the averages of the terms it logs. Every `args.eval_every` steps and at the end
    (not with --bench) it prints `validate(last)`, `last` true at the final step, and saves the checkpoint.
    """
    opt, lr_at = optimizer(params, args)
    model.train()
    t_train = time.time()
    sums: dict[str, float] = {}
    nlog = 0
    steps = 20 if args.bench else args.steps
    for n in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(n)
        loss, logged = step(next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for name, value in logged:
            sums[name] = sums.get(name, 0.0) + value.item()
        nlog += 1
        if (n + 1) % args.log_every == 0 or n + 1 == steps or args.bench:
            el = time.time() - t_train
            terms = " ".join(f"{name} {total / nlog:.4f}" for name, total in sums.items())
            print(
                f"step {n + 1}/{steps} {terms} lr {lr_at(n):.2e} {el:.0f}s ({(n + 1) / el:.2f} it/s)",
                flush=True,
            )
            sums = {}
            nlog = 0
        if not args.bench and ((n + 1) % args.eval_every == 0 or n + 1 == steps):
            tv = time.time()
            result = validate(n + 1 == steps)
            print(f"[val] step {n + 1}: {result} [{time.time() - tv:.0f}s]", flush=True)
            save(model, processor, args.out)
    finish(model, processor, args, t_train, t0)


def save(model, processor, out):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # also the stand-alone files older loaders look for
    processor.image_processor.save_pretrained(out)
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        vocab = processor.tokenizer.get_vocab()
        f.write("".join(w + "\n" for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])))


def finish(model, processor, args, t_train, t0):
    """The end of a training run: the model saved (unless --bench), and how long the loop and the run took."""
    train_s = time.time() - t_train
    if not args.bench:
        save(model, processor, args.out)
    print(
        f"[done] training loop {train_s:.0f}s ({train_s / 60:.1f} min); total wall time {time.time() - t0:.0f}s "
        f"({(time.time() - t0) / 60:.1f} min); saved to {args.out}",
        flush=True,
    )
