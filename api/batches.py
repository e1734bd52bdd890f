"""The batch routes: submit many questions about many images at once, follow the batch, read its results, cancel it.

Each item is a job of its own (worker/jobs.py); the batch groups them (worker/batches.py) and sends them to the workers
in chunks, so that an image is fetched once for all its questions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import BadRequest

from api.admission import check_queue_room
from api.auth import api_key_name
from api.batch_uploads import UploadedImage, parse_batch_upload
from api.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from api.schemas import BatchRequest, validate_batch_request
from api.views import JOB_ID_PATTERN, check_webhook, services
from worker.batches import MAX_BATCH_ANSWERS, Batch, BatchStore, plan_chunks
from worker.broker import publish_chunk
from worker.jobs import Job, batch_upload_key, new_job_id, utc_iso
from worker.states import JobStatus, JobTask

log = logging.getLogger("blipq.api")
bp = Blueprint("batches", __name__)

RESULTS_MEDIA_TYPE = "application/x-ndjson"
RESULT_FIELDS = (
    "task",
    "image_url",
    "image_name",
    "question",
    "prompt",
    "status",
    "answer",
    "error",
)  # of an item's job, on its results line


@bp.post("/v1/batches")
def submit_batch() -> tuple[Response, int, dict[str, str]]:
    """Validate a batch (JSON, or multipart with uploaded images), store its jobs and enqueue its chunks.

    202 means every item (and every uploaded image, stored once) is in Redis.
    """
    svc = services()
    if request.mimetype == "multipart/form-data":
        upload = parse_batch_upload(svc.settings)
        batch_request, uploaded = upload.batch_request, upload.images
    else:
        batch_request, uploaded = _parse_batch_request(), None
    # The body says the task, and so the queue whose depth counts (the one the items would wait in).
    queue = svc.settings.queue_for(batch_request.task)
    check_queue_room(svc.store.client, queue, svc.settings.max_queue_depth)
    batch, jobs, uploads = _new_batch(batch_request, uploaded)
    batches = BatchStore(svc.store)
    try:
        batches.create(batch, jobs, queue, uploads)
    except redis.RedisError as exc:
        log.warning("cannot store batch: %s", exc)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    try:
        for number, images in enumerate(plan_chunks(jobs, svc.settings.batch_chunk_size)):
            publish_chunk(svc.celery, queue, batch.id, number, images, batch.priority, str(batch.task))
    except (OperationalError, redis.RedisError) as exc:
        # Chunks already sent find their jobs gone and skip them; the rest are never sent.
        log.warning("cannot enqueue batch %s: %s", batch.id, exc)
        _forget(batches, batch, jobs, queue)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    headers = {"Location": f"/v1/batches/{batch.id}"}
    return jsonify(id=batch.id, count=batch.count), 202, headers


@bp.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    """A batch's progress: its items counted by status, and its webhook's delivery."""
    batches = BatchStore(services().store)
    return jsonify(batches.summary(_owned_batch(batches, batch_id)))


@bp.get("/v1/batches/<batch_id>/results")
def batch_results(batch_id: str) -> Response:
    """The batch's items in order, one JSON line each, from `offset`, at most `limit` of them (default: all)."""
    batches = BatchStore(services().store)
    batch = _owned_batch(batches, batch_id)
    offset = _query_int("offset", 0)
    limit = _query_int("limit", batch.count)
    stop = min(batch.count, offset + limit) - 1
    if stop < offset:
        return Response("", mimetype=RESULTS_MEDIA_TYPE)
    return Response(_result_lines(batches.jobs(batch.id, offset, stop), offset), mimetype=RESULTS_MEDIA_TYPE)


@bp.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    """Cancel a batch: its queued items end `canceled` and never run; running ones run to their end."""
    svc = services()
    batches = BatchStore(svc.store)
    batch = _owned_batch(batches, batch_id)
    counts = batches.cancel(batch, svc.settings.queue_for(batch.task))
    if counts.canceled == 0 and counts.cancel_requested == 0:
        raise ConflictError("batch_ended", "every item of the batch has already ended; there is nothing to cancel")
    return jsonify(
        canceled=counts.canceled, cancel_requested=counts.cancel_requested, already_ended=counts.already_ended
    )


def _result_lines(jobs: Iterator[tuple[str, Job | None]], offset: int) -> Iterator[str]:
    for index, (job_id, job) in enumerate(jobs, start=offset):
        yield json.dumps(_result(index, job_id, job), separators=(",", ":")) + "\n"


def _result(index: int, job_id: str, job: Job | None) -> dict[str, Any]:
    if job is None:  # expired: its batch expires with it, so this is a read racing the TTL
        fields: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
        return {"index": index, "job_id": job_id, **fields}
    public = job.to_public()
    return {"index": index, "job_id": job_id, **{name: public[name] for name in RESULT_FIELDS}}


def _query_int(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValidationError("pagination_invalid", f"{name}: a whole number >= 0 is expected")
    return int(raw)


def _owned_batch(batches: BatchStore, batch_id: str) -> Batch:
    batch = batches.get(batch_id) if JOB_ID_PATTERN.match(batch_id) else None
    if batch is None or batch.owner != api_key_name():
        raise NotFoundError("batch_not_found", "no batch has this id (it may have expired)")
    return batch


def _parse_batch_request() -> BatchRequest:
    svc = services()
    settings = svc.settings
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLargeError("body_too_large", f"the body is over {settings.max_body_bytes} bytes")
    if request.mimetype != "application/json":
        message = "send a batch as application/json, or as multipart/form-data with its images"
        raise UnsupportedMediaTypeError("unsupported_media_type", message)
    try:
        data = request.get_json()
    except (BadRequest, RecursionError):
        raise BadRequestError("invalid_json", "the body is not valid JSON") from None
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
    elif "images" in lengths and "questions" in lengths:
        answers = lengths["images"] * lengths["questions"]
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


def _new_batch(
    batch_request: BatchRequest, images: list[UploadedImage] | None = None
) -> tuple[Batch, list[Job], dict[str, bytes]]:
    """The batch, its jobs in item order, and its uploaded images by Redis key (image by image, as the jobs)."""
    now = time.time()
    batch_id = new_job_id()
    owner = api_key_name()
    webhook = str(batch_request.webhook or "")
    deadline_s = batch_request.deadline_s
    uploads = {batch_upload_key(batch_id, number): image.data for number, image in enumerate(images or ())}
    # (image URL, upload key, image name, text) per item; a text is a question, or a caption's prompt
    sources = [
        ("", batch_upload_key(batch_id, number), image.name, text)
        for number, image in enumerate(images or ())
        for text in batch_request.texts()
    ]
    if images is None:
        sources = [(image_url, "", "", text) for image_url, text in batch_request.pairs()]
    jobs = [
        Job(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            question=text,
            task=batch_request.task,
            image_url=image_url,
            upload_key=key,
            image_name=image_name,
            created_at=utc_iso(now),
            owner=owner,
            priority=batch_request.priority,
            deadline_at="" if deadline_s is None else str(now + deadline_s),
            webhook=webhook if batch_request.webhook_items else "",
            batch_id=batch_id,
            index=index,
        )
        for index, (image_url, key, image_name, text) in enumerate(sources)
    ]
    batch = Batch(
        id=batch_id,
        count=len(jobs),
        created_at=utc_iso(now),
        owner=owner,
        priority=batch_request.priority,
        webhook=webhook,
        webhook_items=batch_request.webhook_items,
        task=batch_request.task,
    )
    return batch, jobs, uploads


def _forget(batches: BatchStore, batch: Batch, jobs: list[Job], queue: str) -> None:
    try:
        batches.delete(batch, jobs, queue)
    except redis.RedisError:  # Redis is away: the records expire by themselves
        log.warning("could not delete unqueued batch %s", batch.id)
