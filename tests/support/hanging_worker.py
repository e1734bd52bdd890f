"""`python -m tests.support.hanging_worker`: the real worker, whose model call never returns for one question.

Everything else is the worker as it runs in production; only the model call is replaced, so that a test can reach
what happens when a device hangs: the job's time limit, then the watchdog that ends the worker.
"""

from __future__ import annotations

import threading
from typing import Any

import worker.inference
from worker.__main__ import main

HANGING_QUESTION = "does this question hang the model?"
_real_generate_texts = worker.inference.generate_texts


def generate_texts(loaded: Any, pixels: Any, rows: list[int], texts: list[str], *args: Any, **kwargs: Any) -> Any:
    if HANGING_QUESTION in texts:
        threading.Event().wait()  # a hung device: the call never returns
    return _real_generate_texts(loaded, pixels, rows, texts, *args, **kwargs)


worker.inference.generate_texts = generate_texts  # the worker looks it up at each call

if __name__ == "__main__":
    main()
