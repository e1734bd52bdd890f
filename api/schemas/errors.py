"""The body of every error response, and the translation of a request's validation errors into stable error codes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from api.errors import RefusedImage, ValidationError
from api.schemas.fields import no_default

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
        json_schema_extra=no_default,
        description=(
            "Only in a refusal of a batch about one of its images (`image_invalid`, `image_too_large`, "
            "`image_url_invalid`): which one. A client may take it out and send the rest again."
        ),
    )


class Error(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


# A batch's lists, named by what their elements are: `images.3` is an image_url, `questions.0` a question.
BATCH_LIST_FIELDS = {"images": "image_url", "questions": "question"}


def translate(error: Any) -> ValidationError:
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
