"""A job's request (JSON, or a form with its upload), its query string and headers, its answers, and the validation of
its body."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from api.context import MAX_WAIT_S
from api.errors import ValidationError
from api.request_body import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN
from api.schemas.errors import ErrorDetail, translate
from api.schemas.fields import (
    DEADLINE_DESCRIPTION,
    PRIORITY_DESCRIPTION,
    PROMPT_DESCRIPTION,
    QUESTION_DESCRIPTION,
    TASK_DESCRIPTION,
    DeadlineSeconds,
    OptionalUpload,
    Prompt,
    Question,
    no_default,
)
from contract.states import JobPriority, JobStatus, JobTask

JSON_EXAMPLE: JsonDict = {
    "image_url": "https://images.example.com/dog.jpg",
    "question": "how many dogs are in the picture?",
}


class JobRequest(BaseModel):
    """One question about one image, or a caption of it; the image is a URL here or an upload beside it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [JSON_EXAMPLE]})

    task: JobTask = Field(default=JobTask.VQA, description=TASK_DESCRIPTION)
    question: Question | None = Field(default=None, description=QUESTION_DESCRIPTION)
    prompt: Prompt | None = Field(default=None, description=PROMPT_DESCRIPTION)
    image_url: HttpUrl | None = Field(default=None, description="An http(s) URL of the image.")
    priority: JobPriority = Field(default=JobPriority.NORMAL, description=PRIORITY_DESCRIPTION)
    deadline_s: DeadlineSeconds | None = Field(default=None, description=DEADLINE_DESCRIPTION)
    webhook: HttpUrl | None = Field(
        default=None, description="An http(s) URL that is POSTed the job, signed, when it ends."
    )


class JobForm(JobRequest):
    """A job as form fields, with the image uploaded as the file `image` (or `image_url` given)."""

    model_config = ConfigDict(json_schema_extra=None)

    image: OptionalUpload = Field(
        default=None,
        json_schema_extra=no_default,
        description="The image file: JPEG, PNG, WebP, GIF, BMP or TIFF, recognised by its content.",
    )


class WaitQuery(BaseModel):
    """The query string of `GET /v1/jobs/{job_id}`."""

    wait: Annotated[float, Field(gt=0, le=MAX_WAIT_S)] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=no_default,
        description=(
            f"Long polling: a job that has not ended is answered when it ends, or after this many seconds (above 0, "
            f"at most {MAX_WAIT_S:g}). Without it, the job is answered as it is now."
        ),
    )


IdempotencyKey = Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN.pattern)] | SkipJsonSchema[None]


class IdempotencyHeaders(BaseModel):
    """The headers a job submission reads."""

    # The alias is the header's name, kept in one constant (mypy wants a literal there).
    idempotency_key: IdempotencyKey = Field(  # type: ignore[literal-required]
        default=None,
        json_schema_extra=no_default,
        alias=IDEMPOTENCY_HEADER,
        description=(
            "Makes a retry safe: the same request again with the same key (same API key, same body) answers the first "
            "request's job, with `Idempotent-Replayed: true`, for as long as that job is kept; the same key with "
            "another body is `409 idempotency_conflict`."
        ),
    )


class Estimate(BaseModel):
    """When a job (or a batch's last item) should end, at the rate the fleet drains its queue now (api/estimates.py):
    recomputed at each read. `null` in its place: it ended."""

    model_config = ConfigDict(extra="forbid")

    ends_in_s: float | None = Field(
        ge=0, description="Seconds from now until it should end; null when no rate is known (`reason` says why)."
    )
    ends_at: datetime | None = Field(description="Now plus `ends_in_s`; null with it.")
    answers_ahead: int = Field(
        ge=0,
        description=(
            "Answers waiting that workers take before its own last one: those at its priority level queued before it, "
            "and every one at the levels above."
        ),
    )
    answers_per_s: float | None = Field(
        gt=0,
        description=(
            "The fleet's rate for its queue: its live workers' answers per busy second (measured over the last "
            "minute) times their number; null with `ends_in_s`."
        ),
    )
    reason: Literal["no_worker", "no_rate"] | None = Field(
        description=(
            "Why there is no estimate: `no_worker`, no live worker serves its queue (it waits for one); `no_rate`, "
            "workers are live and none has measured its rate yet. null with an estimate."
        )
    )


ESTIMATE_DESCRIPTION = "Its end estimate, recomputed at each read; null once it ended."


class JobAccepted(BaseModel):
    """A job stored and enqueued: poll `GET /v1/jobs/{id}` (the Location header) for its answer."""

    id: str = Field(description="The job's id: 128 random bits, URL-safe.")
    status: JobStatus = Field(description="Always `queued` here.")
    estimate: Estimate | None = Field(description=ESTIMATE_DESCRIPTION)


class WebhookDelivery(BaseModel):
    """Where the delivery of a job's webhook stands, once the job ended."""

    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(ge=0)
    error: ErrorDetail | None = Field(description="Why the last attempt failed.")


class JobResponse(BaseModel):
    """A job as the API shows it (contract.jobs.Job.to_public): every field is always there, null when unset."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: JobStatus
    task: JobTask = Field(description="`vqa`: `answer` answers `question`; `caption`: `answer` is the caption.")
    question: str | None = Field(description="A `vqa` job's question; null for a `caption` job.")
    prompt: str | None = Field(description="A `caption` job's prompt; null without one, and for a `vqa` job.")
    image_url: str | None = Field(description="The image's URL; null for an uploaded image.")
    image_name: str | None = Field(description="The file name of a batch's uploaded image; null otherwise.")
    answer: str | None = Field(
        description="The model's answer (for `caption`, the caption); set once the job succeeded."
    )
    error: ErrorDetail | None = Field(description="Why the job failed; set once it failed.")
    model: str | None = Field(description="The model that answers (a hub id or a directory); set once it started.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    priority: JobPriority
    deadline_at: datetime | None = Field(description="When the job ends `expired` if it is still queued.")
    cancel_requested: bool = Field(description="A cancel came while the job ran: it runs to its end all the same.")
    webhook: str | None = Field(description="The URL told when the job ends.")
    webhook_delivery: WebhookDelivery | None = Field(description="Set once the job ended, when it names a webhook.")
    batch_id: str | None = Field(description="The batch the job is an item of; null for a job submitted alone.")
    estimate: Estimate | None = Field(
        description=(
            f"{ESTIMATE_DESCRIPTION} A batch item shows its batch's (the end of its last item). A webhook's body "
            "has none."
        )
    )


def validate_job_request(data: Any, max_question_chars: int, max_deadline_s: int | None = None) -> JobRequest:
    """Validate a request body; raises ValidationError with the code and the field of the first problem."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    if data.get("task", JobTask.VQA) == JobTask.VQA and "question" not in data:  # first, as when it was required
        raise ValidationError("question_missing", "question: a vqa job asks a question (or send task 'caption')")
    context = {"max_question_chars": max_question_chars, "max_deadline_s": max_deadline_s}
    try:
        job_request = JobRequest.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise translate(exc.errors()[0]) from None
    check_task_fields(job_request.task, job_request.question, job_request.prompt)
    return job_request


def check_task_fields(task: JobTask, question: str | None, prompt: str | None, where: str = "") -> None:
    """Refuse a question on a caption, a prompt on a vqa job, and a vqa job without its question."""
    if task is JobTask.CAPTION and question is not None:
        message = "a caption job asks no question; give an optional 'prompt' instead"
        raise ValidationError("question_not_allowed", f"{where}question: {message}")
    if task is JobTask.VQA and prompt is not None:
        message = "only a caption job (task 'caption') takes a prompt; a vqa job asks a 'question'"
        raise ValidationError("prompt_not_allowed", f"{where}prompt: {message}")
    if task is JobTask.VQA and question is None:
        raise ValidationError("question_missing", f"{where}question: a vqa job asks a question")
