"""The API's description: an OpenAPI 3.1 document that spectree derives from the routes and their pydantic models,
and Swagger UI to read it at /docs.

Each route says how it is documented beside it, with @documented(...): its operation id, its request models (JSON
body, multipart form, query string, headers: api/schemas/), its answers' models and the error codes it gives.
install_openapi(app, settings) hands the routes the app has to a SpecTree of the app's own (its security follows the
app's API keys), which writes the document from the views' docstrings (summary, then description) and the models'
JSON Schemas. spectree only documents here: its backend below runs each view as it is, so the views keep reading
their bodies themselves, with the API's own error codes and messages.

What spectree cannot say is added to its document afterwards: each error response's codes (`x-error-codes`; their
statuses and meanings, which are the responses' descriptions, come from contract.errors.REGISTRY), response
headers, answers that are not JSON (JSON Lines, Prometheus text), the id patterns of path parameters, and the
question length limit, which is a setting.

`GET /docs` is Swagger UI as the flask-openapi3-swagger package ships it (its page and its files, served by this app
from the installed package: nothing is fetched from elsewhere).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import flask_openapi3_swagger
from flask import Blueprint, Flask, current_app, jsonify, render_template_string, send_from_directory
from flask import Response as FlaskResponse
from flask_openapi3_swagger.templates import swagger_html_string
from pydantic import BaseModel
from spectree import Response, SecurityScheme, SecuritySchemeData, SpecTree
from spectree.models import InType, SecureType
from spectree.plugins.flask_plugin import FlaskPlugin
from werkzeug.routing import Rule

from api.auth import PUBLIC_ATTRIBUTE, public
from api.request_body import ITEM_ID_PATTERN, JOB_ID_PATTERN
from api.schemas.errors import Error
from api.settings import ApiSettings
from contract.errors import HTTP_ERRORS

View = TypeVar("View", bound=Callable[..., Any])

JSON = "application/json"
OPERATION_ATTRIBUTE = "blipq_operation"  # where @documented keeps a view's Operation
EXTENSION_KEY = "blipq.openapi"  # an app's SpecTree, its operations and its document (built on first use)
SWAGGER_DIR = Path(flask_openapi3_swagger.__file__).resolve().parent / "templates" / "swagger"
# The question length limit is a setting, given to the validator as context: pydantic's schema cannot know it.
TEXT_FIELDS = {
    "JobRequest": ("question", "prompt"),
    "JobForm": ("question", "prompt"),
    "BatchItem": ("question", "prompt"),
    "BatchRequest": ("prompt",),
    "BatchForm": ("prompt",),
}
PATH_PATTERNS = {  # a batch item is read and canceled as a job: `<batch id>.<index>`
    "job_id": f"{JOB_ID_PATTERN.pattern[:-1]}|{ITEM_ID_PATTERN.pattern[1:]}",
    "batch_id": JOB_ID_PATTERN.pattern,
}

DESCRIPTION = """\
Ask questions about images, or have them captioned (`"task": "caption"`). A submission is validated, stored and \
enqueued in Redis, and answered `202` at once with the job's id; poll `GET /v1/jobs/{id}` until its status is \
`succeeded` (the answer is there) or another final one: `failed` (its `error` says why), `canceled` or `expired`. \
Every error the API answers has the shape `{"error": {"code", "message"}}`: the code is stable, the message is for \
humans; docs/errors.md lists them all. When API keys are configured, every request to `/v1` needs one, as \
`Authorization: Bearer <key>` or `X-API-Key: <key>`; the other routes are public. Any route may also answer: """

# Error codes by the operations that give them; their statuses and meanings are the registry's.
# The errors any route may answer, told once in the document's description rather than by every operation.
ANY_ROUTE_CODES = ("bad_request", "not_found", "method_not_allowed", "internal_error", "http_error")
PROTECTED_CODES = ("api_key_missing", "api_key_invalid", "rate_limited", "store_unavailable")  # any /v1 route
VALIDATION_CODES = (
    *("invalid_body", "unknown_field", "invalid_field", "task_invalid", "image_url_invalid", "image_missing"),
    *("question_missing", "question_empty", "question_too_long", "question_invalid", "question_not_allowed"),
    *("prompt_too_long", "prompt_invalid", "prompt_not_allowed", "image_invalid", "priority_invalid"),
    *("deadline_invalid", "webhook_invalid", "webhook_unavailable"),
)
ADMISSION_CODES = ("broker_unavailable", "replicas_unavailable", "queue_full", "key_queue_full", "no_worker")
SUBMIT_CODES = (
    *("invalid_json", "idempotency_key_invalid", "idempotency_conflict", "idempotency_key_in_use"),
    *("body_too_large", "image_too_large", "unsupported_media_type", *VALIDATION_CODES, "image_conflict"),
    *ADMISSION_CODES,
)
BATCH_SUBMIT_CODES = (
    *("invalid_json", "body_too_large", "image_too_large", "unsupported_media_type", *VALIDATION_CODES),
    *("batch_empty", "batch_too_large", "batch_invalid", "questions_invalid", *ADMISSION_CODES),
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
SECURITY_SCHEMES = [
    SecurityScheme(
        name="bearerAuth",
        data=SecuritySchemeData(type=SecureType.HTTP, scheme="bearer", description="`Authorization: Bearer <key>`"),
    ),
    SecurityScheme(
        name="apiKeyHeader", data=SecuritySchemeData(type=SecureType.API_KEY, name="X-API-Key", field_in=InType.HEADER)
    ),
]
KEYS: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]


@dataclass(frozen=True)
class Operation:
    """How a route is documented (see `documented`)."""

    operation_id: str
    tag: str
    ok: Mapping[int, tuple[type[BaseModel] | None, str]]
    errors: tuple[str, ...] = ()
    json: type[BaseModel] | None = None
    form: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    path: Mapping[str, str] = field(default_factory=dict)
    media_type: str = JSON
    response_headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)

    def codes(self, public: bool) -> dict[int, dict[str, str]]:
        """The operation's error codes by status, with their meanings; a /v1 route adds the keys' and limits'."""
        by_status: dict[int, dict[str, str]] = {}
        for code in (*self.errors, *(() if public else PROTECTED_CODES)):
            entry = HTTP_ERRORS[code]
            assert entry.status is not None, f"{code} has no status of its own"
            by_status.setdefault(entry.status, {})[code] = entry.when
        return dict(sorted(by_status.items()))

    def spectree_arguments(self, public: bool) -> dict[str, Any]:
        """What SpecTree.validate is told of the route."""
        responses: dict[str, Any] = {f"HTTP_{status}": answer for status, answer in self.ok.items()}
        for status, meanings in self.codes(public).items():
            listed = "; ".join(f"`{code}`: {meaning}" for code, meaning in meanings.items())
            responses[f"HTTP_{status}"] = (Error, f"{HTTPStatus(status).phrase}. {listed}.")
        statuses = sorted(self.codes(public) or self.ok)
        return {
            "json": self.json,
            "form": self.form,
            "query": self.query,
            "headers": self.headers,
            "resp": Response(**responses),
            "tags": [self.tag],
            "security": {} if public else None,  # {}: no key needed; None: the document's requirement
            "operation_id": self.operation_id,
            "path_parameter_descriptions": dict(self.path),
            # spectree adds its validation error model at this status unless the status has a model: give one it has.
            "validation_error_status": statuses[0],
        }


def documented(
    operation_id: str,
    tag: str,
    ok: Mapping[int, tuple[type[BaseModel] | None, str]],
    errors: Iterable[str] = (),
    **details: Any,
) -> Callable[[View], View]:
    """Document a view: its answers (`ok`: status -> (model, description)), the error codes it gives, and `details`
    (json, form, query, headers: request models; path: parameter descriptions; media_type of its answer, when not
    JSON; response_headers: status -> {header: component})."""

    def document(view: View) -> View:
        setattr(view, OPERATION_ATTRIBUTE, Operation(operation_id, tag, ok, tuple(errors), **details))
        return view

    return document


class DescribeOnly(FlaskPlugin):
    """spectree's Flask backend, documenting only: a view runs as it is, its request and its answer untouched."""

    def validate(
        self,
        func: Callable[..., Any],
        query: Any,
        json: Any,
        form: Any,
        headers: Any,
        cookies: Any,
        resp: Any,
        before: Any,
        after: Any,
        validation_error_status: int,
        skip_validation: bool,
        force_resp_serialize: bool,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        return func(*args, **kwargs)


bp = Blueprint("openapi", __name__)  # spectree leaves out the endpoints named openapi*: these describe, they are not


@bp.get("/openapi.json")
@public
def openapi_json() -> FlaskResponse:
    """The OpenAPI 3.1 document of this API."""
    return jsonify(openapi_document(current_app))


@bp.get("/docs")
@public
def docs() -> str:
    """Swagger UI, showing /openapi.json."""
    return render_template_string(swagger_html_string, doc_url="openapi.json", swagger_config=None, oauth_config=None)


@bp.get("/swagger/<path:filename>")
@public
def swagger_files(filename: str) -> FlaskResponse:
    """Swagger UI's script, style sheet and icon, from the installed package."""
    return send_from_directory(SWAGGER_DIR, filename)


@dataclass
class Described:
    """An app's SpecTree, the settings its document depends on, its operations by id, and the document once built."""

    spec: SpecTree
    settings: ApiSettings
    operations: dict[str, Operation]
    document: dict[str, Any] | None = None


def install_openapi(app: Flask, settings: ApiSettings) -> None:
    """Serve /openapi.json and /docs, describing the routes of `app` documented with @documented.

    Call it once every route is registered: the routes it sees are the ones described.
    """
    spec = SpecTree(
        "flask",
        backend=DescribeOnly,
        mode="strict",  # only the documented views
        annotations=False,  # the views take no spectree arguments
        page_templates={},  # spectree's own pages load their scripts from a CDN; /docs serves Swagger UI itself
        naming_strategy=lambda model: model.__name__,
        nested_naming_strategy=lambda _parent, child: child,
        validation_error_model=Error,
        title="blipq",
        version=_package_version(),
        description=f"{DESCRIPTION}{_any_route_errors()}.",
        security_schemes=SECURITY_SCHEMES,
        # With no keys configured, a key is accepted and ignored: the empty requirement says none is needed.
        security=KEYS if settings.api_keys else [{}, *KEYS],
    )
    operations = {}
    for endpoint, view in list(app.view_functions.items()):
        operation: Operation | None = getattr(view, OPERATION_ATTRIBUTE, None)
        if operation is not None:
            arguments = operation.spectree_arguments(bool(getattr(view, PUBLIC_ATTRIBUTE, False)))
            app.view_functions[endpoint] = spec.validate(**arguments)(view)
            operations[operation.operation_id] = operation
    app.extensions[EXTENSION_KEY] = Described(spec, settings, operations)
    app.register_blueprint(bp)


def openapi_document(app: Flask) -> dict[str, Any]:
    """The app's OpenAPI document, built once."""
    described: Described = app.extensions[EXTENSION_KEY]
    if described.document is None:
        with app.app_context():  # spectree reads the routes of the current app
            document = copy.deepcopy(described.spec.spec)
        _complete(document, described.operations, described.settings)
        described.document = document
    return described.document


def openapi_path(rule: Rule) -> str:
    """A Flask rule's path in OpenAPI's spelling: `/v1/jobs/<job_id>` -> `/v1/jobs/{job_id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)


def _complete(document: dict[str, Any], operations: Mapping[str, Operation], settings: ApiSettings) -> None:
    """Add to spectree's document what it cannot say (see the module's docstring)."""
    if not document["tags"]:
        del document["tags"]
    components = document["components"]
    components["headers"] = copy.deepcopy(HEADERS)
    for path_item in document["paths"].values():
        for operation in path_item.values():
            documented_as = operations[operation["operationId"]]
            public = operation.get("security") == []
            for parameter in operation["parameters"]:
                if parameter["in"] == "path" and parameter["name"] in PATH_PATTERNS:
                    parameter["schema"]["pattern"] = PATH_PATTERNS[parameter["name"]]
            if not operation["description"]:
                del operation["description"]
            if not operation["parameters"]:
                del operation["parameters"]
            _complete_responses(operation["responses"], documented_as, public)
    schemas = components["schemas"]
    for model, fields in TEXT_FIELDS.items():
        for name in fields:
            if model in schemas:
                schemas[model]["properties"][name]["anyOf"][0]["maxLength"] = settings.max_question_chars
    if "BatchRequest" in schemas:
        questions = schemas["BatchRequest"]["properties"]["questions"]
        questions["anyOf"][0]["items"]["maxLength"] = settings.max_question_chars


def _complete_responses(responses: dict[str, Any], operation: Operation, public: bool) -> None:
    """Each error response's codes and headers; each answer's headers and media type."""
    for status, meanings in operation.codes(public).items():
        response = responses[str(status)]
        response["x-error-codes"] = meanings
        if status in HEADERS_BY_STATUS:
            response["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in HEADERS_BY_STATUS[status]}
    for status in operation.ok:
        response = responses[str(status)]
        headers = operation.response_headers.get(status, {})
        if headers:
            response["headers"] = {name: {"$ref": f"#/components/headers/{ref}"} for name, ref in headers.items()}
        if operation.media_type != JSON and "content" in response:
            response["content"] = {operation.media_type: response["content"][JSON]}


def _any_route_errors() -> str:
    """The errors any route may answer, as the document's description lists them."""
    entries = (HTTP_ERRORS[code] for code in ANY_ROUTE_CODES)
    return "; ".join(f"`{entry.status or 'another status'} {entry.code}`: {entry.when}" for entry in entries)


def _package_version() -> str:
    try:
        return version("blipq")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
