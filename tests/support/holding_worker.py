"""`python -m tests.support.holding_worker`: the real worker, whose model call for one question waits for the test.

Everything else is the worker as it runs in production; only the model call is wrapped: a call that has
HOLDING_QUESTION among its texts waits until the test pushes on RELEASE_KEY (in the worker's own Redis), so that a
test can act on a job or batch item while the model is answering it.
"""

from __future__ import annotations

import os
from typing import Any

import redis

import worker.inference
from worker.__main__ import main

HOLDING_QUESTION = "is this question held by the model?"
RELEASE_KEY = "blipq-test:release-model"  # a list: each push lets one held call go on
_real_generate_texts = worker.inference.generate_texts


def generate_texts(loaded: Any, pixels: Any, rows: list[int], texts: list[str], *args: Any, **kwargs: Any) -> Any:
    if HOLDING_QUESTION in texts:
        # No socket timeout: redis-py's default (5 s) would end the wait, and fail the held call, before the test
        # lets it go on a busy machine.
        client = redis.Redis.from_url(os.environ["BLIPQ_REDIS_URL"], socket_timeout=None)
        client.blpop([RELEASE_KEY])
        client.close()
    return _real_generate_texts(loaded, pixels, rows, texts, *args, **kwargs)


worker.inference.generate_texts = generate_texts  # the worker looks it up at each call

if __name__ == "__main__":
    main()
