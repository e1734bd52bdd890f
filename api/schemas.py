"""Request schemas (pydantic), and the translation of their errors into stable error codes."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from api.errors import ValidationError

# (field, pydantic error type) -> our code; the first match wins, (field, None) matches any type.
ERROR_CODES = {
    ("question", "missing"): "question_missing",
    ("question", "string_too_short"): "question_empty",
    ("question", "question_too_long"): "question_too_long",
    ("question", None): "question_invalid",
    ("image_url", None): "image_url_invalid",
    (None, "extra_forbidden"): "unknown_field",
}


class JobRequest(BaseModel):
    """One question about one image; the image is a URL here or an upload beside it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    question: str = Field(min_length=1, description="The question to answer about the image.")
    image_url: HttpUrl | None = Field(default=None, description="An http(s) URL of the image.")

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


def validate_job_request(data: Any, max_question_chars: int) -> JobRequest:
    """Validate a request body; raises ValidationError with the code and the field of the first problem."""
    if not isinstance(data, dict):
        raise ValidationError("invalid_body", "the body must be a JSON object")
    try:
        return JobRequest.model_validate(data, context={"max_question_chars": max_question_chars})
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
