"""Celery glue around the inference core: load the model once per pool process, answer a job or a chunk per task."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure

from worker.broker import TASK_VQA, TASK_VQA_CHUNK
from worker.errors import BlipqError, UploadMissingError
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.images import decode_image
from worker.jobs import JobStore
from worker.netguard import NetworkPolicy
from worker.settings import WorkerSettings
from worker.states import JobPriority
from worker.transitions import START_CANCELED, START_ENDED, START_EXPIRED, START_GAVE_UP, START_MISSING

if TYPE_CHECKING:  # torch is imported in the pool process only, after the fork
    import requests
    from PIL import Image

    from worker.inference import LoadedModel

log = logging.getLogger("blipq.worker")

REDIS_OUTAGE_S = 60.0  # how long a worker's job-record writes keep retrying while Redis is away (a restart)


class WorkerRuntime:
    """What one pool process holds for its whole life: the resident model, a Redis store, an HTTP session."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.limits = FetchLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            total_timeout_s=settings.fetch_timeout_s,
        )
        self.network_policy = NetworkPolicy(
            allow_networks=settings.fetch_allow_networks, allow_ports=settings.fetch_allow_ports
        )
        self.loaded: LoadedModel | None = None
        self._store: JobStore | None = None
        # Made here, not lazily: the session carries the network policy. It opens no socket before the fork.
        self.session: requests.Session = new_session(self.network_policy)

    def start(self, **_signal_kwargs: Any) -> None:
        """Load the model; connected to `worker_process_init`, so it runs in the pool process after the fork."""
        import torch

        from worker.inference import load_model

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        started = time.monotonic()
        self.loaded = load_model(self.settings.model, self.settings.device, self.settings.dtype)
        log.info(
            "model %s loaded on %s as %s in %.1f s",
            self.settings.model,
            self.loaded.device,
            self.loaded.dtype,
            time.monotonic() - started,
        )

    @property
    def store(self) -> JobStore:
        if self._store is None:
            settings = self.settings
            # Writes retry across a Redis restart (for REDIS_OUTAGE_S): an answer is recorded, not lost.
            self._store = JobStore.from_url(settings.redis_url, settings.job_ttl_s, outage_s=REDIS_OUTAGE_S)
        return self._store

    def run_job(self, payload: dict[str, str]) -> dict[str, str]:
        """Answer one job and record the outcome; bad input fails the job, never the worker."""
        job_id = payload["job_id"]
        if self.loaded is None:  # a solo pool has no worker_process_init: load on first use
            self.start()
        assert self.loaded is not None
        skipped = self._begin(job_id, job_priority(payload))
        if skipped is not None:
            return skipped
        try:
            image = self._load_image(job_id, payload.get("image_url", ""), payload.get("upload", ""))
            answer = self._answer(image, payload["question"])
        except BlipqError as exc:
            return self._fail(job_id, exc.code, exc.message)
        except SoftTimeLimitExceeded:
            return self._fail(
                job_id, "timeout", f"the job ran past its time limit of {self.settings.job_time_limit_s} s"
            )
        except Exception as exc:  # a bug or a model error: fail this job, keep the worker
            log.exception("job %s failed unexpectedly", job_id, extra={"job_id": job_id})
            return self._fail(job_id, "internal_error", f"the worker could not answer: {type(exc).__name__}")
        return self._succeed(job_id, answer)

    def _succeed(self, job_id: str, answer: str) -> dict[str, str]:
        if not self.store.mark_succeeded(job_id, answer):
            log.warning(
                "job %s had ended while this run went on; its answer stands, this one is dropped",
                job_id,
                extra={"job_id": job_id},
            )
        return {"status": "succeeded", "answer": answer}

    def run_chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer a chunk of a batch's items (see worker/batches.py); returns each job's outcome, as run_job's.

        Every job starts as a single job does (an ended, canceled or expired one is skipped); each image is fetched and
        decoded once for all its questions, and a fetch or decode error fails that image's jobs only; the questions
        are answered with one `answer_questions` call. A chunk delivered again (its pool process died) skips the jobs
        that ended and runs the rest.
        """
        if self.loaded is None:
            self.start()
        outcomes: list[dict[str, str]] = []
        started = self._begin_chunk(payload, outcomes)
        running = {job_id: question for _, pairs in started for job_id, question in pairs}  # not ended by this run
        try:
            images: list[Image.Image] = []
            job_ids: list[str] = []
            for (image_url, upload), pairs in started:
                try:
                    decoded = self._load_image("", image_url, upload)
                except BlipqError as exc:
                    for job_id, _ in pairs:
                        outcomes.append({"job_id": job_id, **self._fail(job_id, exc.code, exc.message)})
                        del running[job_id]
                    continue
                images += [decoded] * len(pairs)
                job_ids += [job_id for job_id, _ in pairs]
            answers = self._answer_many(images, [running[job_id] for job_id in job_ids]) if job_ids else []
            for job_id, answer in zip(job_ids, answers, strict=True):
                outcomes.append({"job_id": job_id, **self._succeed(job_id, answer)})
                del running[job_id]
        except SoftTimeLimitExceeded:
            message = f"the chunk of its batch ran past its time limit of {self.settings.job_time_limit_s} s"
            outcomes += [{"job_id": job_id, **self._fail(job_id, "timeout", message)} for job_id in running]
        except Exception as exc:  # a bug or a model error: fail these jobs, keep the worker
            log.exception("a chunk of batch %s failed unexpectedly", payload.get("batch_id"))
            message = f"the worker could not answer: {type(exc).__name__}"
            outcomes += [{"job_id": job_id, **self._fail(job_id, "internal_error", message)} for job_id in running]
        return {"batch_id": str(payload.get("batch_id", "")), "outcomes": outcomes}

    def _begin_chunk(
        self, payload: dict[str, Any], outcomes: list[dict[str, str]]
    ) -> list[tuple[tuple[str, str], list[tuple[str, str]]]]:
        """Start each job of a chunk as a single job starts; the images (URL, upload key) with the jobs that run.

        The outcome of each job that must not run (ended, canceled, expired, given up) is added to `outcomes`.
        """
        priority = job_priority(payload)
        started = []
        for image in payload.get("images", []):
            pairs = []
            for job_id, question in image.get("items", []):
                skipped = self._begin(str(job_id), priority)
                if skipped is None:
                    pairs.append((str(job_id), str(question)))
                else:
                    outcomes.append({"job_id": str(job_id), **skipped})
            if pairs:
                started.append(((str(image.get("image_url", "")), str(image.get("upload", ""))), pairs))
        return started

    def _begin(self, job_id: str, priority: JobPriority) -> dict[str, str] | None:
        """Record the start of a run; the outcome when the job must not run (expired, ended, canceled, given up)."""
        settings = self.settings
        attempt = self.store.start(
            job_id, settings.queue, settings.model, worker_identity(), settings.max_attempts, priority
        )
        if attempt == START_MISSING:
            log.warning("job %s expired before it ran; skipped", job_id, extra={"job_id": job_id})
            return {"status": "expired"}
        if attempt == START_ENDED:  # delivered again after it ended: its answer stands, the model is not run again
            log.info("job %s already ended; not run again", job_id, extra={"job_id": job_id})
            return {"status": "duplicate"}
        if attempt == START_CANCELED:
            log.info("job %s was canceled; not run", job_id)
            return {"status": "canceled"}
        if attempt == START_EXPIRED:
            log.info("job %s was still queued at its deadline; not run", job_id)
            return {"status": "expired", "code": "deadline_exceeded"}
        if attempt == START_GAVE_UP:
            log.error(
                "job %s failed: worker_lost (its worker died %d times)",
                job_id,
                self.settings.max_attempts,
                extra={"job_id": job_id, "error_code": "worker_lost"},
            )
            return {"status": "failed", "code": "worker_lost"}
        if attempt > 1:
            log.warning(
                "job %s: attempt %d (a worker died while running it)",
                job_id,
                attempt,
                extra={"job_id": job_id, "attempt": attempt},
            )
        return None

    def on_hard_time_limit(self, job_id: str) -> None:
        """Fail a job whose pool process was killed at the hard time limit (runs in the main process)."""
        message = f"the job ran past its hard time limit of {self.settings.job_time_limit_s} s"
        self._fail(job_id, "timeout", message)

    def _fail(self, job_id: str, code: str, message: str) -> dict[str, str]:
        self.store.mark_failed(job_id, code, message)
        log.info("job %s failed: %s %s", job_id, code, message, extra={"job_id": job_id, "error_code": code})
        return {"status": "failed", "code": code}

    def _load_image(self, job_id: str, image_url: str, upload_key: str = "") -> Image.Image:
        """Fetch the image at `image_url`, or read the upload (a batch's at `upload_key`, else the job's), decoded."""
        if image_url:
            data = fetch_image_bytes(self.session, image_url, self.limits)
        else:
            upload = self.store.load_upload(job_id, upload_key)
            if upload is None:
                raise UploadMissingError("the uploaded image is no longer stored (it expired before the job ran)")
            data = upload
        return decode_image(data, self.limits.max_pixels)

    def _answer(self, image: Image.Image, question: str) -> str:
        return self._answer_many([image], [question])[0]

    def _answer_many(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        from worker.inference import answer_questions
        from worker.metrics import observe_inference

        assert self.loaded is not None
        settings = self.settings
        with observe_inference(questions=len(questions)):
            return answer_questions(self.loaded, images, questions, settings.max_new_tokens, settings.num_beams)


def job_priority(payload: Mapping[str, Any]) -> JobPriority:
    """The priority level a task message names; normal for a message from before priorities (or a bad one)."""
    try:
        return JobPriority(payload.get("priority") or JobPriority.NORMAL)
    except ValueError:
        return JobPriority.NORMAL


def worker_identity() -> str:
    """Which process runs a job, recorded on it: host name and pool process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register the tasks a worker runs; each is thin glue around `runtime`."""

    @app.task(name=TASK_VQA)  # type: ignore[untyped-decorator]
    def answer_vqa_job(payload: dict[str, str]) -> dict[str, str]:
        return runtime.run_job(payload)

    @app.task(name=TASK_VQA_CHUNK)  # type: ignore[untyped-decorator]
    def answer_vqa_chunk(payload: dict[str, Any]) -> dict[str, Any]:
        return runtime.run_chunk(payload)

    def on_task_failure(sender: Any = None, exception: BaseException | None = None, args: Any = (), **_: Any) -> None:
        # Celery sends this from the main process when it killed a pool process at the hard time limit: the jobs
        # would otherwise stay `running` (the message is acknowledged, it will not come back). Ended ones stay ended.
        if isinstance(exception, TimeLimitExceeded) and args and isinstance(args[0], dict):
            for job_id in payload_job_ids(args[0]):
                runtime.on_hard_time_limit(job_id)

    task_failure.connect(on_task_failure, sender=answer_vqa_job, weak=False)
    task_failure.connect(on_task_failure, sender=answer_vqa_chunk, weak=False)


def payload_job_ids(payload: dict[str, Any]) -> list[str]:
    """The ids of the jobs a task message names: a single job's, or every job of a batch's chunk."""
    if "images" in payload:
        return [str(job_id) for image in payload["images"] for job_id, _ in image.get("items", [])]
    return [str(payload.get("job_id", ""))]
