"""The chunk path: one message holds a chunk of a batch's items (see contract/batches.py), images with their questions.

One script call starts the chunk and one ends it, with every item's outcome; in between, the chunk's images are
loaded in parallel by the worker's fetch threads and each goes to the batcher as soon as it is ready.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import CancelledError, Future, as_completed
from typing import Any

from contract.batch_scripts import SKIPPED
from contract.batches import outcome_value
from contract.errors import BlipqError, WrongTaskError
from contract.fleet import worker_identity
from contract.states import JobStatus
from worker.batching import Expected, Output
from worker.cache import PreparedImage
from worker.runtime import WorkerRuntime, when_accepted

log = logging.getLogger("blipq.worker")


def run_chunk(runtime: WorkerRuntime, payload: dict[str, Any]) -> dict[str, Any]:
    """Answer a chunk of a batch's items (see contract/batches.py): one script call starts it, one ends it.

    The chunk's images are fetched and decoded in parallel by the fetch threads, each once for all its questions,
    and each goes to the batcher as soon as it is ready; its items become running only when the model takes them
    (a batch canceled meanwhile runs none of them). A fetch or decode error fails that image's items only. A chunk
    delivered again (its worker died) answers the items that had not ended. Returns the chunk's outcome counts.
    """
    runtime.load_model()
    settings = runtime.settings
    batch_id = str(payload.get("batch_id", ""))
    attempt = when_accepted(
        lambda: runtime.batches.start_chunk(
            payload, settings.queue, worker_identity(), settings.max_attempts, settings.model
        )
    )
    runtime.release_held()
    if attempt < 1:
        return {"batch_id": batch_id, "skipped": attempt}
    deadline = time.monotonic() + runtime.job_limit_s
    outcomes: list[list[str]] = []
    try:
        runtime.check_task(payload)
    except WrongTaskError as exc:
        outcomes = [
            [str(index), *outcome_value(JobStatus.FAILED, code=exc.code, message=exc.message)]
            for image in payload.get("images", [])
            for index, _ in image.get("items", [])
        ]
    else:
        assert runtime.batcher is not None
        prepared: dict[tuple[int, ...], PreparedImage] = {}
        with runtime.batcher.expect(len(payload.get("images", []))) as expected:
            answers = _load_and_submit(runtime, payload, deadline, outcomes, prepared, expected)
        for index, future in answers:
            outcomes.append([str(index), *_item_outcome(runtime, future, deadline)])
        _keep_answers(runtime, prepared, outcomes)
    runtime.batches.end_chunk(payload, settings.queue, outcomes)
    counts: dict[str, int] = {}
    for _, status, code, _ in outcomes:
        counts[f"{status}:{code}"] = counts.get(f"{status}:{code}", 0) + 1
    return {"batch_id": batch_id, "outcomes": counts}


def _item_outcome(runtime: WorkerRuntime, future: Future[Output], deadline: float) -> list[str]:
    """An item's outcome for the end script: its answer, its failure, or `skipped` (its batch closed)."""
    try:
        return outcome_value(JobStatus.SUCCEEDED, answer=runtime.await_answer(future, deadline))
    except CancelledError:
        return [SKIPPED, "", ""]
    except BlipqError as exc:
        return outcome_value(JobStatus.FAILED, code=exc.code, message=exc.message)
    except Exception as exc:  # a model error: fail these items, keep the worker
        message = f"the worker could not answer: {type(exc).__name__}"
        return outcome_value(JobStatus.FAILED, code="internal_error", message=message)


def _load_and_submit(
    runtime: WorkerRuntime,
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
    assert runtime.batcher is not None
    batch_id = str(payload.get("batch_id", ""))
    images = payload.get("images", [])
    # A chunk's uploaded images come in one read (MGET), not one round trip each from the fetch threads.
    upload_keys = [str(image["upload"]) for image in images if image.get("upload")]
    uploads = dict(zip(upload_keys, runtime.store.load_uploads(upload_keys), strict=True)) if upload_keys else {}
    loads = {
        runtime.fetchers.submit(
            runtime.prepare_image,
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
            texts = [text for _, text in pairs]
            futures = image.cached_or_submit(runtime.batcher, texts, (batch_id, indices), expected)
            answers += zip(indices, futures, strict=True)
            prepared[tuple(indices)] = image
    except TimeoutError:  # images still loading at the limit: their items fail `timeout`
        for load, pairs in loads.items():
            load.cancel()
            fail(pairs, "timeout", runtime.timeout_message())
    return answers


def _keep_answers(
    runtime: WorkerRuntime, prepared: dict[tuple[int, ...], PreparedImage], outcomes: list[list[str]]
) -> None:
    """Keep a chunk's new answers in the cache, in one call."""
    answers = {int(index): json.loads(value)[1] for index, status, _, value in outcomes if status == "succeeded"}
    new: dict[str, str] = {}
    for indices, image in prepared.items():
        new |= image.new_answers({n: answers[i] for n, i in enumerate(indices) if i in answers})
    runtime.cache.store(new)
