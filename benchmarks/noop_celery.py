"""A bare Celery no-op task with blipq's own Celery configuration: the baseline the benchmarks divide by.

BENCH_REDIS_URL=redis://... celery -A benchmarks.noop_celery worker --pool=prefork --concurrency=1 -Q noop
"""

from __future__ import annotations

import os

from contract.broker import create_celery

QUEUE = "noop"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = create_celery(REDIS_URL, QUEUE)
# blipq keeps no results in Celery; a round trip (`delay` + `get`) needs a result backend, so the baseline has one.
app.conf.update(result_backend=REDIS_URL, task_ignore_result=False, result_serializer="json")


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Nothing: what is measured is Celery's and Redis's round trip."""
