"""Every error code a client can see is in one registry (contract/errors.py): each code that the API and the
workers give is in it, with the right kind and HTTP status, and each code in it is given somewhere.

The codes given are found by reading the source (ast): string codes passed to the error classes, `code=` arguments,
`"code": ...` entries, `code = ...` assignments, and `exc.code` of an error caught by its class.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from flask import Flask

import api.errors
import contract.errors
from api.app import create_app
from api.schemas.errors import ERROR_CODES as FIELD_ERROR_CODES
from api.settings import ApiSettings
from contract.errors import (
    ERRORS,
    FRAMEWORK_CODES,
    FRAMEWORK_FALLBACK_CODE,
    HTTP_ERRORS,
    REGISTRY,
    BlipqError,
    ErrorKind,
    errors_markdown,
    is_transient,
)

ROOT = Path(__file__).resolve().parents[2]
CODE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
LUA_CODE = re.compile(r"'error_code', '([a-z_]+)'")  # a code set by a Redis script
NO_REDIS = "redis://redis.invalid:1/0"  # an unknown route or a wrong method never reaches Redis


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


API_ERRORS = {cls.__name__: cls for cls in _subclasses(api.errors.ApiError)}
WORKER_ERRORS = {cls.__name__: cls for cls in _subclasses(BlipqError)}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def _code(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE.match(node.value):
        return node.value
    return None


class CodeFinder(ast.NodeVisitor):
    """The codes a module gives, each with the API error class that raises it (None for other ways of giving one)."""

    def __init__(self) -> None:
        self.found: set[tuple[str, str | None]] = set()
        self.caught: dict[str, str] = {}  # `except XError as exc`: exc -> XError
        self.class_name = ""

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer, self.class_name = self.class_name, node.name
        self.generic_visit(node)
        self.class_name = outer

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name and node.type is not None and _name(node.type) in WORKER_ERRORS:
            self.caught[node.name] = _name(node.type)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        called = _name(node.func)
        if called in API_ERRORS and node.args and (code := _code(node.args[0])):
            self.found.add((code, called))
        if called == "__init__" and self.class_name in API_ERRORS and node.args and (code := _code(node.args[0])):
            self.found.add((code, self.class_name))  # super().__init__("rate_limited", ...)
        if called == "error_response" and len(node.args) > 1 and (code := _code(node.args[1])):
            self.found.add((code, None))
        if called.endswith("fail"):  # fail(pairs, "timeout", message): a worker's helper that ends items
            self.found |= {(code, None) for arg in node.args if (code := _code(arg))}
        for keyword in node.keywords:
            if keyword.arg == "code":
                self._add(keyword.value)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "code":
                self._add(value)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if _name(target) == "code":  # code = "x", code = registered(kind, "x"), code = next(..., "x")
                self.found |= {(code, None) for sub in ast.walk(node.value) if (code := _code(sub))}  # type: ignore[arg-type]
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # code, message = "x", ...
                for name, value in zip(target.elts, node.value.elts, strict=False):
                    if _name(name) == "code":
                        self._add(value)
        self.generic_visit(node)

    def _add(self, value: ast.expr) -> None:
        if code := _code(value):
            self.found.add((code, None))
        elif isinstance(value, ast.Attribute) and value.attr == "code" and _name(value.value) in self.caught:
            self.found.add((WORKER_ERRORS[self.caught[_name(value.value)]].code, None))  # code=exc.code


def codes_in(path: Path) -> set[tuple[str, str | None]]:
    source = path.read_text()
    if path.suffix == ".lua":  # a Redis script (contract/scripts/, worker/scripts/)
        return {(code, None) for code in LUA_CODE.findall(source)}
    finder = CodeFinder()
    finder.visit(ast.parse(source))
    return finder.found | {(code, None) for code in LUA_CODE.findall(source)}


def given(package: str, exclude: tuple[str, ...] = ()) -> dict[Path, set[tuple[str, str | None]]]:
    return {
        path: codes_in(path)
        for path in sorted([*(ROOT / package).rglob("*.py"), *(ROOT / package).rglob("*.lua")])
        if path.relative_to(ROOT).as_posix() not in exclude
    }


REGISTRY_MODULE = "contract/errors.py"  # its codes are the registry's own, not codes given
WEBHOOK_MODULE = ROOT / "worker" / "webhooks.py"
# The command line and the client (blipq/): what they give is their own codes, or the service's where they refuse
# what the service would.
CLIENT_MODULES = (
    "blipq/client.py",
    "blipq/client_errors.py",
    "blipq/cli.py",
    "blipq/tag.py",
    "blipq/tag_inputs.py",
    "blipq/tag_lines.py",
)


def worker_side() -> dict[Path, set[tuple[str, str | None]]]:
    """What the worker's code gives, with the contract's scripts that record a job's failure (the registry aside)."""
    return {**given("worker"), **given("contract", exclude=(REGISTRY_MODULE,))}


def client_codes() -> set[str]:
    return {code for module in CLIENT_MODULES for code, _ in codes_in(ROOT / module)}


def test_every_code_the_api_gives_is_an_http_error_of_the_registry_with_its_status() -> None:
    found = {pair for codes in given("api", exclude=CLIENT_MODULES).values() for pair in codes} | {
        (c, None) for c in FIELD_ERROR_CODES.values()
    }
    codes = {code for code, _ in found}

    assert {
        "job_not_found",
        "image_missing",
        "rate_limited",
        "queue_full",
        "store_unavailable",
        "invalid_field",
    } <= codes
    assert codes <= set(HTTP_ERRORS), f"codes the API gives that the registry lacks: {codes - set(HTTP_ERRORS)}"
    for code, raised_by in found:
        if raised_by is not None:
            assert HTTP_ERRORS[code].status == API_ERRORS[raised_by].status, (code, raised_by)


def test_every_code_the_client_gives_is_its_own_or_one_the_service_gives_for_the_same() -> None:
    given_by_client = client_codes()
    own = {entry.code for entry in REGISTRY if entry.kind is ErrorKind.CLIENT}

    assert {"service_not_found", "service_refused", "file_unreadable", "image_url_invalid"} <= given_by_client
    assert given_by_client <= own | set(HTTP_ERRORS), given_by_client - own - set(HTTP_ERRORS)


def test_a_code_is_transient_or_not_whatever_its_kind() -> None:
    for code in {entry.code for entry in REGISTRY}:
        kinds = {entry.kind: entry.transient for entry in REGISTRY if entry.code == code}
        assert len(set(kinds.values())) == 1, (code, kinds)
    assert not is_transient("image_invalid") and not is_transient("url_not_allowed")
    assert is_transient("worker_lost") and is_transient("canceled") and is_transient("image_fetch_timeout")
    assert is_transient("a_code_from_a_newer_service"), "an unknown code is asked again"


def test_every_code_a_worker_gives_is_a_failure_of_the_registry() -> None:
    found = worker_side()
    webhook = {code for code, _ in found.pop(WEBHOOK_MODULE)}
    failures = {code for codes in found.values() for code, _ in codes}
    classes = {cls.code for cls in WORKER_ERRORS.values()}

    assert {"worker_lost", "deadline_exceeded", "canceled", "internal_error", "timeout", "wrong_task"} <= failures
    assert {"webhook_rejected", "url_not_allowed"} <= webhook
    assert {(ErrorKind.FAILURE, code) for code in failures} <= set(ERRORS)
    assert {(ErrorKind.WEBHOOK, code) for code in webhook} <= set(ERRORS)
    assert {(ErrorKind.FAILURE, cls.code) for cls in WORKER_ERRORS.values() if cls.__name__ != "SettingsError"} <= set(
        ERRORS
    )
    assert (ErrorKind.SETTING, contract.errors.SettingsError.code) in ERRORS
    assert classes - {"bad_setting"} <= {entry.code for entry in REGISTRY if entry.kind is ErrorKind.FAILURE}


def test_every_code_of_the_registry_is_given_somewhere() -> None:
    api_codes = {code for codes in given("api", exclude=CLIENT_MODULES).values() for code, _ in codes}
    api_codes |= set(FIELD_ERROR_CODES.values())
    worker_found = worker_side()
    webhook = {code for code, _ in worker_found.pop(WEBHOOK_MODULE)}
    classes = {cls.code for cls in WORKER_ERRORS.values()}
    failures = {code for codes in worker_found.values() for code, _ in codes} | (classes - {"bad_setting"})
    # The web framework's own errors are answered with the registry's code for their status (api/errors.py).
    framework = {*FRAMEWORK_CODES.values(), FRAMEWORK_FALLBACK_CODE}
    used = {
        ErrorKind.HTTP: api_codes | framework,
        ErrorKind.FAILURE: failures,
        ErrorKind.WEBHOOK: webhook,
        ErrorKind.CLIENT: client_codes(),
        ErrorKind.SETTING: classes & {"bad_setting"},
    }

    unused = [(entry.kind, entry.code) for entry in REGISTRY if entry.code not in used[entry.kind]]
    assert unused == [], f"registry entries nothing gives: {unused}"
    assert "FRAMEWORK_CODES.get(status, FRAMEWORK_FALLBACK_CODE)" in (ROOT / "api" / "errors.py").read_text()


def test_each_code_is_registered_once_per_kind_and_http_errors_have_a_status() -> None:
    assert len(ERRORS) == len(REGISTRY)
    for entry in REGISTRY:
        assert CODE.match(entry.code), entry.code
        assert entry.when and "\n" not in entry.when, entry.code
        assert (entry.status is None) == (entry.kind is not ErrorKind.HTTP or entry.code == FRAMEWORK_FALLBACK_CODE)
    assert FRAMEWORK_CODES[404] == "not_found" and FRAMEWORK_CODES[405] == "method_not_allowed"


def test_an_unknown_route_and_a_wrong_method_are_answered_with_the_registry_codes() -> None:
    app: Flask = create_app(ApiSettings(redis_url=NO_REDIS))
    client = app.test_client()

    unknown = client.get("/v1/nothing-here")
    wrong_method = client.put("/v1/jobs")

    assert unknown.status_code == HTTP_ERRORS["not_found"].status
    assert unknown.get_json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == HTTP_ERRORS["method_not_allowed"].status
    assert wrong_method.get_json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["Allow"]  # the methods it takes
    assert set(wrong_method.get_json()["error"]) == {"code", "message"}


def test_the_errors_page_lists_every_code() -> None:
    page = errors_markdown()

    assert '{"error": {"code": "...", "message": "..."}}' in page
    for entry in REGISTRY:
        assert f"`{entry.code}`" in page
    assert "| 404 Not Found | `job_not_found` |" in page
    assert "| `image_fetch_timeout` |" in page and "| yes |" in page
