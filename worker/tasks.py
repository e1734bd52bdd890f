"""Celery glue around the inference core: the model loads once per worker; task threads feed its batcher.

A worker runs Celery's thread pool: each message it holds (a job, or a chunk of a batch's items) has a thread that
starts the jobs, fetches and decodes the images (in parallel with the other threads, and with the model), and hands
them to the worker's one Batcher (worker/batching.py), which answers pending texts of many messages in one
`generate`. The thread then records each outcome and returns, and only then is the message acknowledged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import after_setup_logger

from contract.batch_scripts import SKIPPED
from contract.batch_store import BatchStore
from contract.batches import outcome_value
from contract.broker import SOFT_LIMIT_MARGIN_S, TASK_VQA, TASK_VQA_CHUNK
from contract.errors import BlipqError, JobTimeoutError, SettingsError, UploadMissingError, WrongTaskError
from contract.fleet import worker_identity
from contract.images import open_image, picture_for_model, resized_for_model
from contract.job_store import JobStore
from contract.states import JobPriority, JobStatus
from contract.transitions import (
    START_CANCELED,
    START_ENDED,
    START_EXPIRED,
    START_GAVE_UP,
    START_MISSING,
    START_PENDING,
)
from worker.batching import Batcher, Expected, Output
from worker.cache import AnswerCache, PreparedImage, answer_cache_for
from worker.decoders import IN_THREAD_PIXELS, DecoderPool
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.metrics import CURRENT_JOB, observe_inference
from worker.netguard import NetworkPolicy
from worker.settings import WorkerSettings
from worker.stages import stage

if TYPE_CHECKING:  # torch is imported when the model loads, not when the API imports this package
    import numpy as np
    import numpy.typing as npt
    import requests
    import torch

    from worker.inference import LoadedModel

log = logging.getLogger("blipq.worker")

REDIS_OUTAGE_S = 60.0  # how long a worker's job-record writes keep retrying while Redis is away (a restart)
# A message can arrive before the API accepted its job (it publishes, then accepts: contract/transitions.py): the
# start is asked again, sooner first, for this long. A job accepted later still (an API stalled that long) is left to
# the reaper, which publishes it again.
PENDING_WAIT_S = 3.0


class WorkerRuntime:
    """What a worker holds for its whole life: the resident model and its batcher, a Redis store, HTTP sessions."""

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
        # A job that has not ended this long after it started fails `timeout` (its fetch has shorter deadlines).
        self.job_limit_s = max(1, settings.job_time_limit_s - SOFT_LIMIT_MARGIN_S)
        self.loaded: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.fetchers = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="blipq-fetch")
        self.decoders: DecoderPool | None = None
        self._store: JobStore | None = None
        self._batches: BatchStore | None = None
        self._cache: AnswerCache | None = None
        # One for all the worker's threads: its pools are thread-safe and bounded, and it keeps no cookie.
        self._session = new_session(self.network_policy, keepalive_s=settings.fetch_keepalive_s)
        self._start_lock = threading.Lock()

    def start(self, **_signal_kwargs: Any) -> None:
        """Load the model and start its batcher (connected to `worker_init`: before the worker takes messages)."""
        with self._start_lock:
            if self.loaded is not None:
                return
            import torch

            from worker.inference import load_model

            settings = self.settings
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            if settings.decode_processes:  # started first: they import Pillow while the model loads
                self.decoders = DecoderPool(settings.decode_processes).start()
            started = time.monotonic()
            try:
                self.loaded = load_model(settings.model, settings.device, settings.dtype)
            except SettingsError as exc:  # a device this machine lacks: no worker at all, rather than failed jobs
                log.critical("%s", exc.message)
                raise SystemExit(f"blipq worker: {exc.message}") from None
            load_s, model = time.monotonic() - started, self.loaded
            loaded = (
                "model %s (%s) loaded on %s as %s in %.1f s",
                settings.model,
                model.task,
                model.device,
                model.dtype,
                load_s,
            )
            # Celery sends `worker_init`, where the model loads, before it sets up logging: the line is written once
            # it has. (Loaded later, by a job, the line is written at once; the signal has been sent by then.)
            log.info(*loaded)
            after_setup_logger.connect(lambda **_: log.info(*loaded), weak=False)
            self._cache = answer_cache_for(self.store.client, self.loaded, settings)
            self.batcher = Batcher(
                self._generate,
                settings.batch_max_size,
                settings.batch_max_wait_ms / 1000,
                hard_limit_s=settings.job_time_limit_s,
                admit=self.batches.run_items,
            ).start()

    def stop(self, **_signal_kwargs: Any) -> None:
        """Connected to `worker_shutdown` (the pool has stopped): let the model finish its call, then stop."""
        self.fetchers.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.stop(timeout_s=self.settings.job_time_limit_s)
        if self.decoders is not None:
            self.decoders.close()

    def _generate(self, pixels: list[torch.Tensor], rows: list[int], texts: list[str]) -> list[str]:
        """The batcher's model call."""
        from worker.inference import generate_texts

        assert self.loaded is not None
        settings = self.settings
        with observe_inference(questions=len(texts)), stage("model"):
            return generate_texts(self.loaded, pixels, rows, texts, settings.max_new_tokens, settings.num_beams)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            settings = self.settings
            # Writes retry across a Redis restart (for REDIS_OUTAGE_S): an answer is recorded, not lost.
            self._store = JobStore.connect(settings.redis, settings.job_ttl_s, outage_s=REDIS_OUTAGE_S)
        return self._store

    @property
    def cache(self) -> AnswerCache:
        assert self._cache is not None, "the answer cache is made when the model loads"
        return self._cache

    @property
    def batches(self) -> BatchStore:
        if self._batches is None:
            self._batches = BatchStore(self.store)
        return self._batches

    @property
    def session(self) -> requests.Session:
        """The guarded HTTP session that fetches images, shared by all of the worker's threads."""
        return self._session

    def run_job(self, payload: dict[str, str]) -> dict[str, str]:
        """Answer one job and record the outcome; bad input fails the job, never the worker."""
        job_id = payload["job_id"]
        self.start()
        skipped = self._begin(job_id, job_priority(payload))
        if skipped is not None:
            return skipped
        deadline = time.monotonic() + self.job_limit_s
        try:
            self._check_task(payload)
            assert self.batcher is not None
            with self.batcher.expect(1) as expected:
                texts = [payload["question"]]
                image = self._prepare(job_id, payload.get("image_url", ""), "", texts)
                [future] = image.cached_or_submit(self.batcher, texts, expected=expected)
            answer = self._result(future, deadline)
            image.keep(self.cache, {0: answer})
        except BlipqError as exc:
            return self._fail(job_id, exc.code, exc.message)
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
        """Answer a chunk of a batch's items (see contract/batches.py): one script call starts it, one ends it.

        The chunk's images are fetched and decoded in parallel by the fetch threads, each once for all its questions,
        and each goes to the batcher as soon as it is ready; its items become running only when the model takes them
        (a batch canceled meanwhile runs none of them). A fetch or decode error fails that image's items only. A chunk
        delivered again (its worker died) answers the items that had not ended. Returns the chunk's outcome counts.
        """
        self.start()
        settings = self.settings
        batch_id = str(payload.get("batch_id", ""))
        attempt = when_accepted(
            lambda: self.batches.start_chunk(
                payload, settings.queue, worker_identity(), settings.max_attempts, settings.model
            )
        )
        if attempt < 1:
            return {"batch_id": batch_id, "skipped": attempt}
        deadline = time.monotonic() + self.job_limit_s
        outcomes: list[list[str]] = []
        try:
            self._check_task(payload)
        except WrongTaskError as exc:
            outcomes = [
                [str(index), *outcome_value(JobStatus.FAILED, code=exc.code, message=exc.message)]
                for image in payload.get("images", [])
                for index, _ in image.get("items", [])
            ]
        else:
            assert self.batcher is not None
            prepared: dict[tuple[int, ...], PreparedImage] = {}
            with self.batcher.expect(len(payload.get("images", []))) as expected:
                answers = self._load_and_submit(payload, deadline, outcomes, prepared, expected)
            for index, future in answers:
                outcomes.append([str(index), *self._chunk_outcome(future, deadline)])
            self._keep_answers(prepared, outcomes)
        self.batches.end_chunk(payload, settings.queue, outcomes)
        counts: dict[str, int] = {}
        for _, status, code, _ in outcomes:
            counts[f"{status}:{code}"] = counts.get(f"{status}:{code}", 0) + 1
        return {"batch_id": batch_id, "outcomes": counts}

    def _chunk_outcome(self, future: Future[Output], deadline: float) -> list[str]:
        """An item's outcome for the end script: its answer, its failure, or `skipped` (its batch closed)."""
        try:
            return outcome_value(JobStatus.SUCCEEDED, answer=self._result(future, deadline))
        except CancelledError:
            return [SKIPPED, "", ""]
        except BlipqError as exc:
            return outcome_value(JobStatus.FAILED, code=exc.code, message=exc.message)
        except Exception as exc:  # a model error: fail these items, keep the worker
            message = f"the worker could not answer: {type(exc).__name__}"
            return outcome_value(JobStatus.FAILED, code="internal_error", message=message)

    def _load_and_submit(
        self,
        payload: dict[str, Any],
        deadline: float,
        outcomes: list[list[str]],
        prepared: dict[tuple[int, ...], PreparedImage],
        expected: Expected,
    ) -> list[tuple[int, Future[Output]]]:
        """Load a chunk's images in the fetch threads and submit each, as it is ready, with its questions.

        Returns (item index, future) for every text submitted (a cached answer's future is resolved already); an
        item whose image failed, or was still loading at the deadline, gets its failure in `outcomes`. `prepared`
        receives each image loaded, by its items' indices, to keep its new answers in the cache.
        """
        assert self.batcher is not None
        batch_id = str(payload.get("batch_id", ""))
        images = payload.get("images", [])
        # A chunk's uploaded images come in one read (MGET), not one round trip each from the fetch threads.
        upload_keys = [str(image["upload"]) for image in images if image.get("upload")]
        uploads = dict(zip(upload_keys, self.store.load_uploads(upload_keys), strict=True)) if upload_keys else {}
        loads = {
            self.fetchers.submit(
                self._prepare,
                "",
                str(image.get("image_url", "")),
                str(image.get("upload", "")),
                [str(text) for _, text in image.get("items", [])],
                uploads,
            ): [(int(index), str(text)) for index, text in image.get("items", [])]
            for image in images
        }
        answers: list[tuple[int, Future[Output]]] = []

        def fail(pairs: list[tuple[int, str]], code: str, message: str) -> None:
            expected.settle()
            outcomes.extend([str(i), *outcome_value(JobStatus.FAILED, code=code, message=message)] for i, _ in pairs)

        try:
            for load in as_completed(loads, timeout=max(0.0, deadline - time.monotonic())):
                pairs = loads.pop(load)
                try:
                    image = load.result()
                except BlipqError as exc:
                    fail(pairs, exc.code, exc.message)
                    continue
                except Exception as exc:
                    log.exception("an image of batch %s failed unexpectedly", batch_id)
                    fail(pairs, "internal_error", f"the worker could not answer: {type(exc).__name__}")
                    continue
                indices = [index for index, _ in pairs]
                futures = image.cached_or_submit(
                    self.batcher, [text for _, text in pairs], (batch_id, indices), expected
                )
                answers += zip(indices, futures, strict=True)
                prepared[tuple(indices)] = image
        except TimeoutError:  # images still loading at the limit: their items fail `timeout`
            for load, pairs in loads.items():
                load.cancel()
                fail(pairs, "timeout", self._timeout_message())
        return answers

    def _result(self, future: Future[Output], deadline: float) -> str:
        """The batcher's output for one text, or JobTimeoutError once the job's time is up (it is then not answered)."""
        try:
            output = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()  # still queued: the batcher skips it
            raise JobTimeoutError(self._timeout_message()) from None
        if output.call not in CURRENT_JOB.calls:  # texts of one chunk often share a call: counted once
            CURRENT_JOB.calls.add(output.call)
            CURRENT_JOB.model_s += output.model_s
        return output.text

    def _timeout_message(self) -> str:
        return f"the job ran past its time limit of {self.job_limit_s} s"

    def _check_task(self, payload: Mapping[str, Any]) -> None:
        """Refuse a job for a task this worker's model does not do (a message sent to the wrong queue)."""
        assert self.loaded is not None
        task = str(payload.get("task") or "vqa")
        if task != self.loaded.task:
            raise WrongTaskError(
                f"this worker's model does {self.loaded.task}, the job asks for {task}: it was sent to the wrong queue"
            )

    def _begin(self, job_id: str, priority: JobPriority) -> dict[str, str] | None:
        """Record the start of a run; the outcome when the job must not run (expired, ended, canceled, given up)."""
        settings = self.settings
        attempt = when_accepted(
            lambda: self.store.start(
                job_id, settings.queue, settings.model, worker_identity(), settings.max_attempts, priority
            )
        )
        return self._start_outcome(job_id, attempt)

    def _start_outcome(self, job_id: str, attempt: int) -> dict[str, str] | None:
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
                self.settings.max_attempts,
                extra={**extra, "error_code": "worker_lost"},
            )
            return {"status": "failed", "code": "worker_lost"}
        if attempt > 1:
            log.warning("job %s: attempt %d (a worker died while running it)", job_id, attempt, extra=extra)
        return None

    def _fail(self, job_id: str, code: str, message: str) -> dict[str, str]:
        self.store.mark_failed(job_id, code, message)
        log.info("job %s failed: %s %s", job_id, code, message, extra={"job_id": job_id, "error_code": code})
        return {"status": "failed", "code": code}

    def _keep_answers(self, prepared: dict[tuple[int, ...], PreparedImage], outcomes: list[list[str]]) -> None:
        """Keep a chunk's new answers in the cache, in one call."""
        answers = {int(index): json.loads(value)[1] for index, status, _, value in outcomes if status == "succeeded"}
        new: dict[str, str] = {}
        for indices, image in prepared.items():
            new |= image.new_answers({n: answers[i] for n, i in enumerate(indices) if i in answers})
        self.cache.store(new)

    def _prepare(
        self,
        job_id: str,
        image_url: str,
        upload_key: str,
        texts: list[str],
        uploads: Mapping[str, bytes | None] | None = None,
    ) -> PreparedImage:
        """Load an image (fetched, or an upload: from `uploads` when it was read already), look its texts up in the
        answer cache, and decode it for the model (contract.images.decode_for_model: as far as the model's
        input needs, or in full with BLIPQ_IMAGE_DECODE=exact) unless every answer was cached; fetched in the calling
        thread, decoded in a decoder process (worker/decoders.py) or, with none, in the calling thread."""
        from worker.inference import image_tensor

        with stage("fetch"):
            data = self._image_bytes(job_id, image_url, upload_key, uploads)
        keys = self.cache.keys(data, texts)
        cached = self.cache.lookup(keys)
        if all(answer is not None for answer in cached):
            # Not decoded, but held to this worker's limits all the same: its header (the format and the pixel
            # count) is read, as a decode would first, and refused as a decode would refuse it.
            open_image(data, self.limits.max_pixels)
            return PreparedImage(keys, cached, None)
        return PreparedImage(keys, cached, image_tensor(self._decode(data)))

    def _decode(self, data: bytes) -> npt.NDArray[np.uint8]:
        """An image's bytes as the model's uint8 input: in a decoder process, or in this thread when there are none or
        the picture is small (decoders.IN_THREAD_PIXELS)."""
        loaded = self.loaded
        assert loaded is not None
        exact = self.settings.image_decode == "exact"
        if self.decoders is not None:
            header = open_image(data, self.limits.max_pixels)  # refused here as a decoder would refuse it
            if header.width * header.height > IN_THREAD_PIXELS:
                return self.decoders.decode(data, loaded.image_size, loaded.resample, self.limits.max_pixels, exact)
        with stage("decode"):
            picture = picture_for_model(data, loaded.image_size, self.limits.max_pixels, exact)
        with stage("resize"):
            return resized_for_model(picture, loaded.image_size, loaded.resample)

    def _image_bytes(
        self, job_id: str, image_url: str, upload_key: str, uploads: Mapping[str, bytes | None] | None
    ) -> bytes:
        """The image's bytes: fetched from `image_url`, or the upload (a batch's at `upload_key`, else the job's)."""
        if image_url:
            return fetch_image_bytes(self.session, image_url, self.limits)
        upload = uploads[upload_key] if uploads is not None and upload_key in uploads else None
        if upload is None:
            upload = self.store.load_upload(job_id, upload_key)
        if upload is None:
            raise UploadMissingError("the uploaded image is no longer stored (it expired before the job ran)")
        return upload


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


def when_accepted(start: Callable[[], int]) -> int:
    """Call a start script until it says anything but START_PENDING, for up to PENDING_WAIT_S."""
    given_up_at, pause = time.monotonic() + PENDING_WAIT_S, 0.002
    while (attempt := start()) == START_PENDING and time.monotonic() < given_up_at:
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
    return attempt


def job_priority(payload: Mapping[str, Any]) -> JobPriority:
    """The priority level a task message names; normal for a message from before priorities (or a bad one)."""
    try:
        return JobPriority(payload.get("priority") or JobPriority.NORMAL)
    except ValueError:
        return JobPriority.NORMAL


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register the tasks a worker runs; each is thin glue around `runtime`."""

    @app.task(name=TASK_VQA, ignore_result=True)  # type: ignore[untyped-decorator]
    def answer_vqa_job(payload: dict[str, str]) -> dict[str, str]:
        return runtime.run_job(payload)

    @app.task(name=TASK_VQA_CHUNK, ignore_result=True)  # type: ignore[untyped-decorator]
    def answer_vqa_chunk(payload: dict[str, Any]) -> dict[str, Any]:
        return runtime.run_chunk(payload)
