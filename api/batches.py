"""The batch routes: submit many questions about many images at once, follow the batch, read its results, cancel it.

A batch and its items are a few Redis keys (contract/batches.py), sent to the workers in chunks, so that an image
is fetched once for all its questions; an item is shown as a job at `/v1/jobs/<batch id>.<index>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.admission import check_key_room, check_queue_room, check_workers
from api.auth import api_key_name
from api.batch_reads import current_batch, query_after, query_int, query_status, read_batch, result_lines
from api.batch_uploads import UploadedImage, parse_batch_upload
from api.context import context
from api.errors import ConflictError, UnsupportedMediaTypeError, ValidationError
from api.estimates import batch_places, estimate
from api.openapi import BATCH_SUBMIT_CODES, documented
from api.request_body import check_webhook, fingerprint, idempotency_header, json_body, wait_seconds
from api.schemas.batches import (
    BatchAccepted,
    BatchCancelCounts,
    BatchForm,
    BatchRequest,
    BatchResponse,
    BatchResult,
    BatchWaitQuery,
    PageQuery,
    validate_batch_request,
)
from api.submission import accepted_headers, submit
from contract.batch_store import BatchStore
from contract.batches import MAX_BATCH_ANSWERS, Batch, Item, chunk_member, plan_chunks
from contract.fair_share import release_quietly
from contract.jobs import new_job_id, utc_iso
from contract.keys import batch_upload_key, idempotency_key
from contract.states import JobTask

bp = Blueprint("batches", __name__)

BATCH_ID = {"batch_id": "A batch's id, as its submission answered it."}

RESULTS_MEDIA_TYPE = "application/x-ndjson"


@bp.post("/v1/batches")
@documented(
    "submitBatch",
    "batches",
    {202: (BatchAccepted, "The batch is stored and enqueued; its URL is in `Location`.")},
    BATCH_SUBMIT_CODES,
    json=BatchRequest,
    form=BatchForm,
    response_headers={202: {"Location": "BatchLocation"}},
)
def submit_batch() -> tuple[Response, int, dict[str, str]]:
    """Submit many questions about images: `items`, or every one of `questions` about every image.

    Up to 10,000 answers. Each item is a job of its own (`GET /v1/jobs/{id}` shows it, with its `batch_id`); the
    workers fetch each image once for all its questions. `202` means every item is stored and enqueued. As
    multipart/form-data, the images are uploaded (files `images`) and each is asked every one of `questions`. With
    `"task": "caption"`, `images` are captioned once each (no `questions`; an optional `prompt` for all), or `items`
    give each image with its optional `prompt`. With `"caption": true`, `images` are asked every one of `questions`
    and captioned once each too (after its questions, in item order), each image uploaded once for both.
    """
    # 202 means the batch, its items and every uploaded image (stored once) are in Redis: a few round trips in all.
    # With an Idempotency-Key, the same request again (same key, owner, body and files) answers the first one's batch.
    idempotency = idempotency_header()
    batch, replayed = submit(_parse_batch_submission(), idempotency)
    stored = BatchStore(context().store).get(batch.id) or batch  # read again for its tickets (its acceptance wrote)
    body = {"id": batch.id, "count": batch.count, "estimate": _batch_estimate(stored)}
    return jsonify(body), 202, accepted_headers(f"/v1/batches/{batch.id}", replayed)


@bp.get("/v1/batches/<batch_id>")
@documented(
    "getBatch",
    "batches",
    {200: (BatchResponse, "The batch.")},
    ("batch_not_found", "wait_invalid", "after_invalid"),
    query=BatchWaitQuery,
    path=BATCH_ID,
)
def get_batch(batch_id: str) -> Response:
    """A batch's progress: its items counted by status, and its webhook's delivery.

    With `?wait=S`, the batch is answered as soon as its `ended` count differs from `after` (the count the caller last
    saw; without `after`, the count when the read began), once every item ended, or after S seconds.
    """
    wait_s, after = wait_seconds(), query_after()
    batch = read_batch(BatchStore(context().store), batch_id, wait_s, after)
    return jsonify({**batch.summary(), "estimate": _batch_estimate(batch)})


def _batch_estimate(batch: Batch) -> dict[str, Any] | None:
    return estimate(context().store.client, context().fleet, batch_places(batch))


@bp.get("/v1/batches/<batch_id>/results")
@documented(
    "getBatchResults",
    "batches",
    {200: (BatchResult, "One line per item, from `offset`, at most `limit` lines.")},
    ("batch_not_found", "pagination_invalid", "status_invalid"),
    query=PageQuery,
    path=BATCH_ID,
    media_type=RESULTS_MEDIA_TYPE,
)
def batch_results(batch_id: str) -> Response:
    """The batch's items in order, as JSON Lines: one `BatchResult` object per line.

    `offset` and `limit` choose a range of items; with `status`, only the items of that status in the range are
    answered (`?status=failed`: the failures, each with its image, text and error).
    """
    # Streamed a page at a time: each page is two reads, whatever the batch's size.
    batches = BatchStore(context().store)
    batch = current_batch(batches, batch_id)
    offset = query_int("offset", 0)
    limit = query_int("limit", batch.count)
    status = query_status()
    stop = min(batch.count, offset + limit) - 1
    if stop < offset:
        return Response("", mimetype=RESULTS_MEDIA_TYPE)
    return Response(result_lines(batches, batch, offset, stop, status), mimetype=RESULTS_MEDIA_TYPE)


@bp.post("/v1/batches/<batch_id>/cancel")
@documented(
    "cancelBatch",
    "batches",
    {200: (BatchCancelCounts, "What the cancel did to the items.")},
    ("batch_not_found", "batch_ended"),
    path=BATCH_ID,
)
def cancel_batch(batch_id: str) -> Response:
    """Cancel a batch: items not yet in a model call end `canceled` and never run; running ones run on."""
    batches = BatchStore(context().store)
    batch = current_batch(batches, batch_id)
    counts = batches.cancel(batch)
    if counts.canceled == 0 and counts.cancel_requested == 0:
        raise ConflictError("batch_ended", "every item of the batch has already ended; there is nothing to cancel")
    return jsonify(
        canceled=counts.canceled, cancel_requested=counts.cancel_requested, already_ended=counts.already_ended
    )


@bp.delete("/v1/batches/<batch_id>")
@documented(
    "deleteBatch",
    "batches",
    {204: (None, "The batch, its items and their results are gone.")},
    ("batch_not_found", "batch_running"),
    path=BATCH_ID,
)
def delete_batch(batch_id: str) -> tuple[str, int]:
    """Delete an ended batch and its results now, rather than at its TTL (a client that saved them)."""
    batches = BatchStore(context().store)
    batch = current_batch(batches, batch_id)
    if not batches.delete_ended(batch):
        message = "some item of the batch has not ended: cancel the batch, or wait for it, before deleting it"
        raise ConflictError("batch_running", message)
    return "", 204


def _parse_batch_submission() -> BatchSubmission:
    ctx = context()
    if request.mimetype == "multipart/form-data":
        upload = parse_batch_upload(ctx.settings)
        batch_request, uploaded = upload.batch_request, upload.images
    else:
        batch_request, uploaded = _parse_batch_request(), None
    # The body says the tasks, and so the queues whose depth counts (those the items would wait in).
    queues = {task: ctx.settings.queue_for(task) for task in batch_request.tasks()}
    new = _new_batch(batch_request, queues, ctx.settings.batch_chunk_size, uploaded)
    return BatchSubmission(BatchStore(ctx.store), new, batch_request, uploaded, queues)


def _parse_batch_request() -> BatchRequest:
    ctx = context()
    settings = ctx.settings
    if request.mimetype != "application/json":
        message = "send a batch as application/json, or as multipart/form-data with its images"
        raise UnsupportedMediaTypeError("unsupported_media_type", message)
    data = json_body()
    _check_size(data)  # before validation: validating a huge list is the cost the limit is there to refuse
    batch_request = validate_batch_request(data, settings.max_question_chars, max_deadline_s=settings.job_ttl_s)
    if batch_request.items is not None and (batch_request.images is not None or batch_request.questions is not None):
        raise ValidationError("batch_invalid", "give either 'items', or 'images' and 'questions', not both")
    half_shape = (batch_request.images is None) != (batch_request.questions is None)
    if batch_request.task is JobTask.VQA and batch_request.items is None and half_shape:  # captions: images alone
        raise ValidationError("batch_invalid", "'images' and 'questions' go together: every question about every image")
    if not batch_request.pairs():  # every list null, say: nothing the size check could count
        raise ValidationError("batch_empty", "a batch asks at least one question about one image (or one caption)")
    check_webhook(batch_request.webhook, settings)
    return batch_request


def _check_size(data: Any) -> None:
    if not isinstance(data, dict):
        return  # validation refuses it with invalid_body
    lengths = {name: len(data[name]) for name in ("items", "images", "questions") if isinstance(data.get(name), list)}
    if "items" in lengths:
        answers = lengths["items"]
    elif "images" in lengths and "questions" in lengths:  # and one caption per image with `caption`
        answers = lengths["images"] * (lengths["questions"] + (data.get("caption") is True))
    elif "images" in lengths and data.get("task") == JobTask.CAPTION:  # one caption per image
        answers = lengths["images"]
    elif not any(name in data for name in ("items", "images", "questions")):
        answers = 0
    else:
        return  # half the tagging shape, or not lists: validation says what is wrong
    if answers == 0:
        raise ValidationError("batch_empty", "a batch asks at least one question about one image")
    if answers > MAX_BATCH_ANSWERS:
        message = f"the batch asks for {answers} answers; the limit is {MAX_BATCH_ANSWERS} per request"
        raise ValidationError("batch_too_large", message)


@dataclass(frozen=True)
class NewBatch:
    """A batch about to be stored: its record, images, items (image number, text, task), chunks and uploads by key."""

    batch: Batch
    images: list[dict[str, str]]
    items: list[Item]
    chunks: list[dict[str, Any]]
    uploads: dict[str, bytes]


def _new_batch(
    batch_request: BatchRequest,
    queues: dict[JobTask, str],
    chunk_size: int,
    uploaded: list[UploadedImage] | None = None,
) -> NewBatch:
    """The batch, its distinct images and its items in item order (image by image, as the request lists them)."""
    now = time.time()
    batch_id = new_job_id()
    uploads: dict[str, bytes] = {}
    if uploaded is not None:
        images = []
        for number, image in enumerate(uploaded):
            key = batch_upload_key(batch_id, number)
            uploads[key] = image.data
            images.append({"image_name": image.name, "upload": key})
        asked = batch_request.asked()
        items = [Item(number, text, task) for number in range(len(images)) for task, text in asked]
    else:
        numbers: dict[str, int] = {}
        items = [Item(numbers.setdefault(url, len(numbers)), text, task) for url, task, text in batch_request.pairs()]
        images = [{"image_url": url} for url in numbers]
    deadline_s = batch_request.deadline_s
    batch = Batch(
        id=batch_id,
        count=len(items),
        created_at=utc_iso(now),
        owner=api_key_name(),
        priority=batch_request.priority,
        webhook=str(batch_request.webhook or ""),
        webhook_items=batch_request.webhook_items,
        task=batch_request.task,
        queue=queues[batch_request.task],
        caption_queue=queues[JobTask.CAPTION] if batch_request.captions_too else "",
        deadline_at="" if deadline_s is None else str(now + deadline_s),
    )
    chunks = []
    for number, (task, chunk) in enumerate(plan_chunks(items, chunk_size)):
        answers = sum(len(entry["items"]) for entry in chunk)
        for entry in chunk:  # the worker reads the image's source, not its number
            source = images[entry.pop("image")]
            entry.update({"upload": source["upload"]} if "upload" in source else {"image_url": source["image_url"]})
        chunks.append(
            {
                "batch_id": batch_id,
                "number": number,
                "member": chunk_member(batch_id, number, answers),
                "priority": str(batch.priority),
                "task": str(task),
                "images": chunk,
            }
        )
    return NewBatch(batch, images, items, chunks, uploads)


@dataclass(frozen=True)
class BatchSubmission:
    """A new batch, the request it was made of (with its uploaded images) and the queues of its tasks: the
    `Submission` that submit() (api/submission.py) takes in."""

    batches: BatchStore
    new: NewBatch
    batch_request: BatchRequest
    uploaded: list[UploadedImage] | None
    queues: dict[JobTask, str]

    @property
    def what(self) -> str:
        return f"batch {self.new.batch.id}"

    @property
    def record(self) -> Batch:
        return self.new.batch

    def claim(self, idempotency: str) -> tuple[str, str]:
        # The same request again is the same key, owner, body and files.
        body = self.batch_request.model_dump(mode="json")
        sent = fingerprint(body, [image.data for image in self.uploaded or ()])
        batch = self.new.batch
        return idempotency_key(batch.owner, f"batch\0{idempotency}"), f"{sent}:{batch.id}"

    def find(self, record_id: str) -> Batch | None:
        return self.batches.get(record_id)

    def admit(self) -> None:
        ctx = context()
        for task, queue in self.queues.items():
            check_workers(ctx.store.client, queue, task, ctx.settings.wait_for_workers)
        for task, queue in self.queues.items():
            answers = sum(item.task is task for item in self.new.items)
            check_queue_room(ctx.store.client, queue, ctx.settings.max_queue_depth, answers=answers)
        answers = len(self.new.items)
        check_key_room(ctx.store.client, list(self.queues.values()), self.new.batch.owner, ctx.settings, answers)

    def create(self, claim: tuple[str, str] | None) -> None:
        new = self.new
        self.batches.create(new.batch, new.images, new.items, new.chunks, new.uploads, claim)

    def accept(self, replicas: int, timeout_ms: int) -> int | None:
        weight = context().settings.weight_of(self.new.batch.owner)
        return self.batches.accept(self.new.batch, self.new.chunks, replicas, timeout_ms, weight)

    def release(self) -> None:
        for queue in self.queues.values():
            release_quietly(context().store, context().celery, queue)

    def withdraw(self, replicas: int, timeout_ms: int) -> int | None:
        new = self.new
        return self.batches.withdraw(new.batch, new.chunks, list(new.uploads), replicas, timeout_ms)
