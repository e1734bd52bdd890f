"""What a worker holds for its whole life: the resident model and its batcher, Redis stores, HTTP sessions, pools.

Both of a worker's paths (worker/single_jobs.py: a job; worker/chunks.py: a chunk of a batch's items) use it: it loads
the model once (before the worker takes messages, or inside its first job), and offers the steps they share: load an
image for the model, wait for an answer within a job's time, refuse a job for another model's task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import after_setup_logger

from contract.batch_store import BatchStore
from contract.broker import SOFT_LIMIT_MARGIN_S
from contract.errors import JobTimeoutError, SettingsError, UploadMissingError, WrongTaskError
from contract.fair_share import release_quietly
from contract.images import open_image, picture_for_model, resized_for_model
from contract.job_store import JobStore
from contract.transitions import START_PENDING
from worker.batching import Batcher, Output
from worker.cache import AnswerCache, PreparedImage, answer_cache_for
from worker.decoders import IN_THREAD_PIXELS, DecoderPool
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.metrics import CURRENT_JOB, observe_inference
from worker.netguard import NetworkPolicy
from worker.releaser import Releaser
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
        self._load_lock = threading.Lock()
        self.celery: Celery | None = None  # the worker's app, once its tasks are registered: it publishes releases
        self.releaser: Releaser | None = None
        self._releaser_lock = threading.Lock()

    def load_model(self, **_signal_kwargs: Any) -> None:
        """Load the model and start its batcher (connected to `worker_init`: before the worker takes messages)."""
        with self._load_lock:
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
        if self.releaser is not None:
            self.releaser.stop()
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

    def release_held(self) -> None:
        """After a message's start (which made room in the queue's window): have the held work that room allows
        released, in fair order (contract/fair_share.py), by the worker's releaser thread (worker/releaser.py)."""
        if self.celery is None:
            return
        with self._releaser_lock:
            if self.releaser is None:
                celery, queue = self.celery, self.settings.queue
                self.releaser = Releaser(lambda: release_quietly(self.store, celery, queue))
                self.releaser.start()
        self.releaser.soon()

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

    def await_answer(self, future: Future[Output], deadline: float) -> str:
        """The batcher's output for one text, or JobTimeoutError once the job's time is up (it is then not answered)."""
        try:
            output = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()  # still queued: the batcher skips it
            raise JobTimeoutError(self.timeout_message()) from None
        if output.call not in CURRENT_JOB.calls:  # texts of one chunk often share a call: counted once
            CURRENT_JOB.calls.add(output.call)
            CURRENT_JOB.model_s += output.model_s
        return output.text

    def timeout_message(self) -> str:
        return f"the job ran past its time limit of {self.job_limit_s} s"

    def check_task(self, payload: Mapping[str, Any]) -> None:
        """Refuse a job for a task this worker's model does not do (a message sent to the wrong queue)."""
        assert self.loaded is not None
        task = str(payload.get("task") or "vqa")
        if task != self.loaded.task:
            raise WrongTaskError(
                f"this worker's model does {self.loaded.task}, the job asks for {task}: it was sent to the wrong queue"
            )

    def prepare_image(
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


def when_accepted(start: Callable[[], int]) -> int:
    """Call a start script until it says anything but START_PENDING, for up to PENDING_WAIT_S."""
    given_up_at, pause = time.monotonic() + PENDING_WAIT_S, 0.002
    while (attempt := start()) == START_PENDING and time.monotonic() < given_up_at:
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
    return attempt
