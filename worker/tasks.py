"""The tasks a worker runs, registered on its Celery app: each is thin glue around the worker's runtime.

A worker runs Celery's thread pool: each message it holds (a job, or a chunk of a batch's items) has a thread that
starts the jobs, fetches and decodes the images (in parallel with the other threads, and with the model), and hands
them to the worker's one Batcher (worker/batching.py), which answers pending texts of many messages in one
`generate`. The thread then records each outcome and returns, and only then is the message acknowledged. The paths:
worker/single_jobs.py (a job) and worker/chunks.py (a chunk); what they share: worker/runtime.py.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from contract.broker import TASK_VQA, TASK_VQA_CHUNK
from worker.chunks import run_chunk
from worker.runtime import WorkerRuntime
from worker.single_jobs import run_job


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register the tasks a worker runs; each is thin glue around `runtime`."""
    runtime.celery = app

    @app.task(name=TASK_VQA, ignore_result=True)  # type: ignore[untyped-decorator]
    def answer_vqa_job(payload: dict[str, str]) -> dict[str, str]:
        return run_job(runtime, payload)

    @app.task(name=TASK_VQA_CHUNK, ignore_result=True)  # type: ignore[untyped-decorator]
    def answer_vqa_chunk(payload: dict[str, Any]) -> dict[str, Any]:
        return run_chunk(runtime, payload)
