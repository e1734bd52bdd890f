"""A batch's request (JSON, or a form of uploaded images), its query string, its answers, and the validation of its
body (each item as a job's)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, create_model
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from api.context import MAX_WAIT_S
from api.errors import ValidationError
from api.schemas.errors import ErrorDetail, translate
from api.schemas.fields import (
    DEADLINE_DESCRIPTION,
    PRIORITY_DESCRIPTION,
    PROMPT_DESCRIPTION,
    QUESTION_DESCRIPTION,
    TASK_DESCRIPTION,
    DeadlineSeconds,
    OptionalJsonField,
    Prompt,
    Question,
    Upload,
    no_default,
)
from api.schemas.jobs import ESTIMATE_DESCRIPTION, Estimate, WebhookDelivery, check_task_fields
from contract.states import JobPriority, JobStatus, JobTask

BATCH_EXAMPLE: JsonDict = {
    "images": ["https://images.example.com/1.jpg", "https://images.example.com/2.jpg"],
    "questions": ["what color is the shape?", "is there a circle?"],
    "priority": "low",
}


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
            json_schema_extra=no_default,
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


class BatchWaitQuery(BaseModel):
    """The query string of `GET /v1/batches/{batch_id}`."""

    wait: Annotated[float, Field(gt=0, le=MAX_WAIT_S)] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=no_default,
        description=(
            f"Long polling: the batch is answered as soon as its `ended` count differs from `after`, once every item "
            f"ended, or after this many seconds (above 0, at most {MAX_WAIT_S:g}). Without it, the batch is answered "
            f"as it is now."
        ),
    )
    after: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=no_default,
        description=(
            "With `wait`: the `ended` count the caller last saw. A batch whose count differs is answered at once, so "
            "that no item's end between two reads is missed. Default: the count when the read begins."
        ),
    )


class PageQuery(BaseModel):
    """The query string of `GET /v1/batches/{batch_id}/results`."""

    offset: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=no_default, description="The first item (0-based). Default 0."
    )
    limit: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=no_default, description="At most this many items. Default: all the rest."
    )
    status: JobStatus | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=no_default,
        description="Only the items of this status, of those `offset` and `limit` choose (`failed`: the failures).",
    )


def _item_text(item: BatchItem, batch: BatchRequest) -> str:
    if batch.task is JobTask.CAPTION:
        return item.prompt if item.prompt is not None else batch.prompt or ""
    return item.question or ""


class BatchAccepted(BaseModel):
    """A batch stored and enqueued: poll `GET /v1/batches/{id}` (the Location header), then read its results."""

    id: str = Field(description="The batch's id: 128 random bits, URL-safe.")
    count: int = Field(ge=1, description="How many answers the batch asks for: one job per item.")
    estimate: Estimate | None = Field(description=f"{ESTIMATE_DESCRIPTION} Of its last item.")


class BatchCounts(BaseModel):
    """How many of the batch's items are in each status."""

    queued: int = Field(ge=0)
    running: int = Field(ge=0)
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    canceled: int = Field(ge=0)
    expired: int = Field(ge=0)


class BatchResponse(BaseModel):
    """A batch as the API shows it (contract.batches.Batch.summary, and its end estimate); its webhook receives this,
    less the delivery and the estimate."""

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
    estimate: Estimate | None = Field(description=f"{ESTIMATE_DESCRIPTION} Of its last item.")


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


def validate_batch_request(data: Any, max_question_chars: int, max_deadline_s: int | None = None) -> BatchRequest:
    """Validate a batch request body as validate_job_request does a job's; a batch's items are checked as jobs."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    context = {"max_question_chars": max_question_chars, "max_deadline_s": max_deadline_s}
    try:
        batch_request = BatchRequest.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise translate(exc.errors()[0]) from None
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
