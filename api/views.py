"""The HTTP routes: submit a job, read a job, cancel a job, and a liveness check."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Celery
from flask import Blueprint, Response, current_app, jsonify, request
from kombu.exceptions import OperationalError
from pydantic import HttpUrl
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import BadRequest

from api.admission import check_queue_room, check_workers
from api.auth import api_key_name, public
from api.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from api.schemas import JobRequest, validate_job_request
from api.settings import ApiSettings
from worker.contract.batches import Batch, BatchStore, split_item_id
from worker.contract.broker import publish_job
from worker.contract.errors import ImageInvalidError, ImageTooLargeError
from worker.contract.images import open_image
from worker.contract.jobs import Job, JobStore, ended_key, idempotency_key, new_job_id, utc_iso
from worker.contract.states import ENDED_STATUSES, JobStatus
from worker.contract.transitions import CANCEL_ENDED

log = logging.getLogger("blipq.api")
bp = Blueprint("jobs", __name__)
T = TypeVar("T")

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[0-9]{1,6}$")  # a batch item: `<batch id>.<index>`
UPLOAD_SNIFF_MAX_PIXELS = 1 << 40  # the worker enforces the real pixel limit when it decodes
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as header values safely are
IDEMPOTENCY_PENDING_S = 60  # a key claimed by a request that died before storing its job is free again after this
IDEMPOTENCY_WAIT_S = 5.0  # how long a duplicate arriving with the first waits for the first one's job to be stored
IDEMPOTENCY_POLL_S = 0.05


@dataclass(frozen=True)
class Services:
    """What the views use, built once by create_app."""

    settings: ApiSettings
    store: JobStore
    celery: Celery
    waiter: redis.Redis  # for reads that wait: its socket timeout is above MAX_WAIT_S


MAX_WAIT_S = 20.0  # the longest a `GET /v1/jobs/<id>?wait=S` holds its request (and an API thread)


def services() -> Services:
    return current_app.extensions["blipq"]


@bp.get("/healthz")
@public
def healthz() -> Response:
    """The process is alive (it does not check Redis or the workers)."""
    return jsonify(status="ok")


@bp.get("/v1/stats")
def stats() -> Response:
    """The fleet's reliability counters: executions, reruns, duplicate deliveries and executions, worker_lost..."""
    return jsonify(services().store.stats())


@bp.post("/v1/jobs")
def submit_job() -> tuple[Response, int, dict[str, str]]:
    """Validate a job, store it and enqueue it; 202 means it is in Redis.

    With an Idempotency-Key, the same request again (same key, same owner, same body) answers the first one's job.
    """
    svc = services()
    idempotency = idempotency_header()
    submission = _parse_job_request(svc.settings)
    # The body says the task, and so the queue whose depth counts (the one the job would wait in).
    queue = svc.settings.queue_for(submission.job_request.task)
    job = _new_job(submission.job_request)
    claim = None
    if idempotency is not None:
        claim = (idempotency_key(job.owner, idempotency), f"{submission.fingerprint}:{job.id}")
        earlier = earlier_submission(svc.store, *claim, svc.store.get)
        if earlier is not None:  # a replay is answered as the first request was, whatever the queue is like now
            return _accepted(earlier, {"Idempotent-Replayed": "true"})
    with released_on_refusal(svc.store, claim):
        check_workers(svc.store.client, queue, submission.job_request.task, svc.settings.wait_for_workers)
        check_queue_room(svc.store.client, queue, svc.settings.max_queue_depth)
    try:
        svc.store.create(job, queue, submission.upload, claim)
    except redis.RedisError as exc:
        log.warning("cannot store job: %s", exc)
        release_claim(svc.store, claim)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    enqueue(
        f"job {job.id}",
        publish=lambda: publish_job(svc.celery, job, queue),
        accept=lambda replicas, timeout_ms: svc.store.accept(job, queue, replicas, timeout_ms),
        withdraw=lambda: svc.store.withdraw(job, queue),
        release=lambda: release_claim(svc.store, claim),
    )
    return _accepted(job)


def enqueue(
    what: str,
    publish: Callable[[], None],
    accept: Callable[[int, int], int | None],
    withdraw: Callable[[], bool],
    release: Callable[[], None],
) -> None:
    """Publish a submission stored `pending` and accept it; returns once it is promised to run (the 202), else raises
    503 with the submission withdrawn, so that it never runs.

    The order is what keeps the promise both ways. A pending submission is run by no worker and seen by no reaper,
    so one whose message could not be published is withdrawn and never runs. Acceptance comes after the publish, on
    the connection that stored it: with BLIPQ_MIN_REPLICAS_ACK replicas, Redis WAIT then covers the record, the
    message and the acceptance together, and a submission that too few replicas hold is withdrawn (503) unless a
    worker started it already (it then runs: 202). Should Redis fail between the acceptance and its reply, the
    submission is withdrawn if Redis still answers; if not, it may run: a client that retries with its
    Idempotency-Key then gets that same job, not a second one.
    """
    settings = services().settings
    try:
        publish()
        replicas = accept(settings.min_replicas_ack, settings.replica_ack_timeout_ms)
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot enqueue %s: %s", what, exc)
        _withdraw_or_accept(what, withdraw, accept, release)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    if replicas is None:  # not pending any more: it expired meanwhile (a TTL shorter than this request)
        release()
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later")
    if replicas < settings.min_replicas_ack:
        log.warning("%s: %d of %d replicas acknowledged it in time", what, replicas, settings.min_replicas_ack)
        if _withdraw_or_accept(what, withdraw, accept, release):
            message = f"the job could not be copied to {settings.min_replicas_ack} Redis replicas in time; retry later"
            raise ServiceUnavailableError("replicas_unavailable", message)


def _withdraw_or_accept(
    what: str, withdraw: Callable[[], bool], accept: Callable[[int, int], int | None], release: Callable[[], None]
) -> bool:
    """Withdraw a submission that cannot be promised; True when it is withdrawn (or cannot run: Redis is away), False
    when a worker had started it (it is then accepted, without waiting for replicas, and runs)."""
    try:
        if withdraw():
            release()
            return True
        accept(0, 0)  # a batch with a chunk started: the chunks never published go out through the reaper
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot withdraw %s: %s", what, exc)
        return True
    log.warning("%s was started by a worker before it could be withdrawn: it runs", what)
    return False


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """A job's (or a batch item's) status, and its answer or error once it ended; another key's job is as unknown as a
    job never made.

    A job still queued past its deadline is ended `expired` by this read, as the worker would when it reached it.
    With `?wait=S` (0 < S <= MAX_WAIT_S), a job that has not ended is answered when it ends, or after S seconds: the
    script that ends a job pushes on its `ended` list (a batch's, for an item), which this read waits on (BLMOVE onto
    itself, so that every waiting read sees it).
    """
    svc = services()
    wait_s = _wait_seconds()
    if ITEM_ID_PATTERN.match(job_id):
        return jsonify(_read_item(job_id, wait_s).to_public())
    job = _owned_job(svc.store, job_id)
    if wait_s and job.status not in ENDED_STATUSES and not job.overdue(time.time()):
        key = ended_key(job_id)
        svc.waiter.blmove(key, key, timeout=wait_s, src="RIGHT", dest="LEFT")  # type: ignore[arg-type]  # Redis takes fractions
        job = _owned_job(svc.store, job_id)
    if job.overdue(time.time()):
        svc.store.expire_if_overdue(job, svc.settings.queue_for(job.task))
        job = _owned_job(svc.store, job_id)
    return jsonify(job.to_public())


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a job: a queued one ends `canceled` and never runs; a running one ends as it would, `cancel_requested`."""
    svc = services()
    if ITEM_ID_PATTERN.match(job_id):
        batches, batch, index = _owned_item(job_id)
        outcome = batches.cancel_item(batch, index)
        job = _read_item(job_id, 0.0)
    else:
        job = _owned_job(svc.store, job_id)
        outcome = svc.store.cancel(job, svc.settings.queue_for(job.task))
        job = _owned_job(svc.store, job_id)
    if outcome == CANCEL_ENDED:
        raise ConflictError("job_ended", f"the job has already ended ({job.status}); there is nothing to cancel")
    return jsonify(job.to_public())


def _owned_item(job_id: str) -> tuple[BatchStore, Batch, int]:
    """The batch store, the batch and the index of a batch item's id, refused as a job never made when not theirs."""
    batch_id, index = split_item_id(job_id) or ("", -1)
    batches = BatchStore(services().store)
    batch = batches.get(batch_id)
    if batch is None or batch.owner != api_key_name() or not 0 <= index < batch.count:
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return batches, batches.expire_if_overdue(batch, time.time()), index


def _read_item(job_id: str, wait_s: float) -> Job:
    """A batch item as a job; with `wait_s`, once it ended or after that long (woken by each end in its batch, which
    the end script publishes on the batch's `ended` channel: subscribed before the first read, so none is missed)."""
    if not wait_s:
        batches, batch, index = _owned_item(job_id)
        return _item_or_404(batches.item(batch, index))
    waited_until = time.monotonic() + wait_s
    with services().waiter.pubsub(ignore_subscribe_messages=True) as ends:
        ends.subscribe(ended_key(job_id.rpartition(".")[0]))
        while True:
            batches, batch, index = _owned_item(job_id)
            job = _item_or_404(batches.item(batch, index))
            left = waited_until - time.monotonic()
            if job.status in ENDED_STATUSES or left <= 0:
                return job
            ends.get_message(timeout=left)


def _item_or_404(job: Job | None) -> Job:
    if job is None:
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return job


@dataclass(frozen=True)
class Submission:
    """A valid job request, its uploaded image, and the fingerprint an Idempotency-Key is checked against."""

    job_request: JobRequest
    upload: bytes | None
    fingerprint: str


def _owned_job(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
    if job is None or job.owner != api_key_name():
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return job


def _wait_seconds() -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = math.nan
    if not 0 < wait_s <= MAX_WAIT_S:  # NaN fails too
        message = f"wait: a number of seconds above 0 and at most {MAX_WAIT_S:g} is expected"
        raise ValidationError("wait_invalid", message)
    return wait_s


def _new_job(job_request: JobRequest) -> Job:
    now = time.time()
    deadline_s = job_request.deadline_s
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        question=job_request.question or job_request.prompt or "",  # a caption's prompt travels as its question
        task=job_request.task,
        image_url=str(job_request.image_url or ""),
        created_at=utc_iso(now),
        owner=api_key_name(),
        priority=job_request.priority,
        deadline_at="" if deadline_s is None else str(now + deadline_s),
        webhook=str(job_request.webhook or ""),
    )


def _accepted(job: Job, headers: dict[str, str] | None = None) -> tuple[Response, int, dict[str, str]]:
    return jsonify(id=job.id, status=str(job.status)), 202, {"Location": f"/v1/jobs/{job.id}", **(headers or {})}


def idempotency_header() -> str | None:
    """The request's Idempotency-Key, or None; refused when it is not 1 to 255 visible ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not IDEMPOTENCY_KEY_PATTERN.match(key):
        raise BadRequestError("idempotency_key_invalid", "an Idempotency-Key is 1 to 255 visible ASCII characters")
    return key


def earlier_submission(store: JobStore, key: str, claim: str, lookup: Callable[[str], T | None]) -> T | None:
    """What an earlier request with this Idempotency-Key made (`lookup` finds it by id: a job, a batch), or None once
    this request holds the key.

    A request that finds the key claimed but its job not stored yet (the two arrived together) waits for it.
    """
    fingerprint = claim.partition(":")[0]
    waited_until = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        try:
            held = store.claim_idempotency_key(key, claim, IDEMPOTENCY_PENDING_S)
            held_fingerprint, _, job_id = (held or "").partition(":")
            job = lookup(job_id) if held is not None and held_fingerprint == fingerprint else None
        except redis.RedisError as exc:
            log.warning("cannot claim an idempotency key: %s", exc)
            raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
        if held is None or job is not None:
            return job
        if held_fingerprint != fingerprint:
            message = "this Idempotency-Key was used for another request; a new job needs a new key"
            raise ConflictError("idempotency_conflict", message)
        if time.monotonic() >= waited_until:
            message = "a request with this Idempotency-Key is still being stored; retry in a moment"
            raise ConflictError("idempotency_key_in_use", message)
        time.sleep(IDEMPOTENCY_POLL_S)


def fingerprint(data: Any, uploads: list[bytes]) -> str:
    """A hash of a request as sent: its JSON body or form fields, and each upload's bytes."""
    images = [hashlib.sha256(upload).hexdigest() for upload in uploads]
    image_sha256 = images[0] if len(images) == 1 else (images or None)  # a single upload's, as it always was
    canonical = json.dumps({"body": data, "image_sha256": image_sha256}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _parse_job_request(settings: ApiSettings) -> Submission:
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLargeError("body_too_large", f"the body is over {settings.max_body_bytes} bytes")
    if request.mimetype == "application/json":
        try:
            data = request.get_json()
        except (BadRequest, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            raise BadRequestError("invalid_json", "the body is not valid JSON") from None
        upload = None
    elif request.mimetype == "multipart/form-data":
        data = request.form.to_dict()
        upload = read_upload(request.files.get("image"), settings)
        extra = set(request.files) - {"image"}
        if extra:
            raise ValidationError("unknown_field", f"{sorted(extra)[0]}: only one file, named 'image', is accepted")
    else:
        raise UnsupportedMediaTypeError("unsupported_media_type", "send application/json or multipart/form-data")
    job_request = validate_job_request(data, settings.max_question_chars, max_deadline_s=settings.job_ttl_s)
    if job_request.image_url is None and upload is None:
        raise ValidationError("image_missing", "give an image: 'image_url', or a file named 'image'")
    if job_request.image_url is not None and upload is not None:
        raise ValidationError("image_conflict", "give either 'image_url' or a file named 'image', not both")
    check_webhook(job_request.webhook, settings)
    return Submission(job_request, upload, fingerprint(data, [] if upload is None else [upload]))


def check_webhook(webhook: HttpUrl | None, settings: ApiSettings) -> None:
    """Refuse a webhook when the service sends none, or one whose URL carries credentials (never sent)."""
    if webhook is not None and not settings.webhooks_enabled:
        raise ValidationError("webhook_unavailable", "this service sends no webhooks (BLIPQ_WEBHOOK_SECRET is unset)")
    if webhook is not None and (webhook.username or webhook.password):
        raise ValidationError("webhook_invalid", "webhook: the URL carries credentials (user:password@); none are sent")


def read_upload(file: FileStorage | None, settings: ApiSettings) -> bytes | None:
    """The uploaded image's bytes, sniffed (image_too_large, image_invalid); None when no file was sent."""
    if file is None:
        return None
    data = file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLargeError("image_too_large", f"the image is over {settings.max_image_bytes} bytes")
    try:
        open_image(data, UPLOAD_SNIFF_MAX_PIXELS)
    except ImageTooLargeError as exc:
        raise PayloadTooLargeError("image_too_large", exc.message) from None
    except ImageInvalidError as exc:
        raise ValidationError("image_invalid", exc.message) from None
    return data


@contextmanager
def released_on_refusal(store: JobStore, claim: tuple[str, str] | None) -> Iterator[None]:
    """Free the request's Idempotency-Key claim when an admission check refuses it: its retry must be made anew, not
    told that the key is in use."""
    try:
        yield
    except ApiError:
        release_claim(store, claim)
        raise


def release_claim(store: JobStore, claim: tuple[str, str] | None) -> None:
    """Free an Idempotency-Key whose submission was not stored or was withdrawn: a retry makes it anew."""
    if claim is None:
        return
    try:
        store.release_idempotency_key(*claim)
    except redis.RedisError:  # Redis is away: the claim expires by itself
        log.warning("could not release an idempotency key")
