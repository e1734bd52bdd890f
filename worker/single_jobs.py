"""The single-job path: one message, one job (a question on an image); its run is recorded on the job's record.

A task thread starts the job (the start script: it may say the job must not run), loads and decodes its image,
hands the question to the worker's batcher, and records the answer or the failure. Bad input fails the job, never the
worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from contract.errors import BlipqError
from contract.fleet import worker_identity
from contract.states import JobPriority
from contract.transitions import START_CANCELED, START_ENDED, START_EXPIRED, START_GAVE_UP, START_MISSING, START_PENDING
from worker.runtime import PENDING_WAIT_S, WorkerRuntime, when_accepted

log = logging.getLogger("blipq.worker")

# The start script's answers for a job that is not run: how it is logged, and what the task returns.
NOT_RUN: dict[int, tuple[int, str, dict[str, str]]] = {
    START_MISSING: (logging.WARNING, "job %s expired before it ran; skipped", {"status": "expired"}),
    # Delivered again after it ended: its answer stands, the model is not run again.
    START_ENDED: (logging.INFO, "job %s already ended; not run again", {"status": "duplicate"}),
    START_CANCELED: (logging.INFO, "job %s was canceled; not run", {"status": "canceled"}),
    START_EXPIRED: (
        logging.INFO,
        "job %s was still queued at its deadline; not run",
        {"status": "expired", "code": "deadline_exceeded"},
    ),
    START_PENDING: (
        logging.WARNING,
        f"job %s was not accepted within {PENDING_WAIT_S:g} s; if it is, the reaper publishes it again",
        {"status": "pending"},
    ),
}


def run_job(runtime: WorkerRuntime, payload: dict[str, str]) -> dict[str, str]:
    """Answer one job and record the outcome; bad input fails the job, never the worker."""
    job_id = payload["job_id"]
    runtime.load_model()
    skipped = _begin(runtime, job_id, job_priority(payload))
    runtime.release_held()
    if skipped is not None:
        return skipped
    deadline = time.monotonic() + runtime.job_limit_s
    try:
        runtime.check_task(payload)
        assert runtime.batcher is not None
        with runtime.batcher.expect(1) as expected:
            texts = [payload["question"]]
            image = runtime.prepare_image(job_id, payload.get("image_url", ""), "", texts)
            [future] = image.cached_or_submit(runtime.batcher, texts, expected=expected)
        answer = runtime.await_answer(future, deadline)
        image.keep(runtime.cache, {0: answer})
    except BlipqError as exc:
        return _fail(runtime, job_id, exc.code, exc.message)
    except Exception as exc:  # a bug or a model error: fail this job, keep the worker
        log.exception("job %s failed unexpectedly", job_id, extra={"job_id": job_id})
        return _fail(runtime, job_id, "internal_error", f"the worker could not answer: {type(exc).__name__}")
    return _succeed(runtime, job_id, answer)


def _succeed(runtime: WorkerRuntime, job_id: str, answer: str) -> dict[str, str]:
    if not runtime.store.mark_succeeded(job_id, answer):
        log.warning(
            "job %s had ended while this run went on; its answer stands, this one is dropped",
            job_id,
            extra={"job_id": job_id},
        )
    return {"status": "succeeded", "answer": answer}


def _fail(runtime: WorkerRuntime, job_id: str, code: str, message: str) -> dict[str, str]:
    runtime.store.mark_failed(job_id, code, message)
    log.info("job %s failed: %s %s", job_id, code, message, extra={"job_id": job_id, "error_code": code})
    return {"status": "failed", "code": code}


def _begin(runtime: WorkerRuntime, job_id: str, priority: JobPriority) -> dict[str, str] | None:
    """Record the start of a run; the outcome when the job must not run (expired, ended, canceled, given up)."""
    settings = runtime.settings
    attempt = when_accepted(
        lambda: runtime.store.begin_run(
            job_id, settings.queue, settings.model, worker_identity(), settings.max_attempts, priority
        )
    )
    return _start_outcome(job_id, attempt, settings.max_attempts)


def _start_outcome(job_id: str, attempt: int, max_attempts: int) -> dict[str, str] | None:
    """What the start script's answer means for the job: None when it runs, else its outcome."""
    extra = {"job_id": job_id}
    if attempt in NOT_RUN:
        level, message, outcome = NOT_RUN[attempt]
        log.log(level, message, job_id, extra=extra)
        return outcome
    if attempt == START_GAVE_UP:
        log.error(
            "job %s failed: worker_lost (its worker died %d times)",
            job_id,
            max_attempts,
            extra={**extra, "error_code": "worker_lost"},
        )
        return {"status": "failed", "code": "worker_lost"}
    if attempt > 1:
        log.warning("job %s: attempt %d (a worker died while running it)", job_id, attempt, extra=extra)
    return None


def job_priority(payload: Mapping[str, Any]) -> JobPriority:
    """The priority level a task message names; normal for a message from before priorities (or a bad one)."""
    try:
        return JobPriority(payload.get("priority") or JobPriority.NORMAL)
    except ValueError:
        return JobPriority.NORMAL
