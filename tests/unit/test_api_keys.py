"""Given API keys, every request but the health check needs one, and a job is visible only to the key that made it."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from api.admission import queue_depth, queue_names
from api.app import create_app
from api.auth import ApiKey, authenticate, hash_api_key, new_api_key
from api.settings import ApiSettings
from blipq.cli import main
from blipq.up_redis import RedisProcess
from contract.errors import SettingsError
from tests.support.service import api_client

JOB = {"question": "what is it?", "image_url": "https://images.example.com/dog.png"}


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    """A queue that no worker reads: what is enqueued stays there to be counted."""
    name = f"nobody-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(*queue_names(name))


@pytest.fixture
def keys() -> dict[str, str]:
    """Two clients' keys, as `blipq api-key new` makes them."""
    return {"alice": new_api_key(), "bob": new_api_key()}


@pytest.fixture
def keys_file(tmp_path: Path, keys: dict[str, str]) -> Path:
    """The file an operator writes: one `name:sha256hex` line per key, comments and blank lines allowed."""
    path = tmp_path / "api-keys"
    lines = ["# blipq clients"] + [f"{name}:{hash_api_key(key)}" for name, key in keys.items()] + [""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def api(redis_server: RedisProcess, queue: str, keys_file: Path) -> FlaskClient:
    env = {"BLIPQ_REDIS_URL": redis_server.url, "BLIPQ_QUEUE": queue, "BLIPQ_API_KEYS_FILE": str(keys_file)}
    env["BLIPQ_WAIT_FOR_WORKERS"] = "on"  # its jobs wait in a queue no worker reads
    return create_app(ApiSettings.from_env(env)).test_client()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stored_jobs(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter("blipq:job:*"))


def assert_error(response: TestResponse, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_a_request_without_a_key_is_refused_and_makes_no_job(
    api: FlaskClient, redis_client: redis.Redis, queue: str
) -> None:
    submitted = api.post("/v1/jobs", json=JOB)
    read = api.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA")

    for response in (submitted, read):
        assert_error(response, 401, "api_key_missing")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert stored_jobs(redis_client) == []
    assert queue_depth(redis_client, queue) == 0


@pytest.mark.parametrize(
    "headers",
    [
        bearer(new_api_key()),  # well formed, but not configured
        {"X-API-Key": new_api_key()},
        bearer("blipq_"),
        {"Authorization": "Bearer alice"},  # a name is not a key
    ],
)
def test_a_wrong_key_is_refused(api: FlaskClient, redis_client: redis.Redis, headers: dict[str, str]) -> None:
    response = api.post("/v1/jobs", json=JOB, headers=headers)

    assert_error(response, 401, "api_key_invalid")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert stored_jobs(redis_client) == []


def test_the_stored_hash_is_not_a_key(api: FlaskClient, keys: dict[str, str]) -> None:
    """Whoever reads the keys file learns nothing that opens the API."""
    assert_error(api.post("/v1/jobs", json=JOB, headers=bearer(hash_api_key(keys["alice"]))), 401, "api_key_invalid")


def test_either_header_carries_the_key(api: FlaskClient, keys: dict[str, str]) -> None:
    assert api.post("/v1/jobs", json=JOB, headers=bearer(keys["alice"])).status_code == 202
    assert api.post("/v1/jobs", json=JOB, headers={"X-API-Key": keys["bob"]}).status_code == 202
    assert api.post("/v1/jobs", json=JOB, headers={"Authorization": f"bearer  {keys['bob']} "}).status_code == 202


def test_a_job_is_visible_only_to_the_key_that_made_it(
    api: FlaskClient, redis_client: redis.Redis, keys: dict[str, str]
) -> None:
    job_id = api.post("/v1/jobs", json=JOB, headers=bearer(keys["alice"])).get_json()["id"]

    as_alice = api.get(f"/v1/jobs/{job_id}", headers=bearer(keys["alice"]))
    as_bob = api.get(f"/v1/jobs/{job_id}", headers=bearer(keys["bob"]))
    unknown = api.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA", headers=bearer(keys["bob"]))

    assert as_alice.status_code == 200
    assert as_alice.get_json()["id"] == job_id
    assert "owner" not in as_alice.get_json()
    assert_error(as_bob, 404, "job_not_found")
    assert as_bob.get_json() == unknown.get_json(), "another key's job must look exactly like no job"
    assert redis_client.hget(f"blipq:job:{job_id}", "owner") == b"alice"


def test_the_health_check_needs_no_key(api: FlaskClient) -> None:
    assert api.get("/healthz").status_code == 200


def test_without_keys_the_api_is_open(redis_server: RedisProcess, redis_client: redis.Redis, queue: str) -> None:
    api = api_client(redis_server.url, queue)

    submitted = api.post("/v1/jobs", json=JOB)
    job_id = submitted.get_json()["id"]

    assert submitted.status_code == 202
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200
    assert redis_client.hget(f"blipq:job:{job_id}", "owner") == b""


def test_settings_hold_names_and_hashes_never_keys(keys_file: Path, keys: dict[str, str]) -> None:
    carol = new_api_key()
    env = {"BLIPQ_API_KEYS_FILE": str(keys_file), "BLIPQ_API_KEY_HASHES": f" carol:{hash_api_key(carol).upper()} ,"}

    settings = ApiSettings.from_env(env)

    assert settings.api_keys == (
        ApiKey("carol", hashlib.sha256(carol.encode()).hexdigest()),
        ApiKey("alice", hashlib.sha256(keys["alice"].encode()).hexdigest()),
        ApiKey("bob", hashlib.sha256(keys["bob"].encode()).hexdigest()),
    )
    for key in (carol, *keys.values()):
        assert key not in repr(settings)
        assert key not in keys_file.read_text()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BLIPQ_API_KEY_HASHES": "alice"}, "BLIPQ_API_KEY_HASHES"),
        ({"BLIPQ_API_KEY_HASHES": "alice:1234"}, "BLIPQ_API_KEY_HASHES"),
        ({"BLIPQ_API_KEY_HASHES": f":{'a' * 64}"}, "BLIPQ_API_KEY_HASHES"),
        ({"BLIPQ_API_KEY_HASHES": f"al ice:{'a' * 64}"}, "BLIPQ_API_KEY_HASHES"),
        ({"BLIPQ_API_KEY_HASHES": f"alice:{'a' * 64},alice:{'b' * 64}"}, "BLIPQ_API_KEY_HASHES"),
        ({"BLIPQ_API_KEYS_FILE": "/nonexistent/api-keys"}, "BLIPQ_API_KEYS_FILE"),
    ],
)
def test_a_bad_key_configuration_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        ApiSettings.from_env(env)


def test_a_keys_file_without_keys_does_not_leave_the_api_open(tmp_path: Path) -> None:
    empty = tmp_path / "api-keys"
    empty.write_text("# no key yet\n\n")
    with pytest.raises(SettingsError, match="holds no key"):
        ApiSettings.from_env({"BLIPQ_API_KEYS_FILE": str(empty)})


def test_a_key_configured_by_mistake_is_refused_without_showing_it() -> None:
    key = new_api_key()
    with pytest.raises(SettingsError, match="BLIPQ_API_KEY_HASHES") as error:
        ApiSettings.from_env({"BLIPQ_API_KEY_HASHES": key})
    assert key not in str(error.value), "a start-up error ends up in logs"


def test_authenticate_finds_the_one_matching_key() -> None:
    keys = {name: new_api_key() for name in ("alice", "bob", "carol")}
    configured = tuple(ApiKey(name, hash_api_key(key)) for name, key in keys.items())

    assert [authenticate(key, configured) for key in keys.values()] == ["alice", "bob", "carol"]
    assert authenticate(new_api_key(), configured) is None
    assert authenticate("", configured) is None


def test_blipq_api_key_new_prints_a_working_key_and_its_line(
    redis_server: RedisProcess, queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["api-key", "new", "carol"])
    first = capsys.readouterr().out.split()
    main(["api-key", "new", "carol"])
    second = capsys.readouterr().out.split()

    key = next(word for word in first if word.startswith("blipq_"))
    line = next(word for word in first if word.startswith("carol:"))
    assert line == f"carol:{hash_api_key(key)}"
    assert key != next(word for word in second if word.startswith("blipq_"))
    settings = ApiSettings.from_env(
        {"BLIPQ_REDIS_URL": redis_server.url, "BLIPQ_QUEUE": queue, "BLIPQ_API_KEY_HASHES": line}
        | {"BLIPQ_WAIT_FOR_WORKERS": "on"}
    )
    assert create_app(settings).test_client().post("/v1/jobs", json=JOB, headers=bearer(key)).status_code == 202


def test_blipq_api_key_new_refuses_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["api-key", "new", "alice:admin"])
    assert exit_info.value.code != 0
    assert "blipq_" not in capsys.readouterr().out
