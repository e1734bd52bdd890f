"""Reading a request, within bounds: its JSON body, its form and uploads, the ids and the Idempotency-Key it names,
its webhook, the fingerprint of its body, and how long a read may wait (`?wait=S`).

Shared by the job routes (api/views.py) and the batch routes (api/batches.py, api/batch_uploads.py); every refusal is
an API error with its stable code.

A multipart body is read as it streams in, with werkzeug's form parser and bounds of our own: an uploaded file is
refused `image_too_large` as soon as it passes BLIPQ_MAX_IMAGE_BYTES (the rest of the body is not read), so that a
too-large image is named as such however large the body; `body_too_large` is kept for what else makes a body too
large (a form field, too many parts, a whole batch), and its message names the bound.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from tempfile import SpooledTemporaryFile
from typing import IO, Any, cast

from flask import request
from pydantic import HttpUrl
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.wsgi import get_input_stream

from api.context import MAX_WAIT_S
from api.errors import ApiError, BadRequestError, PayloadTooLargeError, ValidationError
from api.settings import FORM_OVERHEAD_BYTES, MAX_JSON_BODY_BYTES, ApiSettings
from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.images import open_image

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # a job's or a batch's id
ITEM_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}\.[0-9]{1,6}$")  # a batch item: `<batch id>.<index>`
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as header values safely are
MAX_JOB_FORM_PARTS = 16  # a job's form: its eight fields and its file, with room; a form of more parts is no job's
SPOOL_BYTES = 500 * 1024  # an upload's bytes past this wait in a temporary file while the form is read (werkzeug's)


def idempotency_header() -> str | None:
    """The request's Idempotency-Key, or None; refused when it is not 1 to 255 visible ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not IDEMPOTENCY_KEY_PATTERN.match(key):
        raise BadRequestError("idempotency_key_invalid", "an Idempotency-Key is 1 to 255 visible ASCII characters")
    return key


def wait_seconds() -> float:
    """The request's `?wait=S` (a long poll of a job or a batch), 0.0 without one; refused `wait_invalid` unless
    0 < S <= MAX_WAIT_S."""
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = math.nan
    if not 0 < wait_s <= MAX_WAIT_S:  # NaN fails too
        message = f"wait: a number of seconds above 0 and at most {MAX_WAIT_S:g} is expected"
        raise ValidationError("wait_invalid", message)
    return wait_s


def check_body_size(limit: int, bound: str) -> None:
    """Refuse a body that says it is over `limit` bytes, before reading it; `bound` says what sets the limit."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError("body_too_large", f"the body is over {limit} bytes, {bound}")


JSON_BOUND = "the most a JSON body may be (a batch of 10,000 items with long URLs fits; images are uploaded apart)"


def json_body() -> Any:
    """The request's JSON body, parsed; refused when it is over MAX_JSON_BODY_BYTES or does not parse (invalid_json)."""
    check_body_size(MAX_JSON_BODY_BYTES, JSON_BOUND)
    request.max_content_length = MAX_JSON_BODY_BYTES  # a chunked body, which declares no length, is cut there
    try:
        return request.get_json()
    except RequestEntityTooLarge:
        raise PayloadTooLargeError(
            "body_too_large", f"the body is over {MAX_JSON_BODY_BYTES} bytes, {JSON_BOUND}"
        ) from None
    except (BadRequest, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise BadRequestError("invalid_json", "the body is not valid JSON") from None


@dataclass(frozen=True)
class FormBounds:
    """What one kind of multipart body may hold: the whole body (and what sets that bound, in words), each text
    field, the parts, and whether its uploads are a batch's `images` (named by their index when refused)."""

    body_bytes: int
    body_bound: str
    field_bytes: int
    parts: int
    batch: bool = False


def job_form_bounds(settings: ApiSettings) -> FormBounds:
    """A single job's form: one image of at most BLIPQ_MAX_IMAGE_BYTES, and its other fields in 64 KiB."""
    bound = (
        f"the most a job's form may be: its image (at most BLIPQ_MAX_IMAGE_BYTES, {settings.max_image_bytes} bytes) "
        "and 64 KiB of other fields"
    )
    return FormBounds(settings.max_body_bytes, bound, FORM_OVERHEAD_BYTES, MAX_JOB_FORM_PARTS)


@dataclass(frozen=True)
class Form:
    """A multipart body, read: its text fields and its files."""

    fields: MultiDict[str, str]
    files: MultiDict[str, FileStorage]


def read_form(bounds: FormBounds, settings: ApiSettings) -> Form:
    """Read the request's multipart body as it streams in; refused at the first bound it passes (see the module)."""
    body_refusal = PayloadTooLargeError(
        "body_too_large", f"the body is over {bounds.body_bytes} bytes, {bounds.body_bound}"
    )
    stream = BoundedBody(
        get_input_stream(request.environ, max_content_length=None),
        bounds.body_bytes,
        body_refusal,
        # werkzeug's decoder refuses a read that, with the end of the last one it holds back (a boundary may start
        # there), passes the field bound, whatever the part: reads of half the bound leave room for that end.
        read_bytes=bounds.field_bytes // 2,
    )
    parser = FormDataParser(
        stream_factory=upload_factory(settings.max_image_bytes, bounds.batch),
        max_form_memory_size=bounds.field_bytes,
        max_form_parts=bounds.parts,
    )
    try:
        _, fields, files = parser.parse(
            cast(IO[bytes], stream), request.mimetype, request.content_length, request.mimetype_params
        )
    except RequestEntityTooLarge:
        message = f"a text field is over {bounds.field_bytes} bytes, or the form has over {bounds.parts} parts"
        raise PayloadTooLargeError("body_too_large", message) from None
    if None in fields or None in files:  # a part whose Content-Disposition names no field: nothing can read it
        raise ValidationError("unknown_field", "a part of the form has no name: give each part a name")
    return Form(fields, files)


class BoundedBody(io.RawIOBase):
    """A request body read up to `limit` bytes, at most `read_bytes` at a time: reading past them raises `refusal`."""

    def __init__(self, stream: IO[bytes], limit: int, refusal: ApiError, read_bytes: int) -> None:
        self.stream, self.left, self.refusal, self.read_bytes = stream, limit, refusal, read_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(min(len(buffer), self.read_bytes, self.left + 1))  # one byte more: over the limit
        if len(data) > self.left:
            raise self.refusal
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


class BoundedUpload(SpooledTemporaryFile[bytes]):
    """An uploaded file as the form parser writes it: in memory, then in a temporary file; refused past `limit`."""

    def __init__(self, limit: int, refusal: Callable[[], ApiError]) -> None:
        super().__init__(max_size=SPOOL_BYTES, mode="w+b")
        self.limit, self.refusal, self.written = limit, refusal, 0

    def write(self, data: Any) -> int:
        self.written += len(data)
        if self.written > self.limit:  # the rest of the body is never read
            raise self.refusal()
        return super().write(data)


def upload_factory(max_image_bytes: int, batch: bool) -> Callable[..., IO[bytes]]:
    """The form parser's container for each uploaded file, in order: bounded by BLIPQ_MAX_IMAGE_BYTES."""
    ordinal = itertools.count()  # a batch's files are all `images`: the n-th file is images[n]

    def container(
        total_content_length: int | None, content_type: str | None, filename: str | None, content_length: int = 0
    ) -> IO[bytes]:
        index, name = next(ordinal), filename or ""

        def refusal() -> ApiError:
            refused = too_many_bytes(max_image_bytes)
            return refused.about_image(index, name) if batch else refused

        return cast(IO[bytes], BoundedUpload(max_image_bytes, refusal))

    return container


def too_many_bytes(max_image_bytes: int) -> PayloadTooLargeError:
    """The refusal of an image over BLIPQ_MAX_IMAGE_BYTES."""
    message = f"the image is over {max_image_bytes} bytes, the limit (BLIPQ_MAX_IMAGE_BYTES)"
    return PayloadTooLargeError("image_too_large", message)


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
    """The uploaded image's bytes, checked from its header: its format (image_invalid), its bytes and its pixels
    (image_too_large); None when no file was sent."""
    if file is None:
        return None
    data = file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise too_many_bytes(settings.max_image_bytes)
    try:
        open_image(data, settings.max_image_pixels)
    except ImageTooLargeError as exc:
        message = f"{exc.message} (BLIPQ_MAX_IMAGE_PIXELS, {settings.max_image_pixels})"
        raise PayloadTooLargeError("image_too_large", message) from None
    except ImageInvalidError as exc:
        raise ValidationError("image_invalid", exc.message) from None
    return data
