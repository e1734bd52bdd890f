"""The HTTP routes: submit a job, read a job, and a liveness check."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import redis
from celery import Celery
from flask import Blueprint, Response, current_app, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import BadRequest

from api.admission import check_queue_room
from api.auth import api_key_name, public
from api.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from api.schemas import JobRequest, validate_job_request
from api.settings import ApiSettings
from worker.errors import ImageInvalidError, ImageTooLargeError
from worker.images import open_image
from worker.jobs import TASK_VQA, Job, JobStatus, JobStore, new_job_id, utc_now

log = logging.getLogger("blipq.api")
bp = Blueprint("jobs", __name__)

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
UPLOAD_SNIFF_MAX_PIXELS = 1 << 40  # the worker enforces the real pixel limit when it decodes


@dataclass(frozen=True)
class Services:
    """What the views use, built once by create_app."""

    settings: ApiSettings
    store: JobStore
    celery: Celery


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
    """Validate a job, store it and enqueue it; 202 means it is in Redis."""
    svc = services()
    # Before the body is read: when the workers are behind, a refusal should cost nothing.
    check_queue_room(svc.store.client, svc.settings.queue, svc.settings.max_queue_depth)
    job_request, upload = _parse_job_request(svc.settings)
    job = Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        question=job_request.question,
        image_url=str(job_request.image_url or ""),
        created_at=utc_now(),
        owner=api_key_name(),
    )
    payload = {"job_id": job.id, "question": job.question, "image_url": job.image_url}
    try:
        svc.store.create(job, svc.settings.queue, upload)
    except redis.RedisError as exc:
        log.warning("cannot store job: %s", exc)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    try:
        svc.celery.send_task(TASK_VQA, args=[payload], task_id=job.id, queue=svc.settings.queue)
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot enqueue job %s: %s", job.id, exc)
        _forget(svc.store, job.id, svc.settings.queue)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    location = f"/v1/jobs/{job.id}"
    return jsonify(id=job.id, status=str(job.status)), 202, {"Location": location}


@bp.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """A job's status, and its answer or error once it ended; another key's job is as unknown as a job never made."""
    job = services().store.get(job_id) if JOB_ID_PATTERN.match(job_id) else None
    if job is None or job.owner != api_key_name():
        raise NotFoundError("job_not_found", "no job has this id (it may have expired)")
    return jsonify(job.to_public())


def _parse_job_request(settings: ApiSettings) -> tuple[JobRequest, bytes | None]:
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLargeError("body_too_large", f"the body is over {settings.max_body_bytes} bytes")
    if request.mimetype == "application/json":
        try:
            data = request.get_json()
        except BadRequest:
            raise BadRequestError("invalid_json", "the body is not valid JSON") from None
        upload = None
    elif request.mimetype == "multipart/form-data":
        data = request.form.to_dict()
        upload = _read_upload(request.files.get("image"), settings)
        extra = set(request.files) - {"image"}
        if extra:
            raise ValidationError("unknown_field", f"{sorted(extra)[0]}: only one file, named 'image', is accepted")
    else:
        raise UnsupportedMediaTypeError("unsupported_media_type", "send application/json or multipart/form-data")
    job_request = validate_job_request(data, settings.max_question_chars)
    if job_request.image_url is None and upload is None:
        raise ValidationError("image_missing", "give an image: 'image_url', or a file named 'image'")
    if job_request.image_url is not None and upload is not None:
        raise ValidationError("image_conflict", "give either 'image_url' or a file named 'image', not both")
    return job_request, upload


def _read_upload(file: FileStorage | None, settings: ApiSettings) -> bytes | None:
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


def _forget(store: JobStore, job_id: str, queue: str) -> None:
    try:
        store.delete(job_id, queue)
    except redis.RedisError:  # Redis is away: the record expires by itself and no task refers to it
        log.warning("could not delete unqueued job %s", job_id)
