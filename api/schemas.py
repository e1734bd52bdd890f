"""Request and response schemas (pydantic), and the translation of request errors into stable error codes.

The response models, and the request models of forms, query strings and headers, validate nothing at run time: they
describe what the API answers and takes, for /openapi.json (the views read forms, queries and headers themselves).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    RootModel,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    create_model,
)
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from api.context import MAX_WAIT_S
from api.errors import RefusedImage, ValidationError
from api.request_body import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN
from contract.fleet import WorkerRecord
from contract.jobs import STATS_FIELDS
from contract.states import JobPriority, JobStatus, JobTask

# (field, pydantic error type) -> our code; the first match wins, (field, None) matches any type.
ERROR_CODES = {
    ("question", "missing"): "question_missing",
    ("question", "string_too_short"): "question_empty",
    ("question", "question_too_long"): "question_too_long",
    ("question", None): "question_invalid",
    ("prompt", "prompt_too_long"): "prompt_too_long",
    ("prompt", None): "prompt_invalid",
    ("task", None): "task_invalid",
    ("image_url", None): "image_url_invalid",
    ("priority", None): "priority_invalid",
    ("deadline_s", None): "deadline_invalid",
    ("webhook", None): "webhook_invalid",
    (None, "extra_forbidden"): "unknown_field",
}


def _deadline_is_a_number(deadline_s: Any) -> Any:
    if isinstance(deadline_s, bool):  # pydantic would take true for 1 second
        raise PydanticCustomError("float_type", "Input should be a number of seconds")
    return deadline_s


def _deadline_fits(deadline_s: float, info: ValidationInfo) -> float:
    limit = (info.context or {}).get("max_deadline_s")
    if limit is not None and deadline_s > limit:
        raise PydanticCustomError(
            "deadline_too_long",
            "the deadline is {deadline} s; jobs expire after {limit} s, the longest deadline",
            {"deadline": deadline_s, "limit": limit},
        )
    return deadline_s


def _text_fits(what: str) -> Any:
    """A validator that refuses a `what` (question, prompt) over the deployment's length limit for questions."""

    def fits(text: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_question_chars")
        if limit is not None and len(text) > limit:
            raise PydanticCustomError(
                f"{what}_too_long",
                "the {what} is {length} characters; the limit is {limit}",
                {"what": what, "length": len(text), "limit": limit},
            )
        return text

    return fits


# A job's fields as types, so that a batch validates its questions and options exactly as a job does.
Question = Annotated[str, Field(min_length=1), AfterValidator(_text_fits("question"))]
Prompt = Annotated[str, AfterValidator(_text_fits("prompt"))]  # "" (or blank) is an unconditional caption
DeadlineSeconds = Annotated[
    float, BeforeValidator(_deadline_is_a_number), Field(gt=0, allow_inf_nan=False), AfterValidator(_deadline_fits)
]
PRIORITY_DESCRIPTION = "`high` jobs run before `normal` ones, which run before `low` ones."
DEADLINE_DESCRIPTION = "Seconds from submission: a job still queued then ends `expired`, unrun. At most the job TTL."
TASK_DESCRIPTION = (
    "`vqa` (the default) answers `question` about the image; `caption` describes the image, continuing `prompt` "
    "when one is given. Each task is served by workers of its own."
)
QUESTION_DESCRIPTION = "The question to answer about the image: required for `vqa`, refused for `caption`."
PROMPT_DESCRIPTION = (
    "`caption` only: the caption starts with this text (conditional captioning); absent or empty, the model "
    "captions freely. Refused for `vqa`."
)


JSON_EXAMPLE: JsonDict = {
    "image_url": "https://images.example.com/dog.jpg",
    "question": "how many dogs are in the picture?",
}
BATCH_EXAMPLE: JsonDict = {
    "images": ["https://images.example.com/1.jpg", "https://images.example.com/2.jpg"],
    "questions": ["what color is the shape?", "is there a circle?"],
    "priority": "low",
}


def _no_default(schema: dict[str, Any]) -> None:
    """Leave a field's `"default": null` out of its schema: absent, the field is not sent, never sent as null."""
    schema.pop("default", None)


# An uploaded file, in OpenAPI 3.1's spelling (the content of a multipart part), and a form field that holds JSON.
FILE_SCHEMA: JsonDict = {"type": "string", "contentMediaType": "application/octet-stream"}
Upload = Annotated[bytes, WithJsonSchema(FILE_SCHEMA)]
OptionalUpload = Annotated[bytes | None, WithJsonSchema(FILE_SCHEMA)]
OptionalJsonField = Annotated[str | None, WithJsonSchema({"type": "string", "contentMediaType": "application/json"})]


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


class BatchItem(BaseModel):
    """One question about one image of a batch, or one caption of it (the batch's `task`), by URL."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    image_url: HttpUrl = Field(description="An http(s) URL of the image.")
    question: Question | None = Field(default=None, description=QUESTION_DESCRIPTION)
    prompt: Prompt | None = Field(default=None, description=PROMPT_DESCRIPTION + " Default: the batch's `prompt`.")


class BatchRequest(BaseModel):
    """Many questions about images at once: `items`, or every one of `questions` about every one of `images`.

    With `"task": "caption"`: `items` (each an image and an optional prompt), or `images`, each captioned once. With
    `"caption": true`, every one of `questions` about every image and a caption of each, in one batch.
    """

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [BATCH_EXAMPLE]}
    )

    task: JobTask = Field(
        default=JobTask.VQA,
        description=TASK_DESCRIPTION + " One task for every item, but the captions that `caption` asks for.",
    )
    items: list[BatchItem] | None = Field(default=None, description="Each item is one question about one image.")
    images: list[HttpUrl] | None = Field(
        default=None, description="Image URLs: each is asked every question (`caption`: captioned once)."
    )
    questions: list[Question] | None = Field(
        default=None, description="`vqa`: the questions asked about every image. Refused for `caption`."
    )
    caption: bool = Field(
        default=False,
        description=(
            "`vqa` with `images` and `questions`: caption every image too, once, continuing `prompt`. The captions go "
            "to the captioning workers and the questions to the vqa workers, each image sent (and uploaded) once."
        ),
    )
    prompt: Prompt | None = Field(
        default=None,
        description=("`caption`, or `vqa` with `caption`: the prompt of every caption (an item's own `prompt` wins)."),
    )
    priority: JobPriority = Field(default=JobPriority.NORMAL, description=PRIORITY_DESCRIPTION)
    deadline_s: DeadlineSeconds | None = Field(default=None, description=DEADLINE_DESCRIPTION)
    webhook: HttpUrl | None = Field(
        default=None, description="An http(s) URL that is POSTed the batch's summary, signed, when its last item ends."
    )
    webhook_items: bool = Field(default=False, description="Also POST each item's job to `webhook` when it ends.")

    def tasks(self) -> list[JobTask]:
        """The tasks of its items: its own, and `caption` when a vqa batch captions its images too."""
        return [self.task, JobTask.CAPTION] if self.captions_too else [self.task]

    @property
    def captions_too(self) -> bool:
        """Whether it is a vqa batch that captions every image too."""
        return self.task is JobTask.VQA and self.caption

    def asked(self) -> list[tuple[JobTask, str]]:
        """What the tagging shape asks of every image, in item order: its questions, then its caption's prompt when it
        captions its images too; or for a caption batch the one prompt ("": none)."""
        if self.task is JobTask.CAPTION:
            return [(JobTask.CAPTION, self.prompt or "")]
        questions = [(JobTask.VQA, question) for question in self.questions or ()]
        return questions + ([(JobTask.CAPTION, self.prompt or "")] if self.caption else [])

    def pairs(self) -> list[tuple[str, JobTask, str]]:
        """The batch's (image URL, task, text) in item order: for the tagging shape, image by image.

        A text is a question, or a caption's prompt ("": none).
        """
        if self.items is not None:
            return [(str(item.image_url), self.task, _item_text(item, self)) for item in self.items]
        return [(str(image), task, text) for image in self.images or () for task, text in self.asked()]


class JobForm(JobRequest):
    """A job as form fields, with the image uploaded as the file `image` (or `image_url` given)."""

    model_config = ConfigDict(json_schema_extra=None)

    image: OptionalUpload = Field(
        default=None,
        json_schema_extra=_no_default,
        description="The image file: JPEG, PNG, WebP, GIF, BMP or TIFF, recognised by its content.",
    )


# A batch upload's form: the images as files, `questions` as JSON in a field, and a JSON batch's options.
BATCH_FORM_OPTIONS = ("task", "caption", "prompt", "priority", "deadline_s", "webhook", "webhook_items")
BatchForm = create_model(
    "BatchForm",
    __config__=ConfigDict(extra="forbid"),
    __doc__=(
        "A batch of uploaded images: every question about every image, items ordered image by image; the whole body "
        "at most BLIPQ_MAX_BATCH_UPLOAD_BYTES."
    ),
    images=(
        list[Upload],
        Field(
            description=(
                "The image files (the field repeated), each at most BLIPQ_MAX_IMAGE_BYTES: JPEG, PNG, WebP, GIF, BMP "
                "or TIFF. Each is stored once, for all its questions, and expires with the batch after the TTL."
            )
        ),
    ),
    questions=(
        OptionalJsonField,
        Field(
            default=None,
            json_schema_extra=_no_default,
            description=(
                'A JSON array of the questions asked about every image, e.g. `["what is it?"]`: required for `vqa`, '
                "refused for `caption`."
            ),
        ),
    ),
    **{
        name: (BatchRequest.model_fields[name].annotation, BatchRequest.model_fields[name])
        for name in BATCH_FORM_OPTIONS
    },  # type: ignore[call-overload]
)


class WaitQuery(BaseModel):
    """The query string of `GET /v1/jobs/{job_id}`."""

    wait: Annotated[float, Field(gt=0, le=MAX_WAIT_S)] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_no_default,
        description=(
            f"Long polling: a job that has not ended is answered when it ends, or after this many seconds (above 0, "
            f"at most {MAX_WAIT_S:g}). Without it, the job is answered as it is now."
        ),
    )


class PageQuery(BaseModel):
    """The query string of `GET /v1/batches/{batch_id}/results`."""

    offset: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="The first item (0-based). Default 0."
    )
    limit: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default, description="At most this many items. Default: all the rest."
    )


IdempotencyKey = Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN.pattern)] | SkipJsonSchema[None]


class IdempotencyHeaders(BaseModel):
    """The headers a job submission reads."""

    # The alias is the header's name, kept in one constant (mypy wants a literal there).
    idempotency_key: IdempotencyKey = Field(  # type: ignore[literal-required]
        default=None,
        json_schema_extra=_no_default,
        alias=IDEMPOTENCY_HEADER,
        description=(
            "Makes a retry safe: the same request again with the same key (same API key, same body) answers the first "
            "request's job, with `Idempotent-Replayed: true`, for as long as that job is kept; the same key with "
            "another body is `409 idempotency_conflict`."
        ),
    )


class MetricsText(RootModel[str]):
    """Prometheus's text format."""


def _item_text(item: BatchItem, batch: BatchRequest) -> str:
    if batch.task is JobTask.CAPTION:
        return item.prompt if item.prompt is not None else batch.prompt or ""
    return item.question or ""


class ErrorImage(BaseModel):
    """The image of a batch that a refusal is about."""

    index: int = Field(ge=0, description="Its place in the batch's `images` (the uploaded files, in order), from 0.")
    name: str = Field(description="Its file name (an upload) or its URL.")


class ErrorDetail(BaseModel):
    """What went wrong: a stable code for programs and a message for humans."""

    code: str = Field(description="Stable and machine-readable, such as `question_empty`.")
    message: str = Field(description="For humans; its wording may change.")
    image: ErrorImage | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_no_default,
        description=(
            "Only in a refusal of a batch about one of its images (`image_invalid`, `image_too_large`, "
            "`image_url_invalid`): which one. A client may take it out and send the rest again."
        ),
    )


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


class BatchAccepted(BaseModel):
    """A batch stored and enqueued: poll `GET /v1/batches/{id}` (the Location header), then read its results."""

    id: str = Field(description="The batch's id: 128 random bits, URL-safe.")
    count: int = Field(ge=1, description="How many answers the batch asks for: one job per item.")


class BatchCounts(BaseModel):
    """How many of the batch's items are in each status."""

    queued: int = Field(ge=0)
    running: int = Field(ge=0)
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    canceled: int = Field(ge=0)
    expired: int = Field(ge=0)


class BatchResponse(BaseModel):
    """A batch as the API shows it (contract.batches.Batch.summary); its webhook receives this, less the
    delivery."""

    model_config = ConfigDict(extra="forbid")

    id: str
    count: int = Field(ge=1)
    counts: BatchCounts
    errors: dict[str, int] = Field(description="Failed items by error code (`deadline_exceeded` for expired ones).")
    ended: int = Field(ge=0, description="Items that ended, in any of the four end states.")
    progress: float = Field(ge=0, le=1, description="`ended` / `count`.")
    created_at: datetime
    task: JobTask
    caption: bool = Field(description="A `vqa` batch that captions every image too (`caption` of its request).")
    priority: JobPriority
    webhook: str | None = Field(description="The URL told the batch's summary when its last item ends.")
    webhook_delivery: WebhookDelivery | None = Field(description="Set once the last item ended, with a webhook.")


class BatchResult(BaseModel):
    """One line of `GET /v1/batches/{id}/results`: one item, in item order."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    job_id: str
    task: JobTask | None = Field(description="null only when the item's job expired.")
    image_url: str | None = Field(
        description="null for an uploaded image, and when the item's job expired (with its batch, after the TTL)."
    )
    image_name: str | None = Field(description="The uploaded image's file name; null for an image by URL.")
    question: str | None = Field(description="A `vqa` item's question.")
    prompt: str | None = Field(description="A `caption` item's prompt; null without one.")
    status: JobStatus | None
    answer: str | None = Field(description="The answer, or for `caption` the caption, once the item succeeded.")
    error: ErrorDetail | None


class BatchCancelCounts(BaseModel):
    """What a batch cancel did to its items."""

    canceled: int = Field(ge=0, description="Queued items now `canceled`: they never run.")
    cancel_requested: int = Field(ge=0, description="Running items, marked `cancel_requested`: they run to their end.")
    already_ended: int = Field(ge=0, description="Items that had ended.")


# One field per counter of the job store, so that a new counter is documented as soon as it is kept.
Stats = create_model(
    "Stats",
    __doc__="The fleet's reliability counters, since Redis started keeping them.",
    **{name: (int, Field(ge=0)) for name in STATS_FIELDS},  # type: ignore[call-overload]
)


class Health(BaseModel):
    """The API process is alive."""

    status: Literal["ok"]


class TaskWorkers(BaseModel):
    """A task's queue, and the workers serving it with their model loaded."""

    queue: str
    workers: list[WorkerRecord]


class Readiness(BaseModel):
    """Whether jobs submitted now will run: Redis answers, and each task the deployment serves (BLIPQ_TASKS) has a
    worker with its model loaded."""

    status: Literal["ready", "not_ready"]
    redis: Literal["ok", "unreachable"]
    tasks: dict[JobTask, TaskWorkers] = Field(description="Each task the deployment serves (empty when Redis is away).")
    missing: list[str] = Field(description="What keeps the service from being ready: `redis`, or `worker:<task>`.")


class ImageSize(BaseModel):
    """The size, in pixels, that a model's processor resizes every image to."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class ModelEntry(BaseModel):
    """A task the API takes jobs for, and what serves it."""

    task: JobTask
    queue: str
    models: list[str] = Field(description="The models its live workers serve (a model id or a directory).")
    image_size: ImageSize | None = Field(
        description=(
            "The model input size its live workers publish (the largest, should they differ): a picture shrunk to it "
            "before upload is answered as the original would be, for fewer bytes. null when no live worker says."
        )
    )
    decode: str | None = Field(
        description="How its live workers decode images, when they publish it and all the same way; else null."
    )
    resample: str | None = Field(
        description=(
            "The PIL filter its live workers' processors resize with (`bicubic`), when they publish it and all the "
            "same one; else null."
        )
    )
    workers: list[WorkerRecord]
    waiting: int = Field(ge=0, description="Answers waiting in its queue (single jobs and batch items not started).")
    outcomes: dict[str, int] = Field(description="Runs of its jobs by how they ended, since Redis started counting.")


class UploadLimits(BaseModel):
    """What the API accepts of a submission (its settings), so that a client can check its files before it sends."""

    max_image_bytes: int = Field(ge=1, description="BLIPQ_MAX_IMAGE_BYTES: the largest image, uploaded or by URL.")
    max_image_pixels: int = Field(ge=1, description="BLIPQ_MAX_IMAGE_PIXELS: the most pixels an image may have.")
    max_batch_upload_bytes: int = Field(ge=1, description="BLIPQ_MAX_BATCH_UPLOAD_BYTES: a batch upload's body.")
    max_question_chars: int = Field(ge=1, description="BLIPQ_MAX_QUESTION_CHARS: the longest question or prompt.")


class Models(BaseModel):
    """The tasks the API takes jobs for, and the limits of what it takes."""

    limits: UploadLimits
    models: list[ModelEntry]


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
        raise _translate(exc.errors()[0]) from None
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


def validate_batch_request(data: Any, max_question_chars: int, max_deadline_s: int | None = None) -> BatchRequest:
    """Validate a batch request body as validate_job_request does a job's; a batch's items are checked as jobs."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    context = {"max_question_chars": max_question_chars, "max_deadline_s": max_deadline_s}
    try:
        batch_request = BatchRequest.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise _translate(exc.errors()[0]) from None
    _check_batch_task_fields(batch_request)
    return batch_request


def _check_batch_task_fields(batch: BatchRequest) -> None:
    """A batch's fields against its task, as check_task_fields does a job's, each item as a job."""
    if batch.task is JobTask.CAPTION and batch.questions is not None:
        message = "questions: a caption batch asks no questions; give an optional 'prompt' instead"
        raise ValidationError("question_not_allowed", message)
    if batch.task is JobTask.VQA and batch.prompt is not None and not batch.caption:
        message = (
            "prompt: only captions take a prompt (task 'caption', or 'caption': true); a vqa batch asks 'questions'"
        )
        raise ValidationError("prompt_not_allowed", message)
    if batch.caption and (batch.task is JobTask.CAPTION or batch.items is not None):
        message = "caption: true goes with a vqa batch of 'images' and 'questions' (a caption batch captions already)"
        raise ValidationError("batch_invalid", message)
    for index, item in enumerate(batch.items or ()):
        # A caption item may leave its prompt to the batch's; a vqa item needs its own question.
        check_task_fields(batch.task, item.question, item.prompt, where=f"items.{index}.")


# A batch's lists, named by what their elements are: `images.3` is an image_url, `questions.0` a question.
BATCH_LIST_FIELDS = {"images": "image_url", "questions": "question"}


def _translate(error: Any) -> ValidationError:
    loc = error["loc"]
    field = str(loc[0]) if loc else None
    if field == "items" and len(loc) >= 3:  # items.<i>.<field>: the item's field decides the code
        field = str(loc[2])
    elif field in BATCH_LIST_FIELDS and len(loc) >= 2:
        field = BATCH_LIST_FIELDS[field]
    where = ".".join(str(part) for part in loc)
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
        message = "this field is not part of a request of this kind"
    image = None
    if len(loc) >= 2 and loc[0] == "images" and isinstance(loc[1], int):  # one image URL of the tagging shape
        image = RefusedImage(loc[1], str(error.get("input", "")))
    return ValidationError(code, f"{where}: {message}" if where else message, image=image)
