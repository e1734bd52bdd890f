"""Batches with uploaded images: POST /v1/batches as multipart/form-data.

The images are files named `images`; the form field `questions` holds a JSON array of the questions asked about every
image; `priority`, `deadline_s`, `webhook` and `webhook_items` are as in a JSON batch. With the field `task` set to
`caption`, each image is captioned once instead, continuing the optional field `prompt` (no `questions` then); with
`caption` set to `true`, each image is asked the questions and captioned too, in one batch. Each image is stored once
in Redis (contract.keys.batch_upload_key), for all its jobs (its captioning included), and expires with the
batch after the TTL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError, ValidationError
from api.request_body import FormBounds, check_body_size, check_webhook, read_form, read_upload
from api.schemas.batches import BATCH_FORM_OPTIONS, BatchRequest, validate_batch_request
from api.settings import ApiSettings
from contract.batches import MAX_BATCH_ANSWERS
from contract.states import JobTask

IMAGES_FIELD = "images"
QUESTIONS_FIELD = "questions"
FORM_FIELDS = frozenset({QUESTIONS_FIELD, *BATCH_FORM_OPTIONS})
MAX_FORM_PARTS = MAX_BATCH_ANSWERS + len(FORM_FIELDS)  # one file per image at most, and the text fields


@dataclass(frozen=True)
class UploadedImage:
    """One image of a batch upload: its file name (may be "") and its bytes, sniffed as an image."""

    name: str
    data: bytes


@dataclass(frozen=True)
class BatchUpload:
    """A valid batch upload: its request (task, questions or prompt, options; no image URLs) and its images in order."""

    batch_request: BatchRequest
    images: list[UploadedImage]


def parse_batch_upload(settings: ApiSettings) -> BatchUpload:
    """Read and check a multipart batch; raises the API error of its first problem, before anything is stored.

    A refusal about one image (image_too_large, image_invalid) names it: its index and its file name.
    """
    limit = settings.max_batch_upload_bytes
    bound = "the most a batch upload's body may be (BLIPQ_MAX_BATCH_UPLOAD_BYTES)"
    check_body_size(limit, bound)
    # `questions` may hold 10,000 questions: a text field as large as the body.
    form = read_form(FormBounds(limit, bound, field_bytes=limit, parts=MAX_FORM_PARTS, batch=True), settings)
    unknown = sorted((set(form.fields) - FORM_FIELDS) | (set(form.files) - {IMAGES_FIELD}))
    if unknown:
        message = (
            f"{unknown[0]}: a batch upload has files named 'images' and the fields {', '.join(sorted(FORM_FIELDS))}"
        )
        raise ValidationError("unknown_field", message)
    files = form.files.getlist(IMAGES_FIELD)
    if not files:
        raise ValidationError("image_missing", "upload at least one image, as a file named 'images'")
    data: dict[str, Any] = {name: value for name, value in form.fields.items() if name != QUESTIONS_FIELD}
    task = data.get("task", JobTask.VQA)
    if task not in tuple(JobTask):  # before `questions`, whose need depends on it
        raise ValidationError("task_invalid", f"task: {task!r} is not one of {', '.join(JobTask)}")
    if task == JobTask.CAPTION:
        if QUESTIONS_FIELD in form.fields:
            message = "questions: a caption batch asks no questions; give an optional 'prompt' instead"
            raise ValidationError("question_not_allowed", message)
    else:
        data[QUESTIONS_FIELD] = _questions(form.fields.get(QUESTIONS_FIELD))
    batch_request = validate_batch_request(data, settings.max_question_chars, max_deadline_s=settings.job_ttl_s)
    answers = len(files) * len(batch_request.asked())  # its questions, and one caption when it captions
    if answers > MAX_BATCH_ANSWERS:
        message = f"the batch asks for {answers} answers; the limit is {MAX_BATCH_ANSWERS} per request"
        raise ValidationError("batch_too_large", message)
    check_webhook(batch_request.webhook, settings)
    images = []
    for index, file in enumerate(files):
        try:
            image = read_upload(file, settings)
        except ApiError as exc:
            raise exc.about_image(index, file.filename or "") from None
        assert image is not None  # a file was given
        images.append(UploadedImage(file.filename or "", image))
    return BatchUpload(batch_request, images)


def _questions(raw: str | None) -> list[str]:
    """The `questions` field: a JSON array of at least one non-blank string."""
    message = "questions: a JSON array of one or more non-empty strings is expected"
    if raw is None:
        raise ValidationError("questions_invalid", message)
    try:
        questions = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValidationError("questions_invalid", message) from None
    if not isinstance(questions, list) or not questions:
        raise ValidationError("questions_invalid", message)
    if not all(isinstance(question, str) and question.strip() for question in questions):
        raise ValidationError("questions_invalid", message)
    return questions
