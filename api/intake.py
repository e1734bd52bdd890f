"""Reading a submission: the ids and the Idempotency-Key a request names, its body, its uploads and its webhook.

Shared by the job routes (api/views.py) and the batch routes (api/batches.py, api/batch_uploads.py); every refusal is
an API error with its stable code.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import request
from pydantic import HttpUrl
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import BadRequest

from api.errors import BadRequestError, PayloadTooLargeError, ValidationError
from api.settings import ApiSettings
from worker.contract.errors import ImageInvalidError, ImageTooLargeError
from worker.contract.images import open_image

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # a job's or a batch's id
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[0-9]{1,6}$")  # a batch item: `<batch id>.<index>`
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as header values safely are
UPLOAD_SNIFF_MAX_PIXELS = 1 << 40  # the worker enforces the real pixel limit when it decodes


def idempotency_header() -> str | None:
    """The request's Idempotency-Key, or None; refused when it is not 1 to 255 visible ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not IDEMPOTENCY_KEY_PATTERN.match(key):
        raise BadRequestError("idempotency_key_invalid", "an Idempotency-Key is 1 to 255 visible ASCII characters")
    return key


def check_body_size(limit: int) -> None:
    """Refuse a body that says it is over `limit` bytes, before reading it."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError("body_too_large", f"the body is over {limit} bytes")


def json_body() -> Any:
    """The request's JSON body, parsed; refused (invalid_json) when it does not parse."""
    try:
        return request.get_json()
    except (BadRequest, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise BadRequestError("invalid_json", "the body is not valid JSON") from None


def fingerprint(data: Any, uploads: list[bytes]) -> str:
    """A hash of a request as sent: its JSON body or form fields, and each upload's bytes."""
    images = [hashlib.sha256(upload).hexdigest() for upload in uploads]
    image_sha256 = images[0] if len(images) == 1 else (images or None)  # a single upload's, as it always was
    canonical = json.dumps({"body": data, "image_sha256": image_sha256}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_webhook(webhook: HttpUrl | None, settings: ApiSettings) -> None:
    """Refuse a webhook when the service sends none, or one whose URL carries credentials (never sent)."""
    if webhook is not None and not settings.webhooks_enabled:
        raise ValidationError("webhook_unavailable", "this service sends no webhooks (BLIPQ_WEBHOOK_SECRET is unset)")
    if webhook is not None and (webhook.username or webhook.password):
        raise ValidationError("webhook_invalid", "webhook: the URL carries credentials (user:password@); none are sent")


def read_upload(file: FileStorage | None, settings: ApiSettings) -> bytes | None:
    """The uploaded image's bytes, sniffed (image_too_large, image_invalid); None when no file was sent."""
    if file is None:
        return None
    data = file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLargeError("image_too_large", f"the image is over {settings.max_image_bytes} bytes")
    try:
        open_image(data, UPLOAD_SNIFF_MAX_PIXELS)
    except ImageTooLargeError as exc:
        raise PayloadTooLargeError("image_too_large", exc.message) from None
    except ImageInvalidError as exc:
        raise ValidationError("image_invalid", exc.message) from None
    return data
