"""The API's description: an OpenAPI 3.1 document generated from the pydantic schemas, and a page that shows it.

`GET /openapi.json` and `GET /docs` are public. The document describes the app that serves it: an operation below is
in it when the app has its route (tests/test_openapi.py fails when the app has a route that is not described here),
request and response bodies come from api/schemas.py through pydantic's JSON Schema, and the security requirement
and the question's length limit are the app's settings.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from apispec import APISpec
from flask import Blueprint, Flask, Response, current_app, jsonify, render_template_string
from markupsafe import Markup, escape
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.routing import Rule

from api.auth import public
from api.schemas import (
    BatchAccepted,
    BatchCancelCounts,
    BatchRequest,
    BatchResponse,
    BatchResult,
    Error,
    Health,
    JobAccepted,
    JobRequest,
    JobResponse,
    Models,
    Readiness,
    Stats,
)
from api.settings import ApiSettings
from api.views import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN, JOB_ID_PATTERN

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
FORM = "multipart/form-data"
REF_TEMPLATE = "#/components/schemas/{model}"
IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})  # Flask answers these for every route by itself
EXTENSION_KEY = "blipq.openapi"  # where an app keeps its document, built on first use (its routes are all there then)

DESCRIPTION = """\
Ask questions about images, or have them captioned (`"task": "caption"`). A submission is validated, stored and \
enqueued in Redis, and answered `202` at once with the job's id; poll `GET /v1/jobs/{id}` until its status is \
`succeeded` (the answer is there) or another final one: `failed` (its `error` says why), `canceled` or `expired`. \
Every error the API answers has the shape `{"error": {"code", "message"}}`: the code is stable, the message is for \
humans. When API keys are configured, every request to `/v1` needs one, as `Authorization: Bearer <key>` or \
`X-API-Key: <key>`; the other routes are public."""

# Every error code the API answers with: its HTTP status and when it is given. Operations list theirs by code.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "the JSON body does not parse"),
    "idempotency_key_invalid": (400, "the Idempotency-Key is not 1 to 255 visible ASCII characters"),
    "api_key_missing": (401, "API keys are on and the request has none"),
    "api_key_invalid": (401, "the request's API key is not configured"),
    "job_not_found": (404, "no job has this id (or it expired, or another API key made it)"),
    "idempotency_conflict": (409, "the Idempotency-Key was used for a request with another body"),
    "idempotency_key_in_use": (409, "a request with this Idempotency-Key is still being stored; retry in a moment"),
    "job_ended": (409, "the job has already ended: there is nothing to cancel"),
    "body_too_large": (413, "the body is over its limit"),
    "image_too_large": (413, "the uploaded image is over BLIPQ_MAX_IMAGE_BYTES"),
    "unsupported_media_type": (415, "the body is neither JSON nor multipart/form-data"),
    "invalid_body": (422, "the JSON body is not an object"),
    "unknown_field": (422, "a field (or a file) that a job does not have"),
    "invalid_field": (422, "a field has a value it cannot take"),
    "question_missing": (422, "no question"),
    "question_empty": (422, "the question is blank"),
    "question_too_long": (422, "the question is over BLIPQ_MAX_QUESTION_CHARS"),
    "question_invalid": (422, "the question is not a string"),
    "question_not_allowed": (422, "a question (or `questions`) with task `caption`, which takes an optional `prompt`"),
    "prompt_too_long": (422, "the prompt is over BLIPQ_MAX_QUESTION_CHARS"),
    "prompt_invalid": (422, "the prompt is not a string"),
    "prompt_not_allowed": (422, "a prompt with task `vqa`: only a caption takes one"),
    "task_invalid": (422, "the task is not `vqa` or `caption`"),
    "image_url_invalid": (422, "the image URL is not an http(s) URL"),
    "image_missing": (422, "neither an image URL nor an uploaded image (a batch upload: no file `images`)"),
    "image_conflict": (422, "both an image URL and an uploaded image"),
    "image_invalid": (422, "the upload is not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
    "priority_invalid": (422, "the priority is not `high`, `normal` or `low`"),
    "deadline_invalid": (422, "the deadline is not a positive number of seconds within the job TTL"),
    "webhook_invalid": (422, "the webhook is not an http(s) URL, or carries credentials"),
    "webhook_unavailable": (422, "a webhook is named but the service sends none (BLIPQ_WEBHOOK_SECRET is unset)"),
    "batch_not_found": (404, "no batch has this id (or it expired, or another API key made it)"),
    "batch_ended": (409, "every item of the batch has already ended: there is nothing to cancel"),
    "batch_running": (409, "some item of the batch has not ended: cancel the batch, or wait, before deleting it"),
    "batch_empty": (422, "the batch asks no question: no items, or no images or no questions"),
    "batch_too_large": (422, "the batch asks for more than 10,000 answers, or more than the queue's bound"),
    "questions_invalid": (422, "a batch upload's `questions` is not a JSON array of non-empty strings"),
    "batch_invalid": (422, "both `items` and `images`/`questions`, or `images` without `questions` (or the reverse)"),
    "pagination_invalid": (422, "`offset` or `limit` is not a whole number >= 0"),
    "wait_invalid": (422, "`wait` is not a number of seconds above 0 and at most 20"),
    "rate_limited": (429, "the client used up its request budget; retry after Retry-After seconds"),
    "broker_unavailable": (503, "Redis cannot take the job right now; retry later"),
    "no_worker": (503, "no live worker serves the job's task (its queue), and BLIPQ_WAIT_FOR_WORKERS is off"),
    "replicas_unavailable": (
        503,
        "fewer than BLIPQ_MIN_REPLICAS_ACK Redis replicas acknowledged the job in time; retry later",
    ),
    "queue_full": (503, "the submission would take the queue past BLIPQ_MAX_QUEUE_DEPTH waiting answers; retry later"),
    "store_unavailable": (503, "Redis is unavailable; retry after Retry-After seconds"),
}
PROTECTED_CODES = ("api_key_missing", "api_key_invalid", "rate_limited", "store_unavailable")  # any /v1 route
BATCH_ONLY_CODES = ("batch_empty", "batch_too_large", "batch_invalid", "questions_invalid", "pagination_invalid")
READ_ONLY_CODES = ("wait_invalid",)  # a query parameter of GET /v1/jobs/<id>, not a field of a submission
JOB_ONLY_CODES = ("image_conflict",)  # a batch's images are all URLs (JSON) or all uploads (multipart)
VALIDATION_CODES = tuple(
    code
    for code, (status, _) in ERROR_CODES.items()
    if status == 422 and code not in BATCH_ONLY_CODES and code not in READ_ONLY_CODES
)
BATCH_SUBMIT_CODES = (
    *("invalid_json", "body_too_large", "image_too_large", "unsupported_media_type"),
    *(code for code in VALIDATION_CODES if code not in JOB_ONLY_CODES),
    *("batch_empty", "batch_too_large", "batch_invalid", "questions_invalid", "broker_unavailable", "queue_full"),
    "replicas_unavailable",
    "no_worker",
)
SUBMIT_CODES = (
    *("invalid_json", "idempotency_key_invalid", "idempotency_conflict", "idempotency_key_in_use"),
    *("body_too_large", "image_too_large", "unsupported_media_type", *VALIDATION_CODES),
    *("broker_unavailable", "replicas_unavailable", "queue_full", "no_worker"),
)

HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "The job's URL, `/v1/jobs/{id}`.", "required": True, "schema": {"type": "string"}},
    "BatchLocation": {
        "description": "The batch's URL, `/v1/batches/{id}` (the header is `Location`).",
        "required": True,
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "`true` when an earlier request with the same Idempotency-Key made the job.",
        "schema": {"const": "true"},
    },
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}},
    "WWW-Authenticate": {"description": 'Always `Bearer realm="blipq"`.', "schema": {"type": "string"}},
}
HEADERS_BY_STATUS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}
JSON_EXAMPLE = {"image_url": "https://images.example.com/dog.jpg", "question": "how many dogs are in the picture?"}
JOB_ID_PARAMETER = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "A job's id, as its submission answered it.",
    "schema": {"type": "string", "pattern": JOB_ID_PATTERN.pattern},
}
BATCH_ID_PARAMETER = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "description": "A batch's id, as its submission answered it.",
    "schema": {"type": "string", "pattern": JOB_ID_PATTERN.pattern},
}
BATCH_EXAMPLE = {
    "images": ["https://images.example.com/1.jpg", "https://images.example.com/2.jpg"],
    "questions": ["what color is the shape?", "is there a circle?"],
    "priority": "low",
}
PAGE_PARAMETERS = [
    {
        "name": "offset",
        "in": "query",
        "required": False,
        "description": "The first item (0-based). Default 0.",
        "schema": {"type": "integer", "minimum": 0},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "At most this many items. Default: all the rest.",
        "schema": {"type": "integer", "minimum": 0},
    },
]
WAIT_PARAMETER = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": (
        "Long polling: a job that has not ended is answered when it ends, or after this many seconds (above 0, at "
        "most 20). Without it, the job is answered as it is now."
    ),
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 20},
}
IDEMPOTENCY_KEY_PARAMETER = {
    "name": IDEMPOTENCY_HEADER,
    "in": "header",
    "required": False,
    "description": (
        "Makes a retry safe: the same request again with the same key (same API key, same body) answers the first "
        "request's job, with `Idempotent-Replayed: true`, for as long as that job is kept; the same key with another "
        "body is `409 idempotency_conflict`."
    ),
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
}

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
@public
def openapi_json() -> Response:
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document(current_app))


@bp.get("/docs")
@public
def docs() -> str:
    """The OpenAPI document as an HTML page: plain HTML and CSS, nothing fetched from elsewhere."""
    document = openapi_document(current_app)
    return render_template_string(DOCS_TEMPLATE, doc=document, errors=_error_table(document), md=_code_spans)


def openapi_document(app: Flask) -> dict[str, Any]:
    """The app's OpenAPI document, built once."""
    if EXTENSION_KEY not in app.extensions:
        app.extensions[EXTENSION_KEY] = build_openapi(app, app.extensions["blipq"].settings)
    document: dict[str, Any] = app.extensions[EXTENSION_KEY]
    return document


def build_openapi(app: Flask, settings: ApiSettings) -> dict[str, Any]:
    """Describe the routes of `app` that OPERATIONS documents, with the components they use."""
    keys: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
    spec = APISpec(
        title="blipq",
        version=_package_version(),
        openapi_version=OPENAPI_VERSION,
        info={"description": DESCRIPTION},
        # With no keys configured, a key is accepted and ignored: the empty requirement says none is needed.
        security=keys if settings.api_keys else [{}, *keys],
    )
    _add_components(spec, settings)
    for rule in app.url_map.iter_rules():
        path = openapi_path(rule)
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            operation = OPERATIONS.get((method.lower(), path))
            if operation is not None:
                spec.path(path=path, operations={method.lower(): operation})
    return spec.to_dict()


def openapi_path(rule: Rule) -> str:
    """A Flask rule's path in OpenAPI's spelling: `/v1/jobs/<job_id>` -> `/v1/jobs/{job_id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)


def _add_components(spec: APISpec, settings: ApiSettings) -> None:
    responses: tuple[type[BaseModel], ...] = (Error, JobAccepted, JobResponse, Stats, Health, Readiness, Models)
    responses += (BatchAccepted, BatchResponse, BatchResult, BatchCancelCounts)
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(JobRequest, "validation"), (BatchRequest, "validation")]
    models += [(model, "serialization") for model in responses]
    _, schemas = models_json_schema(models, ref_template=REF_TEMPLATE)
    job_request = schemas["$defs"]["JobRequest"]
    batch_request = schemas["$defs"]["BatchRequest"]
    # The limit is a setting, given to the validator as context: pydantic's schema cannot know it.
    for model in (job_request, schemas["$defs"]["BatchItem"], batch_request):
        for field in ("question", "prompt"):
            if field in model["properties"]:
                model["properties"][field]["anyOf"][0]["maxLength"] = settings.max_question_chars
    batch_request["properties"]["questions"]["anyOf"][0]["items"]["maxLength"] = settings.max_question_chars
    schemas["$defs"]["JobForm"] = _form_schema(job_request)
    schemas["$defs"]["BatchForm"] = _batch_form_schema(batch_request, settings)
    for name, schema in schemas["$defs"].items():
        spec.components.schema(name, schema)
    for name, header in HEADERS.items():
        spec.components.header(name, header)
    bearer = {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"}
    spec.components.security_scheme("bearerAuth", bearer)
    spec.components.security_scheme("apiKeyHeader", {"type": "apiKey", "in": "header", "name": "X-API-Key"})


def _form_schema(job_request: dict[str, Any]) -> dict[str, Any]:
    """A submission as multipart/form-data: JobRequest's fields as form fields, and the image as a file."""
    image = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": "The image file: JPEG, PNG, WebP, GIF, BMP or TIFF, recognised by its content.",
    }
    return {
        "type": "object",
        "description": "A job as form fields, with the image uploaded as the file `image` (or `image_url` given).",
        "properties": {**job_request["properties"], "image": image},
        "required": job_request.get("required", []),
        "additionalProperties": False,
    }


def _batch_form_schema(batch_request: dict[str, Any], settings: ApiSettings) -> dict[str, Any]:
    """A batch as multipart/form-data: files `images`, and `questions` as a JSON array in a form field."""
    options = ("task", "prompt", "priority", "deadline_s", "webhook", "webhook_items")
    images = {
        "type": "array",
        "items": {"type": "string", "contentMediaType": "application/octet-stream"},
        "description": (
            f"The image files (the field repeated), each at most {settings.max_image_bytes} bytes: JPEG, PNG, WebP, "
            "GIF, BMP or TIFF. Each is stored once, for all its questions, and expires with the batch after the TTL."
        ),
    }
    questions = {
        "type": "string",
        "contentMediaType": JSON,
        "description": (
            'A JSON array of the questions asked about every image, e.g. `["what is it?"]`: required for `vqa`, '
            "refused for `caption`."
        ),
    }
    return {
        "type": "object",
        "description": (
            f"A batch of uploaded images: every question about every image, items ordered image by image; "
            f"the whole body at most {settings.max_batch_upload_bytes} bytes (BLIPQ_MAX_BATCH_UPLOAD_BYTES)."
        ),
        "properties": {
            "images": images,
            "questions": questions,
            **{name: batch_request["properties"][name] for name in options},
        },
        "required": ["images"],
        "additionalProperties": False,
    }


def _ok(description: str, schema: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {name: name for name in headers}  # apispec makes each name a $ref to the component
    return response


def _errors(*codes: str) -> dict[str, dict[str, Any]]:
    """The error responses for `codes`, one per status, each listing its codes in `x-error-codes`."""
    by_status: dict[int, dict[str, str]] = {}
    for code in codes:
        status, meaning = ERROR_CODES[code]
        by_status.setdefault(status, {})[code] = meaning
    responses = {}
    for status, meanings in sorted(by_status.items()):
        listed = "; ".join(f"`{code}`: {meaning}" for code, meaning in meanings.items())
        response: dict[str, Any] = {
            "description": f"{HTTPStatus(status).phrase}. {listed}.",
            "content": {JSON: {"schema": "Error"}},
            "x-error-codes": meanings,
        }
        if status in HEADERS_BY_STATUS:
            response["headers"] = {name: name for name in HEADERS_BY_STATUS[status]}
        responses[str(status)] = response
    return responses


# (method, OpenAPI path) -> the operation; build_openapi keeps those whose route the app has.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/jobs"): {
        "operationId": "submitJob",
        "summary": "Submit a question about an image, or a caption of it: by URL (JSON) or as an upload (multipart).",
        "description": (
            "`202` means the job is stored and enqueued in Redis; a refused request enqueues nothing. "
            '`"task": "caption"` (no `question`; an optional `prompt` the caption continues) goes to the captioning '
            "workers, and the job's `answer` is the caption."
        ),
        "parameters": [IDEMPOTENCY_KEY_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": "JobRequest", "example": JSON_EXAMPLE}, FORM: {"schema": "JobForm"}},
        },
        "responses": {
            "202": _ok("The job is stored and enqueued.", "JobAccepted", ("Location", "Idempotent-Replayed")),
            **_errors(*SUBMIT_CODES, *PROTECTED_CODES),
        },
    },
    ("get", "/v1/jobs/{job_id}"): {
        "operationId": "getJob",
        "summary": "A job's status, and its answer or error once it ended.",
        "parameters": [JOB_ID_PARAMETER, WAIT_PARAMETER],
        "responses": {
            "200": _ok("The job.", "JobResponse"),
            **_errors("job_not_found", "wait_invalid", *PROTECTED_CODES),
        },
    },
    ("post", "/v1/jobs/{job_id}/cancel"): {
        "operationId": "cancelJob",
        "summary": "Cancel a job: a queued one ends `canceled` and never runs; a running one runs to its end.",
        "description": "A running job is marked `cancel_requested` and ends as it would have.",
        "parameters": [JOB_ID_PARAMETER],
        "responses": {
            "200": _ok("The job, canceled (or marked `cancel_requested`).", "JobResponse"),
            **_errors("job_not_found", "job_ended", *PROTECTED_CODES),
        },
    },
    ("post", "/v1/batches"): {
        "operationId": "submitBatch",
        "summary": "Submit many questions about images: `items`, or every one of `questions` about every image.",
        "description": (
            "Up to 10,000 answers. Each item is a job of its own (`GET /v1/jobs/{id}` shows it, with its `batch_id`); "
            "the workers fetch each image once for all its questions. `202` means every item is stored and enqueued. "
            "As multipart/form-data, the images are uploaded (files `images`) and each is asked every one of "
            '`questions`. With `"task": "caption"`, `images` are captioned once each (no `questions`; an optional '
            "`prompt` for all), or `items` give each image with its optional `prompt`."
        ),
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": "BatchRequest", "example": BATCH_EXAMPLE}, FORM: {"schema": "BatchForm"}},
        },
        "responses": {
            "202": {
                "description": "The batch is stored and enqueued; its URL is in `Location`.",
                "content": {JSON: {"schema": "BatchAccepted"}},
                "headers": {"Location": "BatchLocation"},
            },
            **_errors(*BATCH_SUBMIT_CODES, *PROTECTED_CODES),
        },
    },
    ("get", "/v1/batches/{batch_id}"): {
        "operationId": "getBatch",
        "summary": "A batch's progress: its items counted by status, and its webhook's delivery.",
        "parameters": [BATCH_ID_PARAMETER],
        "responses": {"200": _ok("The batch.", "BatchResponse"), **_errors("batch_not_found", *PROTECTED_CODES)},
    },
    ("get", "/v1/batches/{batch_id}/results"): {
        "operationId": "getBatchResults",
        "summary": "The batch's items in order, as JSON Lines: one `BatchResult` object per line.",
        "parameters": [BATCH_ID_PARAMETER, *PAGE_PARAMETERS],
        "responses": {
            "200": {
                "description": "One line per item, from `offset`, at most `limit` lines.",
                "content": {"application/x-ndjson": {"schema": "BatchResult"}},
            },
            **_errors("batch_not_found", "pagination_invalid", *PROTECTED_CODES),
        },
    },
    ("post", "/v1/batches/{batch_id}/cancel"): {
        "operationId": "cancelBatch",
        "summary": "Cancel a batch: items not yet in a model call end `canceled` and never run; running ones run on.",
        "parameters": [BATCH_ID_PARAMETER],
        "responses": {
            "200": _ok("What the cancel did to the items.", "BatchCancelCounts"),
            **_errors("batch_not_found", "batch_ended", *PROTECTED_CODES),
        },
    },
    ("delete", "/v1/batches/{batch_id}"): {
        "operationId": "deleteBatch",
        "summary": "Delete an ended batch and its results now, rather than at its TTL (a client that saved them).",
        "parameters": [BATCH_ID_PARAMETER],
        "responses": {
            "204": {"description": "The batch, its items and their results are gone."},
            **_errors("batch_not_found", "batch_running", *PROTECTED_CODES),
        },
    },
    ("get", "/v1/stats"): {
        "operationId": "getStats",
        "summary": "The fleet's reliability counters: executions, reruns, duplicates, jobs failed `worker_lost`.",
        "responses": {"200": _ok("The counters.", "Stats"), **_errors(*PROTECTED_CODES)},
    },
    ("get", "/v1/models"): {
        "operationId": "listModels",
        "summary": "Each task: its queue, the models and workers serving it, answers waiting, runs by outcome.",
        "responses": {"200": _ok("The tasks.", "Models"), **_errors(*PROTECTED_CODES)},
    },
    ("get", "/healthz"): {
        "operationId": "healthz",
        "summary": "Liveness: the API process answers (it does not check Redis or the workers).",
        "security": [],
        "responses": {"200": _ok("The process is alive.", "Health")},
    },
    ("get", "/readyz"): {
        "operationId": "readyz",
        "summary": "Readiness: Redis answers and each task served (BLIPQ_TASKS) has a worker with its model loaded.",
        "security": [],
        "responses": {
            "200": _ok("Ready: jobs submitted now will run.", "Readiness"),
            "503": _ok("Not ready: `missing` says what is missing.", "Readiness"),
        },
    },
    ("get", "/metrics"): {
        "operationId": "metrics",
        "summary": "Prometheus metrics: this API's requests, and the queue, workers and job outcomes.",
        "security": [],
        "responses": {
            "200": {
                "description": "Prometheus's text format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    },
}


def _package_version() -> str:
    try:
        return version("blipq")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _code_spans(text: str) -> Markup:
    """Escape `text` for HTML, and show its `backquoted` spans as code (the descriptions' only markdown)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _error_table(document: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(status, code, meaning) of every error code the document lists, for the docs page."""
    rows: set[tuple[str, str, str]] = set()
    for operations in document["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                rows.update((status, code, meaning) for code, meaning in response.get("x-error-codes", {}).items())
    return sorted(rows)


DOCS_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ doc.info.title }} API</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
code, .path { font-family: ui-monospace, monospace; } h2 { border-top: 1px solid #ccc; padding-top: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; } td, th { border: 1px solid #ddd; padding: .2rem .5rem; }
th { background: #f4f4f4; text-align: left; } .method { font-weight: bold; text-transform: uppercase; }
</style></head><body>
{%- macro type_of(s) -%}
  {%- if s["$ref"] %}{% set name = s["$ref"].rsplit("/", 1)[1] %}<a href="#schema-{{ name }}">{{ name }}</a>
  {%- elif s.anyOf %}{% for each in s.anyOf %}{{ type_of(each) }}{{ " | " if not loop.last }}{% endfor %}
  {%- elif s.enum %}one of {{ s.enum | join(", ") }}
  {%- elif s.const is defined %}{{ s.const }}
  {%- elif s.type == "array" %}array of {{ type_of(s["items"]) }}
  {%- else %}{{ s.type or "any" }}{% if s.format or s.contentMediaType %} ({{ s.format or "file" }}){% endif %}
  {%- endif %}
{%- endmacro %}
{%- macro fields(s) -%}
  {%- if s["$ref"] %}{% set s = doc.components.schemas[s["$ref"].rsplit("/", 1)[1]] %}{% endif %}
  {%- if s.description %}<p>{{ md(s.description) }}</p>{% endif %}
  <table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>
  {%- for name, p in (s.properties or {}).items() %}
  <tr><td><code>{{ name }}</code></td><td>{{ type_of(p) }}</td><td>{{ "yes" if name in (s.required or []) }}</td>
  <td>{{ md(p.description or "") }}
  {%- for bound in ["minLength", "maxLength", "minimum", "exclusiveMinimum", "pattern"] if bound in p %}
  {{ bound }}: {{ p[bound] }}{% endfor %}
  {%- if p.default is defined and p.default is not none %} Default: {{ p.default }}.{% endif %}</td></tr>
  {%- endfor %}</table>
{%- endmacro %}
<h1>{{ doc.info.title }} API <small>{{ doc.info.version }}</small></h1>
<p>{{ md(doc.info.description) }}</p>
<p>Machine-readable: <a href="openapi.json">openapi.json</a> (OpenAPI {{ doc.openapi }}).</p>
<ul>{% for path, operations in doc.paths.items() %}{% for method, op in operations.items() %}
<li><a href="#{{ op.operationId }}"><span class="method">{{ method }}</span> <span class="path">{{ path }}</span></a>:
{{ md(op.summary) }}</li>{% endfor %}{% endfor %}</ul>
{% for path, operations in doc.paths.items() %}{% for method, op in operations.items() %}
<h2 id="{{ op.operationId }}"><span class="method">{{ method }}</span> <span class="path">{{ path }}</span></h2>
<p>{{ md(op.summary) }} {{ md(op.description or "") }}</p>
<p>{{ "Public: no API key needed." if op.security == [] else "Needs an API key when keys are configured." }}</p>
{%- if op.parameters %}<h3>Parameters</h3><table><tr><th>name</th><th>in</th><th>type</th><th>description</th></tr>
{%- for p in op.parameters %}<tr><td><code>{{ p.name }}</code></td><td>{{ p.in }}</td><td>{{ type_of(p.schema) }}</td>
<td>{{ md(p.description or "") }}</td></tr>{% endfor %}</table>{% endif %}
{%- if op.requestBody %}<h3>Request body</h3>{% for media, body in op.requestBody.content.items() %}
<h4><code>{{ media }}</code></h4>{{ fields(body.schema) }}
{%- if body.example %}<p>For example:</p><pre>{{ body.example | tojson(indent=2) }}</pre>{% endif %}
{%- endfor %}{% endif %}
<h3>Responses</h3><table><tr><th>status</th><th>body</th><th>headers</th><th>when</th></tr>
{%- for status, r in op.responses.items() %}<tr><td>{{ status }}</td>
<td>{% for media, body in (r.content or {}).items() %}{{ type_of(body.schema) }}{% endfor %}</td>
<td>{{ (r.headers or {}).keys() | join(", ") }}</td><td>{{ md(r.description) }}</td></tr>{% endfor %}</table>
{% endfor %}{% endfor %}
<h2 id="errors">Error codes</h2>
<p>Every error is <code>{"error": {"code": ..., "message": ...}}</code> (<a href="#schema-Error">Error</a>).</p>
<table><tr><th>status</th><th>code</th><th>when</th></tr>
{%- for status, code, meaning in errors %}<tr><td>{{ status }}</td><td><code>{{ code }}</code></td>
<td>{{ md(meaning) }}</td></tr>{% endfor %}</table>
<h2>Schemas</h2>{% for name, s in doc.components.schemas.items() %}
<h3 id="schema-{{ name }}">{{ name }}</h3>{{ fields(s) if s.properties else type_of(s) }}{% endfor %}
</body></html>
"""
