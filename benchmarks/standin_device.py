"""`python -m benchmarks.standin_device [celery worker options]`: the real worker on a stand-in accelerator.

Run in place of `python -m worker`. Everything is the worker as it runs in production (Celery, Redis, fetching,
decoding and resizing, the batcher) except its model call, `worker.inference.generate_texts`, which the worker looks
up at each call: here a stand-in device takes each model batch for a fixed time, BENCH_DEVICE_BATCH_MS milliseconds
(default 50), whatever its size, and answers STANDIN_ANSWER to every text. It waits with `time.sleep`, which releases
the GIL as a GPU kernel does, so that the worker's own Python runs meanwhile as it would beside a GPU. The stacking and
normalising of the batch's pixels, which `generate_texts` does on the device, is left out with the model.

A benchmark device, not a model: its answers are not answers, and its time is a setting, not a GPU's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import worker.inference
from worker.__main__ import main

BATCH_MS_VARIABLE = "BENCH_DEVICE_BATCH_MS"
DEFAULT_BATCH_MS = 50.0
STANDIN_ANSWER = "stand-in"


BATCH_S = float(os.environ.get(BATCH_MS_VARIABLE, DEFAULT_BATCH_MS)) / 1000  # the device's time per model batch


def standin_generate_texts(
    loaded: Any, pixels: list[Any], rows: list[int], texts: list[str], *args: Any, **kwargs: Any
) -> list[str]:
    """`generate_texts` on the stand-in device: one batch in a fixed time, an answer per text in the same order."""
    if not texts:
        return []
    time.sleep(BATCH_S)  # releases the GIL, as a GPU kernel's wait does
    return [STANDIN_ANSWER] * len(texts)


worker.inference.generate_texts = standin_generate_texts  # the worker looks it up at each call

if __name__ == "__main__":
    main()
