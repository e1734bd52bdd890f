"""Request and response schemas (pydantic), and the translation of request errors into stable error codes.

The response models validate nothing at run time: they describe what the API answers, for /openapi.json.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from api.errors import ValidationError
from worker.fleet import WorkerRecord
from worker.jobs import STATS_FIELDS
from worker.states import JobPriority, JobStatus

# (field, pydantic error type) -> our code; the first match wins, (field, None) matches any type.
ERROR_CODES = {
    ("question", "missing"): "question_missing",
    ("question", "string_too_short"): "question_empty",
    ("question", "question_too_long"): "question_too_long",
    ("question", None): "question_invalid",
    ("image_url", None): "image_url_invalid",
    ("priority", None): "priority_invalid",
    ("deadline_s", None): "deadline_invalid",
    ("webhook", None): "webhook_invalid",
    (None, "extra_forbidden"): "unknown_field",
}


class JobRequest(BaseModel):
    """One question about one image; the image is a URL here or an upload beside it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    question: str = Field(min_length=1, description="The question to answer about the image.")
    image_url: HttpUrl | None = Field(default=None, description="An http(s) URL of the image.")
    priority: JobPriority = Field(
        default=JobPriority.NORMAL, description="`high` jobs run before `normal` ones, which run before `low` ones."
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds from submission: a job still queued then ends `expired`, unrun. At most the job TTL.",
    )
    webhook: HttpUrl | None = Field(
        default=None, description="An http(s) URL that is POSTed the job, signed, when it ends."
    )

    @field_validator("deadline_s", mode="before")
    @classmethod
    def _deadline_is_a_number(cls, deadline_s: Any) -> Any:
        if isinstance(deadline_s, bool):  # pydantic would take true for 1 second
            raise PydanticCustomError("float_type", "Input should be a number of seconds")
        return deadline_s

    @field_validator("deadline_s")
    @classmethod
    def _deadline_fits(cls, deadline_s: float | None, info: ValidationInfo) -> float | None:
        limit = (info.context or {}).get("max_deadline_s")
        if deadline_s is not None and limit is not None and deadline_s > limit:
            raise PydanticCustomError(
                "deadline_too_long",
                "the deadline is {deadline} s; jobs expire after {limit} s, the longest deadline",
                {"deadline": deadline_s, "limit": limit},
            )
        return deadline_s

    @field_validator("question")
    @classmethod
    def _question_fits(cls, question: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_question_chars")
        if limit is not None and len(question) > limit:
            raise PydanticCustomError(
                "question_too_long",
                "the question is {length} characters; the limit is {limit}",
                {"length": len(question), "limit": limit},
            )
        return question


class ErrorDetail(BaseModel):
    """What went wrong: a stable code for programs and a message for humans."""

    code: str = Field(description="Stable and machine-readable, such as `question_empty`.")
    message: str = Field(description="For humans; its wording may change.")


class Error(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class JobAccepted(BaseModel):
    """A job stored and enqueued: poll `GET /v1/jobs/{id}` (the Location header) for its answer."""

    id: str = Field(description="The job's id: 128 random bits, URL-safe.")
    status: JobStatus = Field(description="Always `queued` here.")


class WebhookDelivery(BaseModel):
    """Where the delivery of a job's webhook stands, once the job ended."""

    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(ge=0)
    error: ErrorDetail | None = Field(description="Why the last attempt failed.")


class JobResponse(BaseModel):
    """A job as the API shows it (worker.jobs.Job.to_public): every field is always there, null when unset."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: JobStatus
    question: str
    image_url: str | None = Field(description="The image's URL; null for an uploaded image.")
    answer: str | None = Field(description="The model's answer; set once the job succeeded.")
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


# One field per counter of the job store, so that a new counter is documented as soon as it is kept.
Stats = create_model(
    "Stats",
    __doc__="The fleet's reliability counters, since Redis started keeping them.",
    **{name: (int, Field(ge=0)) for name in STATS_FIELDS},  # type: ignore[call-overload]
)


class Health(BaseModel):
    """The API process is alive."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Whether jobs submitted now will run: Redis answers, and a worker with its model loaded serves the queue."""

    status: Literal["ready", "not_ready"]
    queue: str
    redis: Literal["ok", "unreachable"]
    workers: list[WorkerRecord] = Field(description="The pool processes serving the queue with their model loaded.")
    missing: list[Literal["redis", "worker"]] = Field(description="What keeps the service from being ready.")


def validate_job_request(data: Any, max_question_chars: int, max_deadline_s: int | None = None) -> JobRequest:
    """Validate a request body; raises ValidationError with the code and the field of the first problem."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    context = {"max_question_chars": max_question_chars, "max_deadline_s": max_deadline_s}
    try:
        return JobRequest.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise _translate(exc.errors()[0]) from None


def _translate(error: Any) -> ValidationError:
    field = str(error["loc"][0]) if error["loc"] else None
    kind = error["type"]
    code = next(
        (
            code
            for (want_field, want_kind), code in ERROR_CODES.items()
            if want_field in (field, None) and want_kind in (kind, None)
        ),
        "invalid_field",
    )
    message = error["msg"]
    if kind == "extra_forbidden":
        message = "this field is not part of a job"
    return ValidationError(code, f"{field}: {message}" if field else message)
