"""What a job and a batch validate alike (a question, a prompt, a deadline) and their descriptions, and the fields of
an upload."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, WithJsonSchema
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError


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


def no_default(schema: dict[str, Any]) -> None:
    """Leave a field's `"default": null` out of its schema: absent, the field is not sent, never sent as null."""
    schema.pop("default", None)


# An uploaded file, in OpenAPI 3.1's spelling (the content of a multipart part), and a form field that holds JSON.
FILE_SCHEMA: JsonDict = {"type": "string", "contentMediaType": "application/octet-stream"}
Upload = Annotated[bytes, WithJsonSchema(FILE_SCHEMA)]
OptionalUpload = Annotated[bytes | None, WithJsonSchema(FILE_SCHEMA)]
OptionalJsonField = Annotated[str | None, WithJsonSchema({"type": "string", "contentMediaType": "application/json"})]
