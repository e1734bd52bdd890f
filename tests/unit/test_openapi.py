"""Given the app, GET /openapi.json is a valid OpenAPI 3.1 document of every route it serves, derived from the views and
the schemas that validate requests, and GET /docs shows it in Swagger UI served by the app itself; both are public."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate

import api.errors
import api.views
from api.app import create_app
from api.auth import ApiKey, hash_api_key, new_api_key
from api.openapi import ANY_ROUTE_CODES, install_openapi, openapi_document, openapi_path
from api.schemas.errors import ERROR_CODES as FIELD_ERROR_CODES
from api.schemas.jobs import JobRequest, JobResponse
from api.settings import ApiSettings
from contract.errors import HTTP_ERRORS
from contract.jobs import Job
from contract.states import JobPriority, JobStatus, JobTask

API_DIR = Path(__file__).resolve().parents[2] / "api"
NO_REDIS = "redis://redis.invalid:1/0"  # serving the document never reaches Redis
# Routes that are not the API: the description itself, the web page and its files, Flask's static files.
NOT_THE_API = {
    *("/openapi.json", "/docs", "/swagger/<path:filename>"),
    *("/", "/page/<path:filename>", "/static/<path:filename>"),
}
ROUTING_METHODS = {"HEAD", "OPTIONS"}  # Flask answers them for every route


def make_app(**settings: Any) -> Flask:
    return create_app(ApiSettings(redis_url=NO_REDIS, **settings))


def document_of(app: Flask, **headers: str) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json", headers=headers)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture(scope="module")
def app() -> Flask:
    return make_app()


@pytest.fixture(scope="module")
def document(app: Flask) -> dict[str, Any]:
    return document_of(app)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)  # raises on the first violation of the OpenAPI 3.1 schema, or a $ref that resolves to nothing

    assert document["openapi"] == "3.1.0"


def test_every_route_of_the_app_is_documented(app: Flask, document: dict[str, Any]) -> None:
    served = {
        (method.lower(), openapi_path(rule))
        for rule in app.url_map.iter_rules()
        if rule.rule not in NOT_THE_API
        for method in (rule.methods or set()) - ROUTING_METHODS
    }
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}

    assert served, "the app serves no route"
    assert served <= documented, f"routes without documentation (add them to api/openapi.py): {served - documented}"
    assert {("post", "/v1/jobs"), ("get", "/v1/jobs/{job_id}"), ("get", "/healthz")} <= documented


def test_a_route_the_app_lacks_is_not_documented() -> None:
    app = Flask("partial")
    app.register_blueprint(api.views.bp)  # the job routes, without the batch ones
    app.add_url_rule("/undocumented", "undocumented", lambda: "ok")

    install_openapi(app, ApiSettings(redis_url=NO_REDIS))
    document = openapi_document(app)

    assert set(document["paths"]) == {
        "/healthz",
        "/v1/stats",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
    }


def test_the_request_bodies_are_the_job_request_schema(document: dict[str, Any]) -> None:
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    schemas = document["components"]["schemas"]
    json_schema = schemas[body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    form_schema = schemas[body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]

    for schema in (json_schema, form_schema):
        assert set(JobRequest.model_fields) <= set(schema["properties"]), schema
        assert schema.get("required", []) == []  # a question is required by task (vqa), which the text says
        assert schema["additionalProperties"] is False
    assert set(form_schema["properties"]) - set(JobRequest.model_fields) == {"image"}
    for field in ("question", "prompt"):
        assert json_schema["properties"][field]["anyOf"][0]["maxLength"] == ApiSettings().max_question_chars


def test_the_question_limit_is_the_apps() -> None:
    document = document_of(make_app(max_question_chars=42))

    schemas = document["components"]["schemas"]
    assert schemas["JobRequest"]["properties"]["question"]["anyOf"][0]["maxLength"] == 42
    assert schemas["JobRequest"]["properties"]["prompt"]["anyOf"][0]["maxLength"] == 42
    assert schemas["BatchItem"]["properties"]["prompt"]["anyOf"][0]["maxLength"] == 42
    assert schemas["BatchRequest"]["properties"]["prompt"]["anyOf"][0]["maxLength"] == 42


def test_every_error_code_the_api_gives_is_documented(document: dict[str, Any]) -> None:
    raised = set(FIELD_ERROR_CODES.values())
    api_errors = "|".join(cls.__name__ for cls in _subclasses(api.errors.ApiError))
    for source in API_DIR.glob("*.py"):
        raised |= set(re.findall(rf'\b(?:{api_errors})\(\s*"([a-z_]+)"', source.read_text()))
    listed = {
        code
        for operations in document["paths"].values()
        for operation in operations.values()
        for response in operation["responses"].values()
        for code in response.get("x-error-codes", {})
    }

    assert {"job_not_found", "image_missing", "question_empty", "broker_unavailable"} <= raised
    assert raised <= set(HTTP_ERRORS), f"codes missing from the registry: {raised - set(HTTP_ERRORS)}"
    assert listed | set(ANY_ROUTE_CODES) == set(HTTP_ERRORS), f"codes no operation lists: {set(HTTP_ERRORS) - listed}"
    for code in ANY_ROUTE_CODES:
        assert f" {code}`" in document["info"]["description"], code


def test_every_error_response_has_the_error_shape(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and "x-error-codes" in response:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    error = document["components"]["schemas"]["ErrorDetail"]
    assert error["required"] == ["code", "message"]


def test_a_job_as_the_api_shows_it_is_a_job_response() -> None:
    queued = Job(id="a" * 22, status=JobStatus.QUEUED, question="what is it?", created_at="2026-11-27T12:00:00.000Z")
    ended = Job(
        id="b" * 22,
        status=JobStatus.FAILED,
        question="what is it?",
        created_at="2026-11-27T12:00:00.000Z",
        image_url="https://images.example.com/dog.png",
        error_code="image_fetch_failed",
        error_message="the host does not answer",
        model="demo",
        started_at="2026-11-27T12:00:01.000Z",
        finished_at="2026-11-27T12:00:02.000Z",
        priority=JobPriority.HIGH,
        deadline_at="1795000000.5",
        webhook="https://hooks.example.com/done",
        webhook_status="delivered",
        webhook_attempts=1,
    )

    caption = Job(
        id="c" * 22,
        status=JobStatus.SUCCEEDED,
        question="a picture of",
        created_at="2026-11-27T12:00:00.000Z",
        answer="a picture of a dog",
        task=JobTask.CAPTION,
    )

    for job in (queued, ended, caption):
        public = job.to_public()
        JobResponse.model_validate(public)  # extra="forbid": a field to_public gained and the model lacks fails here
        assert set(public) == set(JobResponse.model_fields)


def test_with_keys_the_description_is_public_and_keys_are_required() -> None:
    keys = (ApiKey("alice", hash_api_key(new_api_key())),)
    app = make_app(api_keys=keys)
    client = app.test_client()

    document = document_of(app)  # no key sent
    docs = client.get("/docs")
    open_document = document_of(make_app())

    assert docs.status_code == 200
    assert client.get("/v1/stats").status_code == 401
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert {} in open_document["security"], "without keys, a request needs none"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert ("401" in operation["responses"]) == path.startswith("/v1/"), (method, path)
            assert (operation.get("security") == []) == (not path.startswith("/v1/")), (method, path)


def test_the_docs_page_is_swagger_ui_served_by_the_app_itself(app: Flask) -> None:
    client = app.test_client()

    response = client.get("/docs")
    page = response.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "SwaggerUIBundle(" in page and '"openapi.json"' in page
    assert not re.search(r'(?:src|href)="(?:[a-z]+:)?//', page), "the page loads nothing from elsewhere"
    assert {"swagger/js/swagger-ui-bundle.js", "swagger/css/swagger-ui.css"} <= set(assets)
    for asset in assets:  # relative to /docs: each is one of the app's own routes
        served = client.get(f"/{asset}")
        assert served.status_code == 200, asset
        assert served.content_length and served.content_length > 1000, asset
        served.close()
    assert client.get("/swagger/../openapi.py").status_code == 404  # nothing outside the package's files


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def test_a_caption_job_shows_its_task_and_prompt_not_a_question() -> None:
    def public(**fields: Any) -> dict[str, Any]:
        job = Job(id="d" * 22, status=JobStatus.QUEUED, created_at="2026-11-27T12:00:00.000Z", **fields)
        return job.to_public()

    asked = public(question="what is it?")
    prompted = public(question="a picture of", task=JobTask.CAPTION)
    unprompted = public(question="", task=JobTask.CAPTION)

    assert (asked["task"], asked["question"], asked["prompt"]) == ("vqa", "what is it?", None)
    assert (prompted["task"], prompted["question"], prompted["prompt"]) == ("caption", None, "a picture of")
    assert (unprompted["task"], unprompted["question"], unprompted["prompt"]) == ("caption", None, None)


def test_the_caption_codes_are_listed_for_both_submissions(document: dict[str, Any]) -> None:
    caption_codes = {"task_invalid", "question_not_allowed", "prompt_not_allowed", "prompt_too_long", "prompt_invalid"}
    for path in ("/v1/jobs", "/v1/batches"):
        listed = set(document["paths"][path]["post"]["responses"]["422"]["x-error-codes"])
        assert caption_codes <= listed, (path, caption_codes - listed)
    batch_form = document["components"]["schemas"]["BatchForm"]
    assert {"task", "prompt"} <= set(batch_form["properties"]) and batch_form["required"] == ["images"]
