"""The job routes: submit a job, read a job, cancel a job; the fleet's counters, and a liveness check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request

from api.admission import check_key_room, check_queue_room, check_workers
from api.auth import api_key_name, public
from api.context import context
from api.errors import ConflictError, NotFoundError, UnsupportedMediaTypeError, ValidationError
from api.estimates import batch_places, estimate, job_places
from api.openapi import SUBMIT_CODES, documented
from api.request_body import (
    ITEM_ID_PATTERN,
    JOB_ID_PATTERN,
    check_webhook,
    fingerprint,
    idempotency_header,
    job_form_bounds,
    json_body,
    read_form,
    read_upload,
    wait_seconds,
)
from api.schemas.jobs import (
    IdempotencyHeaders,
    JobAccepted,
    JobForm,
    JobRequest,
    JobResponse,
    WaitQuery,
    validate_job_request,
)
from api.schemas.ops import Health, Stats
from api.settings import ApiSettings
from api.submission import accepted_headers, submit
from contract.batch_store import BatchStore
from contract.batches import Batch, split_item_id
from contract.fair_share import release_quietly
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_iso
from contract.keys import ended_key, idempotency_key
from contract.states import ENDED_STATUSES, JobStatus
from contract.transitions import CANCEL_ENDED

bp = Blueprint("jobs", __name__)

JOB_ID = {"job_id": "A job's id, as its submission answered it (a batch item's: `<batch id>.<index>`)."}


@bp.get("/healthz")
@public
@documented("healthz", "operations", {200: (Health, "The process is alive.")})
def healthz() -> Response:
    """Liveness: the API process answers (it does not check Redis or the workers)."""
    return jsonify(status="ok")


@bp.get("/v1/stats")
@documented("getStats", "operations", {200: (Stats, "The counters.")})
def stats() -> Response:
    """The fleet's reliability counters: executions, reruns, duplicates, jobs failed `worker_lost`."""
    return jsonify(context().store.stats())


@bp.post("/v1/jobs")
@documented(
    "submitJob",
    "jobs",
    {202: (JobAccepted, "The job is stored and enqueued.")},
    SUBMIT_CODES,
    json=JobRequest,
    form=JobForm,
    headers=IdempotencyHeaders,
    response_headers={202: {"Location": "Location", "Idempotent-Replayed": "Idempotent-Replayed"}},
)
def submit_job() -> tuple[Response, int, dict[str, str]]:
    """Submit a question about an image, or a caption of it: by URL (JSON) or as an upload (multipart).

    `202` means the job is stored and enqueued in Redis; a refused request enqueues nothing. `"task": "caption"` (no
    `question`; an optional `prompt` the caption continues) goes to the captioning workers, and the job's `answer` is
    the caption. With an Idempotency-Key, the same request again (same key, same API key, same body) answers the
    first one's job.
    """
    idempotency = idempotency_header()
    job, replayed = submit(_parse_job_submission(context().settings), idempotency)
    return _accepted(job, replayed)


@bp.get("/v1/jobs/<job_id>")
@documented(
    "getJob",
    "jobs",
    {200: (JobResponse, "The job.")},
    ("job_not_found", "wait_invalid"),
    query=WaitQuery,
    path=JOB_ID,
)
def get_job(job_id: str) -> Response:
    """A job's status, and its answer or error once it ended.

    A batch item is read as a job, by its id `<batch id>.<index>`. Another API key's job is as unknown as a job never
    made. A job still queued past its deadline is answered `expired`. With `?wait=S`, a job that has not ended is
    answered when it ends, or after S seconds.
    """
    # The script that ends a job pushes on its `ended` list (a batch's, for an item), which a read with `wait` waits
    # on (BLMOVE onto itself, so that every waiting read sees it). An overdue job is ended here, as a worker would.
    ctx = context()
    wait_s = wait_seconds()
    if ITEM_ID_PATTERN.match(job_id):
        return jsonify(_item_view(*_read_item(job_id, wait_s)))
    job = _owned_job(ctx.store, job_id)
    if wait_s and job.status not in ENDED_STATUSES and not job.overdue(time.time()):
        key = ended_key(job_id)
        ctx.waiter.blmove(key, key, timeout=wait_s, src="RIGHT", dest="LEFT")  # type: ignore[arg-type]  # Redis takes fractions
        job = _owned_job(ctx.store, job_id)
    if job.overdue(time.time()):
        ctx.store.expire_if_overdue(job, ctx.settings.queue_for(job.task))
        job = _owned_job(ctx.store, job_id)
    return jsonify(_job_view(job))


@bp.post("/v1/jobs/<job_id>/cancel")
@documented(
    "cancelJob",
    "jobs",
    {200: (JobResponse, "The job, canceled (or marked `cancel_requested`).")},
    ("job_not_found", "job_ended"),
    path=JOB_ID,
)
def cancel_job(job_id: str) -> Response:
    """Cancel a job: a queued one ends `canceled` and never runs; a running one runs to its end.

    A running job is marked `cancel_requested` and ends as it would have.
    """
    ctx = context()
    if ITEM_ID_PATTERN.match(job_id):
        batches, batch, index = _owned_item(job_id)
        outcome = batches.cancel_item(batch, index)
        job, batch = _read_item(job_id, 0.0)
        view = _item_view(job, batch)
    else:
        job = _owned_job(ctx.store, job_id)
        outcome = ctx.store.cancel(job, ctx.settings.queue_for(job.task))
        job = _owned_job(ctx.store, job_id)
        view = _job_view(job)
    if outcome == CANCEL_ENDED:
        raise ConflictError("job_ended", f"the job has already ended ({job.status}); there is nothing to cancel")
    return jsonify(view)


def _job_view(job: Job) -> dict[str, Any]:
    """A single job as responses show it: its public fields and its end estimate."""
    ctx = context()
    places = job_places(job, ctx.settings.queue_for(job.task))
    return {**job.to_public(), "estimate": estimate(ctx.store.client, ctx.fleet, places)}


def _item_view(job: Job, batch: Batch) -> dict[str, Any]:
    """A batch item as responses show it: its batch's estimate until it ended."""
    places = [] if job.status in ENDED_STATUSES else batch_places(batch)
    return {**job.to_public(), "estimate": estimate(context().store.client, context().fleet, places)}


def _owned_item(job_id: str) -> tuple[BatchStore, Batch, int]:
    """The batch store, the batch and the index of a batch item's id, refused as a job never made when not theirs."""
    batch_id, index = split_item_id(job_id) or ("", -1)
    batches = BatchStore(context().store)
    batch = batches.get(batch_id)
    if batch is None or batch.owner != api_key_name() or not 0 <= index < batch.count:
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return batches, batches.expire_if_overdue(batch, time.time()), index


def _read_item(job_id: str, wait_s: float) -> tuple[Job, Batch]:
    """A batch item as a job, and its batch; with `wait_s`, once it ended or after that long (woken by each end in its
    batch, which the end script publishes on the batch's `ended` channel: subscribed before the first read, so none
    is missed)."""
    if not wait_s:
        batches, batch, index = _owned_item(job_id)
        return _item_or_404(batches.item(batch, index)), batch
    waited_until = time.monotonic() + wait_s
    with context().waiter.pubsub(ignore_subscribe_messages=True) as ends:
        ends.subscribe(ended_key(job_id.rpartition(".")[0]))
        while True:
            batches, batch, index = _owned_item(job_id)
            job = _item_or_404(batches.item(batch, index))
            left = waited_until - time.monotonic()
            if job.status in ENDED_STATUSES or left <= 0:
                return job, batch
            ends.get_message(timeout=left)


def _item_or_404(job: Job | None) -> Job:
    if job is None:
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return job


def _owned_job(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
    if job is None or job.owner != api_key_name():
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return job


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


def _accepted(job: Job, replayed: bool) -> tuple[Response, int, dict[str, str]]:
    # Read again for its ticket (the acceptance wrote it) and its estimate: a job already ended has none.
    stored = context().store.get(job.id) or job
    body = {"id": job.id, "status": str(job.status), "estimate": _job_view(stored)["estimate"]}
    return jsonify(body), 202, accepted_headers(f"/v1/jobs/{job.id}", replayed)


@dataclass(frozen=True)
class JobSubmission:
    """A new job, its queue, its uploaded image, and the fingerprint an Idempotency-Key is checked against: the
    `Submission` that submit() (api/submission.py) takes in."""

    job: Job
    queue: str  # the one the job waits in, whose depth admission counts
    upload: bytes | None
    fingerprint: str

    @property
    def what(self) -> str:
        return f"job {self.job.id}"

    @property
    def record(self) -> Job:
        return self.job

    def claim(self, idempotency: str) -> tuple[str, str]:
        return idempotency_key(self.job.owner, idempotency), f"{self.fingerprint}:{self.job.id}"

    def find(self, record_id: str) -> Job | None:
        return context().store.get(record_id)

    def admit(self) -> None:
        ctx = context()
        check_workers(ctx.store.client, self.queue, self.job.task, ctx.settings.wait_for_workers)
        check_queue_room(ctx.store.client, self.queue, ctx.settings.max_queue_depth)
        check_key_room(ctx.store.client, [self.queue], self.job.owner, ctx.settings)

    def create(self, claim: tuple[str, str] | None) -> None:
        context().store.create(self.job, self.queue, self.upload, claim)

    def accept(self, replicas: int, timeout_ms: int) -> int | None:
        weight = context().settings.weight_of(self.job.owner)
        return context().store.accept(self.job, self.queue, replicas, timeout_ms, weight)

    def release(self) -> None:
        release_quietly(context().store, context().celery, self.queue)

    def withdraw(self, replicas: int, timeout_ms: int) -> int | None:
        return context().store.withdraw(self.job, self.queue, replicas, timeout_ms)


def _parse_job_submission(settings: ApiSettings) -> JobSubmission:
    if request.mimetype == "application/json":
        data = json_body()
        upload = None
    elif request.mimetype == "multipart/form-data":
        form = read_form(job_form_bounds(settings), settings)
        data = form.fields.to_dict()
        upload = read_upload(form.files.get("image"), settings)
        extra = set(form.files) - {"image"}
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
    # The body says the task, and so the queue whose depth counts (the one the job would wait in).
    queue = settings.queue_for(job_request.task)
    return JobSubmission(_new_job(job_request), queue, upload, fingerprint(data, [] if upload is None else [upload]))
