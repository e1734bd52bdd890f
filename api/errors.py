"""API errors: each has an HTTP status and a stable code, and is answered as {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("blipq.api")

# Werkzeug's own HTTP errors, given stable codes of ours.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """Root of the errors the API answers with; subclasses fix the HTTP status."""

    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BadRequestError(ApiError):
    """Raised when the body cannot be parsed at all (malformed JSON)."""

    status = 400


class NotFoundError(ApiError):
    """Raised when a job id was never issued or has expired."""

    status = 404


class PayloadTooLargeError(ApiError):
    """Raised when the body or the image is over its limit."""

    status = 413


class UnsupportedMediaTypeError(ApiError):
    """Raised when the body is neither JSON nor multipart/form-data."""

    status = 415


class ValidationError(ApiError):
    """Raised when the body parses but a field is missing, empty, too long or of the wrong kind."""

    status = 422


class ServiceUnavailableError(ApiError):
    """Raised when Redis (the broker) cannot take the job right now."""

    status = 503


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    """The one shape of every error the API answers."""
    return jsonify(error={"code": code, "message": message}), status


def register_error_handlers(app: Flask) -> None:
    """Answer every error, ours or Werkzeug's or a bug, as JSON."""

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError) -> tuple[Response, int]:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def handle_http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        return error_response(status, HTTP_CODES.get(status, "http_error"), exc.description or exc.name)

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")
