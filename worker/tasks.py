"""Celery glue around the inference core: load the model once per pool process, answer one job per task."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Celery

from worker.errors import BlipqError, UploadMissingError
from worker.images import FetchLimits, decode_image, fetch_image_bytes, new_session
from worker.jobs import TASK_VQA, JobStore
from worker.settings import WorkerSettings

if TYPE_CHECKING:  # torch is imported in the pool process only, after the fork
    import requests
    from PIL import Image

    from worker.inference import LoadedModel

log = logging.getLogger("blipq.worker")


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
        self.loaded: LoadedModel | None = None
        self._store: JobStore | None = None
        self._session: requests.Session | None = None

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
            self._store = JobStore.from_url(self.settings.redis_url, self.settings.job_ttl_s)
        return self._store

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = new_session()
        return self._session

    def run_job(self, payload: dict[str, str]) -> dict[str, str]:
        """Answer one job and record the outcome; bad input fails the job, never the worker."""
        job_id = payload["job_id"]
        if self.loaded is None:  # a solo pool has no worker_process_init: load on first use
            self.start()
        assert self.loaded is not None
        moved = self.store.mark_running(job_id, self.settings.model)
        if moved < 0:
            log.warning("job %s expired before it ran; skipped", job_id)
            return {"status": "expired"}
        if moved == 0:  # delivered again after it ended: its answer stands, the model is not run again
            log.info("job %s already ended; not run again", job_id)
            return {"status": "duplicate"}
        try:
            image = self._load_image(job_id, payload.get("image_url", ""))
            answer = self._answer(image, payload["question"])
        except BlipqError as exc:
            self.store.mark_failed(job_id, exc.code, exc.message)
            log.info("job %s failed: %s %s", job_id, exc.code, exc.message)
            return {"status": "failed", "code": exc.code}
        except Exception as exc:  # a bug or a model error: fail this job, keep the worker
            log.exception("job %s failed unexpectedly", job_id)
            self.store.mark_failed(job_id, "internal_error", f"the worker could not answer: {type(exc).__name__}")
            return {"status": "failed", "code": "internal_error"}
        self.store.mark_succeeded(job_id, answer)
        return {"status": "succeeded", "answer": answer}

    def _load_image(self, job_id: str, image_url: str) -> Image.Image:
        if image_url:
            data = fetch_image_bytes(self.session, image_url, self.limits)
        else:
            upload = self.store.load_upload(job_id)
            if upload is None:
                raise UploadMissingError("the uploaded image is no longer stored (it expired before the job ran)")
            data = upload
        return decode_image(data, self.limits.max_pixels)

    def _answer(self, image: Image.Image, question: str) -> str:
        from worker.inference import answer_questions

        assert self.loaded is not None
        settings = self.settings
        return answer_questions(self.loaded, [image], [question], settings.max_new_tokens, settings.num_beams)[0]


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register the tasks a worker runs; each is thin glue around `runtime`."""

    @app.task(name=TASK_VQA)  # type: ignore[untyped-decorator]
    def answer_vqa_job(payload: dict[str, str]) -> dict[str, str]:
        return runtime.run_job(payload)
