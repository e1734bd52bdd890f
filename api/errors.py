"""API errors: each has an HTTP status and a stable code, and is answered as {"error": {"code", "message"}}.

The codes, their statuses and meanings are contract.errors.REGISTRY's; the web framework's own errors (an
unknown route, a wrong method) get the code that the registry gives their status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import redis
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from contract.errors import FRAMEWORK_CODES, FRAMEWORK_FALLBACK_CODE, http_status

log = logging.getLogger("blipq.api")

STORE_RETRY_AFTER_S = 2  # what a client is told to wait while Redis is away (a restart takes seconds)


class ApiError(Exception):
    """Root of the errors the API answers with; subclasses fix the HTTP status, which is their codes' in the registry
    (tests/unit/test_errors.py checks each code raised against it).

    `image` names the image of a batch that the refusal is about: its index in `images` and its file name or URL.
    """

    status = 400

    def __init__(
        self,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        image: RefusedImage | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.image = image

    def about_image(self, index: int, name: str) -> ApiError:
        """This refusal, said of image `index` (`name`) of a batch: its message names it, and so does its body."""
        refusal = ApiError(
            self.code, f"images[{index}] ({name}): {self.message}", self.headers, RefusedImage(index, name)
        )
        refusal.status = self.status
        return refusal


@dataclass(frozen=True)
class RefusedImage:
    """The image of a batch that a refusal is about: its place in `images` (from 0), and its file name or URL."""

    index: int
    name: str


class BadRequestError(ApiError):
    """Raised when the body cannot be parsed at all (malformed JSON)."""

    status = 400


class UnauthorizedError(ApiError):
    """Raised when API keys are on and a request has no key, or a key that is not configured."""

    status = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, {"WWW-Authenticate": 'Bearer realm="blipq"'})


class NotFoundError(ApiError):
    """Raised when a job id was never issued or has expired."""

    status = 404


class ConflictError(ApiError):
    """Raised when a request conflicts with a job's state or with an earlier request (a cancel of an ended job, an
    Idempotency-Key reused with another body)."""

    status = 409


class PayloadTooLargeError(ApiError):
    """Raised when the body or the image is over its limit."""

    status = 413


class UnsupportedMediaTypeError(ApiError):
    """Raised when the body is neither JSON nor multipart/form-data."""

    status = 415


class ValidationError(ApiError):
    """Raised when the body parses but a field is missing, empty, too long or of the wrong kind."""

    status = 422


class RateLimitedError(ApiError):
    """Raised when a client has used up its request budget; it may retry after `retry_after_s` seconds."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__("rate_limited", message, {"Retry-After": str(retry_after_s)})


class KeyQueueFullError(ApiError):
    """Raised when an API key already holds its share of the queue bound waiting; retry after `retry_after_s`."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__("key_queue_full", message, {"Retry-After": str(retry_after_s)})


class ServiceUnavailableError(ApiError):
    """Raised when Redis (the broker) cannot take the job right now."""

    status = 503


class QueueFullError(ServiceUnavailableError):
    """Raised when the queue already holds as many jobs as it may; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__("queue_full", message, {"Retry-After": str(retry_after_s)})


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    image: RefusedImage | None = None,
) -> Response:
    """The one shape of every error the API answers (with `image` when the refusal is about one image of a batch)."""
    error: dict[str, object] = {"code": code, "message": message}
    if image is not None:
        error["image"] = asdict(image)
    response = jsonify(error=error)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error, ours or Werkzeug's or a bug, as JSON."""

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.image)

    @app.errorhandler(HTTPException)
    def handle_http_error(exc: HTTPException) -> Response:
        if isinstance(exc.response, Response):  # built with error_response already: the rate limiter's 429
            return exc.response
        status = exc.code or 500
        # Werkzeug's headers but its HTML content type: the Allow of a 405 (RFC 9110 requires it there).
        headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
        code = FRAMEWORK_CODES.get(status, FRAMEWORK_FALLBACK_CODE)
        return error_response(status, code, exc.description or exc.name, headers)

    @app.errorhandler(redis.RedisError)
    def handle_redis_away(exc: redis.RedisError) -> Response:
        # Redis is away (a restart, a network cut): the client may retry; this is not a bug of ours.
        log.warning("redis unavailable: %s", exc)
        message = "the job store is unavailable; retry later"
        return error_response(
            http_status("store_unavailable"), "store_unavailable", message, {"Retry-After": str(STORE_RETRY_AFTER_S)}
        )

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(
            http_status("internal_error"), "internal_error", "an unexpected error occurred; it has been logged"
        )
