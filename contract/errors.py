"""Every error code a client can see, in one registry, and the errors a job can end with.

A code is stable and machine-readable; its message is for people. The registry says, for each code, where it is given
(an HTTP error of the API, a job's or batch item's failure, a webhook delivery's failure, the client's own, a setting
refused at start), its HTTP status for an HTTP error, when it is given, and whether it is transient: whether the same
request later may succeed (a client retries those, and `blipq tag` asks them again on a re-run, while it keeps the
lines of the others). The API's error answers, the OpenAPI document and docs/errors.md all read it;
tests/unit/test_errors.py fails when a code is given that it lacks, or when it lists a code that nothing gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus


class ErrorKind(StrEnum):
    """Where a code is given."""

    HTTP = "http"  # the API answers `{"error": {"code", "message"}}` with an HTTP status
    FAILURE = "failure"  # a job or batch item ended `failed` (or `canceled`, `expired`) with it: its `error`
    WEBHOOK = "webhook"  # a webhook's delivery failed with it: `webhook_delivery.error`
    CLIENT = "client"  # the client (blipq/client.py, `blipq ask`, `caption`, `tag`) gave it, without the service's word
    SETTING = "setting"  # a process refused to start: a BLIPQ_* variable cannot be used


@dataclass(frozen=True)
class ErrorCode:
    """One code of one kind: when it is given, its HTTP status (HTTP errors) and whether it is transient."""

    code: str
    kind: ErrorKind
    when: str
    status: int | None = None  # an HTTP error's status; None for the framework's errors of any other status
    transient: bool = False  # the same request later may succeed; otherwise the request itself must change
    framework: bool = False  # an HTTP code that also answers the web framework's own error of its status


def _http(code: str, status: int | None, when: str, framework: bool = False, transient: bool = False) -> ErrorCode:
    return ErrorCode(code, ErrorKind.HTTP, when, status=status, framework=framework, transient=transient)


def _failure(code: str, when: str, transient: bool) -> ErrorCode:
    return ErrorCode(code, ErrorKind.FAILURE, when, transient=transient)


def _webhook(code: str, when: str, transient: bool) -> ErrorCode:
    return ErrorCode(code, ErrorKind.WEBHOOK, when, transient=transient)


def _client(code: str, when: str, transient: bool) -> ErrorCode:
    return ErrorCode(code, ErrorKind.CLIENT, when, transient=transient)


REGISTRY: tuple[ErrorCode, ...] = (
    _http("bad_request", 400, "the request cannot be read at all", framework=True),
    _http("invalid_json", 400, "the JSON body does not parse"),
    _http("idempotency_key_invalid", 400, "the Idempotency-Key is not 1 to 255 visible ASCII characters"),
    _http("api_key_missing", 401, "API keys are on and the request has none"),
    _http("api_key_invalid", 401, "the request's API key is not configured"),
    _http("not_found", 404, "no route has this path", framework=True),
    _http("job_not_found", 404, "no job has this id (or it expired, or another API key made it)"),
    _http("batch_not_found", 404, "no batch has this id (or it expired, or another API key made it)"),
    _http("method_not_allowed", 405, "the route does not take this method (`Allow` lists those it takes)", True),
    _http("idempotency_conflict", 409, "the Idempotency-Key was used for a request with another body"),
    _http(
        "idempotency_key_in_use",
        409,
        "a request with this Idempotency-Key is still being stored; retry in a moment",
        transient=True,
    ),
    _http("job_ended", 409, "the job has already ended: there is nothing to cancel"),
    _http("batch_ended", 409, "every item of the batch has already ended: there is nothing to cancel"),
    _http("batch_running", 409, "some item of the batch has not ended: cancel the batch, or wait, before deleting it"),
    _http(
        "body_too_large",
        413,
        "the body is over its limit for another reason than its image: a form field, a JSON body, a whole batch",
        framework=True,
    ),
    _http("image_too_large", 413, "an uploaded image is over BLIPQ_MAX_IMAGE_BYTES, or BLIPQ_MAX_IMAGE_PIXELS"),
    _http("unsupported_media_type", 415, "the body is neither JSON nor multipart/form-data", framework=True),
    _http("invalid_body", 422, "the JSON body is not an object"),
    _http("unknown_field", 422, "a field (or a file) that a job does not have"),
    _http("invalid_field", 422, "a field has a value it cannot take"),
    _http("question_missing", 422, "no question"),
    _http("question_empty", 422, "the question is blank"),
    _http("question_too_long", 422, "the question is over BLIPQ_MAX_QUESTION_CHARS"),
    _http("question_invalid", 422, "the question is not a string"),
    _http(
        "question_not_allowed", 422, "a question (or `questions`) with task `caption`, which takes an optional `prompt`"
    ),
    _http("prompt_too_long", 422, "the prompt is over BLIPQ_MAX_QUESTION_CHARS"),
    _http("prompt_invalid", 422, "the prompt is not a string"),
    _http("prompt_not_allowed", 422, "a prompt with task `vqa`: only a caption takes one"),
    _http("task_invalid", 422, "the task is not `vqa` or `caption`"),
    _http("image_url_invalid", 422, "the image URL is not an http(s) URL"),
    _http("image_missing", 422, "neither an image URL nor an uploaded image (a batch upload: no file `images`)"),
    _http("image_conflict", 422, "both an image URL and an uploaded image"),
    _http("image_invalid", 422, "the upload is not a JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF image"),
    _http("priority_invalid", 422, "the priority is not `high`, `normal` or `low`"),
    _http("deadline_invalid", 422, "the deadline is not a positive number of seconds within the job TTL"),
    _http("webhook_invalid", 422, "the webhook is not an http(s) URL, or carries credentials"),
    _http("webhook_unavailable", 422, "a webhook is named but the service sends none (BLIPQ_WEBHOOK_SECRET is unset)"),
    _http("batch_empty", 422, "the batch asks no question: no items, or no images or no questions"),
    _http("batch_too_large", 422, "the batch asks for more than 10,000 answers, or more than the queue's bound"),
    _http("questions_invalid", 422, "a batch upload's `questions` is not a JSON array of non-empty strings"),
    _http(
        "batch_invalid", 422, "both `items` and `images`/`questions`, or `images` without `questions` (or the reverse)"
    ),
    _http("pagination_invalid", 422, "`offset` or `limit` is not a whole number >= 0"),
    _http("status_invalid", 422, "a batch's results are asked for a `status` that is not a job status"),
    _http("wait_invalid", 422, "`wait` is not a number of seconds above 0 and at most 20"),
    _http("after_invalid", 422, "a batch read's `after` (the `ended` count last seen) is not a whole number >= 0"),
    _http("rate_limited", 429, "the client used up its request budget; retry after Retry-After seconds", True, True),
    _http(
        "key_queue_full",
        429,
        "the API key holds its share of the queue bound waiting (BLIPQ_KEY_QUEUE_SHARE of BLIPQ_MAX_QUEUE_DEPTH); "
        "retry after Retry-After seconds",
        transient=True,
    ),
    _http("internal_error", 500, "a bug: the error is logged, with its traceback", framework=True, transient=True),
    _http("broker_unavailable", 503, "Redis cannot take the job right now; retry later", transient=True),
    _http(
        "no_worker",
        503,
        "no live worker serves the job's task (its queue), and BLIPQ_WAIT_FOR_WORKERS is off",
        transient=True,
    ),
    _http(
        "replicas_unavailable",
        503,
        "fewer than BLIPQ_MIN_REPLICAS_ACK Redis replicas acknowledged the job in time",
        transient=True,
    ),
    _http(
        "queue_full",
        503,
        "the submission would take the queue past BLIPQ_MAX_QUEUE_DEPTH waiting answers",
        transient=True,
    ),
    _http("store_unavailable", 503, "Redis is unavailable; retry after Retry-After seconds", transient=True),
    _http("http_error", None, "another error of the web server itself (its status says which, e.g. 416)"),
    _failure("image_fetch_failed", "the image URL could not be downloaded (refused, unreachable, an HTTP error)", True),
    _failure("image_fetch_timeout", "the image download did not finish within BLIPQ_FETCH_TIMEOUT_S", True),
    _failure("url_not_allowed", "the image URL, or a redirect, leads where the workers must not connect", False),
    _failure("image_too_large", "the image has more bytes or pixels than the configured limits allow", False),
    _failure(
        "image_invalid",
        "the image is not a decodable JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or AVIF (or is truncated)",
        False,
    ),
    _failure("upload_missing", "the uploaded image expired before the job ran: submit it again", True),
    _failure("oom", "the model ran out of device memory on this image and text alone", False),
    _failure("wrong_task", "the job reached a worker of another task (vqa, caption): it was misrouted", True),
    _failure("timeout", "the job did not end within its time limit (BLIPQ_JOB_TIME_LIMIT_S)", True),
    _failure("worker_lost", "the worker running the job died, BLIPQ_MAX_ATTEMPTS times (or the job was lost)", True),
    _failure("internal_error", "the worker could not answer (a model error); the worker goes on", True),
    _failure("canceled", "the job (or its batch) was canceled while queued: it never ran", True),
    _failure("deadline_exceeded", "the job was still queued at its deadline (`deadline_s`): it never ran", True),
    _webhook("webhook_invalid", "the webhook URL does not parse", False),
    _webhook("url_not_allowed", "the webhook URL leads where the workers must not connect", False),
    _webhook("webhook_timeout", "the receiver did not answer in time", True),
    _webhook("webhook_unreachable", "the receiver could not be reached", True),
    _webhook("webhook_rejected", "the receiver answered with a status other than 2xx (429 and 5xx are retried)", True),
    _client("service_not_found", "the service's host does not resolve (a typo in --url or BLIPQ_URL?)", True),
    _client("service_refused", "the service's host refused the connection: nothing listens there (is it up?)", True),
    _client("service_unreachable", "the service cannot be reached (a timeout, a reset), retries included", True),
    _client("file_unreadable", "`blipq tag` cannot read a local image (permissions, a file that went away)", True),
    ErrorCode("bad_setting", ErrorKind.SETTING, "a BLIPQ_* variable has a value that cannot be used: nothing starts"),
)

ERRORS: dict[tuple[ErrorKind, str], ErrorCode] = {(entry.kind, entry.code): entry for entry in REGISTRY}
HTTP_ERRORS: dict[str, ErrorCode] = {entry.code: entry for entry in REGISTRY if entry.kind is ErrorKind.HTTP}
# The web framework's own errors (an unknown route, a wrong method...), by status; any other status is `http_error`.
FRAMEWORK_CODES: dict[int, str] = {
    entry.status: entry.code for entry in HTTP_ERRORS.values() if entry.framework and entry.status is not None
}
FRAMEWORK_FALLBACK_CODE = "http_error"
# The codes of requests that must change before they can succeed. Any other code, one this registry does not know (a
# newer service's) included, is transient: `blipq tag` asks its pairs again on a re-run.
PERMANENT_CODES: frozenset[str] = frozenset(entry.code for entry in REGISTRY if not entry.transient)


def is_transient(code: str) -> bool:
    """Whether a request refused or failed with `code` may succeed later as it is (an unknown code may)."""
    return code not in PERMANENT_CODES


def registered(kind: ErrorKind, code: str) -> str:
    """`code`, once checked to be in the registry as a code of `kind`; raises KeyError (at import) when it is not."""
    if (kind, code) not in ERRORS:
        raise KeyError(f"error code {code!r} of kind {kind} is not in contract.errors.REGISTRY")
    return code


def http_status(code: str) -> int:
    """The HTTP status the API answers `code` with; raises KeyError for a code that is not an HTTP error's."""
    status = HTTP_ERRORS[code].status
    if status is None:
        raise KeyError(f"{code!r} has no status of its own")
    return status


def errors_markdown() -> str:
    """docs/errors.md: the error shape, and every code of every kind with what it means and whether it is transient."""
    lines = [
        "# Error codes",
        "",
        "<!-- Generated from contract/errors.py by `make reference`; do not edit by hand. -->",
        "",
        'Every error the API answers has the shape `{"error": {"code": "...", "message": "..."}}`, and so has the',
        "`error` of a job or batch item that failed, and of a webhook delivery that failed. The code is stable:",
        "programs may compare it. The message is for people: its wording may change. A batch refused for one of its",
        'images names that image too: `"image": {"index": 2, "name": "notes.png"}` beside the code (its place in',
        "`images`, from 0, and its file name or URL), so that a client can take it out and send the rest again.",
        "",
        "A code is *transient* when the same request may succeed later, unchanged: a client retries it, and",
        "`blipq tag` asks its pairs again on a re-run. A code that is not (an invalid image, a URL the workers must",
        "not fetch) says that the request itself must change: `blipq tag` keeps its line and does not ask again. A",
        "code this page does not list (from a newer service) counts as transient.",
        "",
        "## HTTP errors",
        "",
        "| status | code | when | transient |",
        "| --- | --- | --- | --- |",
    ]
    http = sorted(HTTP_ERRORS.values(), key=lambda entry: (entry.status or 999, entry.code))
    for entry in http:
        status = f"{entry.status} {HTTPStatus(entry.status).phrase}" if entry.status else "any other"
        lines.append(f"| {status} | `{entry.code}` | {entry.when} | {_yes_no(entry.transient)} |")
    sections = (
        (ErrorKind.FAILURE, "Job and batch item failures", "A job's (or batch item's) `error`, once it ended."),
        (ErrorKind.WEBHOOK, "Webhook delivery failures", "`webhook_delivery.error` of a job or batch, once it failed."),
        (
            ErrorKind.CLIENT,
            "Client errors",
            "Given by the Python client (`blipq/client.py`) and `blipq ask`, `caption` and `tag` without the service's "
            "word. They also give `image_url_invalid` for an image that is neither an http(s) URL nor a file, and "
            "`blipq tag` gives `image_invalid` and `image_too_large` for a file it checked before sending, as the "
            "service would.",
        ),
    )
    for kind, title, intro in sections:
        lines += ["", f"## {title}", "", intro, "", "| code | when | transient |", "| --- | --- | --- |"]
        for entry in (entry for entry in REGISTRY if entry.kind is kind):
            lines.append(f"| `{entry.code}` | {entry.when} | {_yes_no(entry.transient)} |")
    lines += ["", "## At start-up", "", "| code | when |", "| --- | --- |"]
    lines += [f"| `{entry.code}` | {entry.when} |" for entry in REGISTRY if entry.kind is ErrorKind.SETTING]
    return "\n".join(lines) + "\n"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _failure_code(code: str) -> str:
    return registered(ErrorKind.FAILURE, code)


class BlipqError(Exception):
    """Root of the errors blipq raises; `code` is stable, the message is for humans."""

    code = _failure_code("internal_error")

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class SettingsError(BlipqError):
    """Raised when a BLIPQ_* environment variable has a value that cannot be used."""

    code = registered(ErrorKind.SETTING, "bad_setting")


class ImageFetchError(BlipqError):
    """Raised when an image URL cannot be downloaded (refused, unreachable, HTTP error)."""

    code = _failure_code("image_fetch_failed")


class UrlNotAllowedError(BlipqError):
    """Raised when an image URL or one of its redirects leads where the worker must not connect (never retried)."""

    code = _failure_code("url_not_allowed")


class ImageFetchTimeoutError(ImageFetchError):
    """Raised when an image download does not finish within its deadline."""

    code = _failure_code("image_fetch_timeout")


class ImageTooLargeError(BlipqError):
    """Raised when an image has more bytes or pixels than the configured limits allow."""

    code = _failure_code("image_too_large")


class ImageInvalidError(BlipqError):
    """Raised when bytes are not a decodable image of an allowed format (or are truncated)."""

    code = _failure_code("image_invalid")


class UploadMissingError(BlipqError):
    """Raised when a job's uploaded image is no longer in Redis (expired before the job ran)."""

    code = _failure_code("upload_missing")


class ModelOutOfMemoryError(BlipqError):
    """Raised when the model runs out of device memory on a job's image and text alone (a batch is split first)."""

    code = _failure_code("oom")


class WrongTaskError(BlipqError):
    """Raised when a job asks for a task (vqa, caption) that the worker's model does not do: it was misrouted."""

    code = _failure_code("wrong_task")


class JobTimeoutError(BlipqError):
    """Raised when a job has not ended within its time limit (BLIPQ_JOB_TIME_LIMIT_S less a margin)."""

    code = _failure_code("timeout")
