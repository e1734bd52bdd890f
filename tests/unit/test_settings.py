"""Settings come from BLIPQ_* variables; a bad value stops start-up naming the variable."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys

import pytest
from limits._storage_scheme import parse_storage_uri

from api.settings import ApiSettings
from blipq.reference import configuration_tables
from blipq.settings import ClientSettings, UpSettings
from contract.errors import SettingsError
from contract.states import JobTask
from tests.support.environment import ROOT
from worker.settings import DEMO_CAPTION_MODEL_DIR, DEMO_MODEL_DIR, WorkerSettings

VARIABLE = re.compile(r"\bBLIPQ_[A-Z0-9_]*[A-Z0-9]\b")


def test_defaults_serve_the_shipped_demo_model() -> None:
    settings = WorkerSettings.from_env({})
    assert settings.model == str(DEMO_MODEL_DIR)
    assert (settings.device, settings.dtype, settings.max_new_tokens) == ("auto", "auto", 20)


def test_values_are_typed() -> None:
    settings = WorkerSettings.from_env(
        {
            "BLIPQ_MODEL": "Salesforce/blip-vqa-base",
            "BLIPQ_DTYPE": "float16",
            "BLIPQ_DEVICE": "cuda:1",
            "BLIPQ_MAX_NEW_TOKENS": "8",
            "BLIPQ_FETCH_TIMEOUT_S": "2.5",
        }
    )
    assert settings.model == "Salesforce/blip-vqa-base"
    assert (settings.dtype, settings.device, settings.max_new_tokens) == ("float16", "cuda:1", 8)
    assert settings.fetch_timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BLIPQ_DTYPE": "float8"}, "BLIPQ_DTYPE"),
        ({"BLIPQ_DEVICE": "tpu"}, "BLIPQ_DEVICE"),
        ({"BLIPQ_MAX_NEW_TOKENS": "many"}, "BLIPQ_MAX_NEW_TOKENS"),
        ({"BLIPQ_MAX_NEW_TOKENS": "0"}, "BLIPQ_MAX_NEW_TOKENS"),
        ({"BLIPQ_FETCH_TIMEOUT_S": "-1"}, "BLIPQ_FETCH_TIMEOUT_S"),
        ({"BLIPQ_REDIS_URL": "http://localhost"}, "BLIPQ_REDIS_URL"),
        ({"BLIPQ_FETCH_ALLOW_NETWORKS": "10.0.0.0/33"}, "BLIPQ_FETCH_ALLOW_NETWORKS"),
        ({"BLIPQ_FETCH_ALLOW_NETWORKS": "10.0.0.5/8"}, "BLIPQ_FETCH_ALLOW_NETWORKS"),  # host bits: a typo
        ({"BLIPQ_FETCH_ALLOW_NETWORKS": "intranet"}, "BLIPQ_FETCH_ALLOW_NETWORKS"),
        ({"BLIPQ_FETCH_ALLOW_NETWORKS": "10.0.0.0/8;192.168.0.0/16"}, "BLIPQ_FETCH_ALLOW_NETWORKS"),
        ({"BLIPQ_FETCH_ALLOW_PORTS": "http"}, "BLIPQ_FETCH_ALLOW_PORTS"),
        ({"BLIPQ_FETCH_ALLOW_PORTS": "0"}, "BLIPQ_FETCH_ALLOW_PORTS"),
        ({"BLIPQ_FETCH_ALLOW_PORTS": "65536"}, "BLIPQ_FETCH_ALLOW_PORTS"),
        ({"BLIPQ_FETCH_ALLOW_PORTS": "9000-8000"}, "BLIPQ_FETCH_ALLOW_PORTS"),
        ({"BLIPQ_FETCH_ALLOW_PORTS": "9000-"}, "BLIPQ_FETCH_ALLOW_PORTS"),
    ],
)
def test_bad_worker_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        WorkerSettings.from_env(env)


def test_image_fetching_allows_no_private_network_and_no_other_port_by_default() -> None:
    settings = WorkerSettings.from_env({})
    assert (settings.fetch_allow_networks, settings.fetch_allow_ports) == ((), ())


def test_allowed_networks_and_ports_are_parsed() -> None:
    settings = WorkerSettings.from_env(
        {
            "BLIPQ_FETCH_ALLOW_NETWORKS": " 10.1.0.0/16, 192.168.7.9 ,fd00:1::/64,",
            "BLIPQ_FETCH_ALLOW_PORTS": "8080, 9000-9099",
        }
    )
    assert settings.fetch_allow_networks == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("192.168.7.9/32"),
        ipaddress.ip_network("fd00:1::/64"),
    )
    assert settings.fetch_allow_ports == (range(8080, 8081), range(9000, 9100))


def test_bad_api_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="BLIPQ_MAX_QUESTION_CHARS"):
        ApiSettings.from_env({"BLIPQ_MAX_QUESTION_CHARS": "lots"})


@pytest.mark.parametrize("command", ["worker", "api", "up"])
def test_blipq_refuses_to_start_on_a_bad_value(command: str) -> None:
    env = {**os.environ, "BLIPQ_JOB_TTL_S": "soon"}
    result = subprocess.run(
        check=False,
        args=[sys.executable, "-m", "blipq.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "BLIPQ_JOB_TTL_S" in result.stderr


def test_the_api_process_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from api.app import create_app\n"
        "from api.settings import ApiSettings\n"
        "import blipq.cli, blipq.up, api.wsgi\n"
        "create_app(ApiSettings())\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        check=False, args=[sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_settings_documented_as_accepting_zero_accept_it() -> None:
    settings = WorkerSettings.from_env({"BLIPQ_REAPER_INTERVAL_S": "0", "BLIPQ_METRICS_PORT": "0"})

    assert (settings.reaper_interval_s, settings.metrics_port) == (0.0, 0)
    with pytest.raises(SettingsError, match="BLIPQ_REAPER_INTERVAL_S"):
        WorkerSettings.from_env({"BLIPQ_REAPER_INTERVAL_S": "-1"})


def test_the_answer_cache_settings_are_read_and_checked() -> None:
    settings = WorkerSettings.from_env({"BLIPQ_ANSWER_CACHE": "off", "BLIPQ_ANSWER_CACHE_MAX": "10"})

    assert (settings.answer_cache, settings.answer_cache_max, WorkerSettings().answer_cache) == (False, 10, True)
    with pytest.raises(SettingsError, match="BLIPQ_ANSWER_CACHE"):
        WorkerSettings.from_env({"BLIPQ_ANSWER_CACHE": "maybe"})


def test_sentinels_are_read_for_both_processes_and_reach_each_library() -> None:
    env = {
        "BLIPQ_REDIS_URL": "redis://:s%3Acret@ignored:6379/2",
        "BLIPQ_REDIS_SENTINELS": "sentinel-1:26379, 10.0.0.7:26380",
        "BLIPQ_REDIS_MASTER": "jobs",
        "BLIPQ_MIN_REPLICAS_ACK": "1",
    }
    api, worker = ApiSettings.from_env(env), WorkerSettings.from_env(env)
    assert api.redis == worker.redis
    assert api.min_replicas_ack == 1
    target = api.redis
    assert target.sentinels == (("sentinel-1", 26379), ("10.0.0.7", 26380)) and target.master == "jobs"
    assert target.broker_url == "sentinel://:s%3Acret@sentinel-1:26379/2;sentinel://:s%3Acret@10.0.0.7:26380/2"
    assert target.broker_options["master_name"] == "jobs"
    assert target.broker_options["sentinel_kwargs"]["password"] == "s:cret"
    assert target.limits_uri == "redis+sentinel://sentinel-1:26379,10.0.0.7:26380/jobs"
    assert target.limits_options == {"db": 2, "password": "s:cret"}
    plain = ApiSettings.from_env({"BLIPQ_REDIS_URL": "redis://cache:6379/0"}).redis
    assert (plain.broker_url, plain.limits_uri, plain.broker_options) == ("redis://cache:6379/0",) * 2 + ({},)
    assert plain.limits_options == {}


def test_an_ipv6_sentinel_address_is_bracketed_in_the_urls_of_kombu_and_limits() -> None:
    target = ApiSettings.from_env({"BLIPQ_REDIS_SENTINELS": "[::1]:26379,sentinel-2:26380"}).redis

    assert target.sentinels == (("::1", 26379), ("sentinel-2", 26380))
    assert target.broker_url == "sentinel://[::1]:26379/0;sentinel://sentinel-2:26380/0"
    assert parse_storage_uri(target.limits_uri).locations == [("::1", 26379), ("sentinel-2", 26380)]


@pytest.mark.parametrize("value", ["sentinel-1", "sentinel-1:port", ":26379", "sentinel-1:70000"])
def test_a_sentinel_address_that_is_not_host_and_port_is_refused_at_start(value: str) -> None:
    for settings in (ApiSettings, WorkerSettings):
        with pytest.raises(SettingsError, match="BLIPQ_REDIS_SENTINELS"):
            settings.from_env({"BLIPQ_REDIS_SENTINELS": value})


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        (WorkerSettings, {"BLIPQ_WORKER_CONCURRENCY": "0"}, "BLIPQ_WORKER_CONCURRENCY='0' must be at least 1"),
        (WorkerSettings, {"BLIPQ_NUM_BEAMS": "two"}, "BLIPQ_NUM_BEAMS='two' is not an integer"),
        (WorkerSettings, {"BLIPQ_FETCH_TIMEOUT_S": "soon"}, "BLIPQ_FETCH_TIMEOUT_S='soon' is not a number"),
        (WorkerSettings, {"BLIPQ_FETCH_TIMEOUT_S": "0"}, "BLIPQ_FETCH_TIMEOUT_S='0' must be greater than 0"),
        (WorkerSettings, {"BLIPQ_METRICS_PORT": "70000"}, "BLIPQ_METRICS_PORT='70000' must be at most 65535"),
        (WorkerSettings, {"BLIPQ_LOG_FORMAT": "xml"}, "BLIPQ_LOG_FORMAT='xml' is not one of json, text"),
        (WorkerSettings, {"BLIPQ_TASK": "ocr"}, "BLIPQ_TASK='ocr' is not one of vqa, caption"),
        (WorkerSettings, {"BLIPQ_DEVICE": "cuda:x"}, "BLIPQ_DEVICE='cuda:x' is not one of auto, cpu, cuda, cuda:N"),
        (
            WorkerSettings,
            {"BLIPQ_FETCH_ALLOW_PORTS": "8080, 9000-"},
            "BLIPQ_FETCH_ALLOW_PORTS='8080, 9000-' has '9000-', which is not a port (8080) or a port range (9000-9099)",
        ),
        (ApiSettings, {"BLIPQ_WAIT_FOR_WORKERS": "yes"}, "BLIPQ_WAIT_FOR_WORKERS='yes' is not one of on, off"),
        (
            ApiSettings,
            {"BLIPQ_TASKS": "vqa,ocr"},
            "BLIPQ_TASKS='vqa,ocr' has 'ocr', which is not a task (vqa, caption)",
        ),
        (
            ApiSettings,
            {"BLIPQ_REDIS_URL": "http://x"},
            "BLIPQ_REDIS_URL='http://x' must start with redis:// or rediss://",
        ),
        (
            ApiSettings,
            {"BLIPQ_QUEUE": "jobs", "BLIPQ_CAPTION_QUEUE": "jobs"},
            "BLIPQ_CAPTION_QUEUE='jobs' must differ from BLIPQ_QUEUE",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_the_value_and_the_rule(
    settings: type[ApiSettings | WorkerSettings], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        settings.from_env(env)

    assert str(error.value) == message
    assert error.value.__cause__ is None and error.value.__suppress_context__, "no pydantic traceback behind it"


def test_every_bad_value_is_named_in_the_same_line() -> None:
    with pytest.raises(SettingsError) as error:
        WorkerSettings.from_env({"BLIPQ_DTYPE": "float8", "BLIPQ_MAX_ATTEMPTS": "0"})

    assert str(error.value) == (
        "BLIPQ_DTYPE='float8' is not one of auto, float32, float16, bfloat16; BLIPQ_MAX_ATTEMPTS='0' must be at least 1"
    )


def test_a_short_webhook_secret_is_refused_without_showing_it() -> None:
    secret = "hunter2-hunter2"  # 15 characters
    for settings in (ApiSettings, WorkerSettings):
        with pytest.raises(SettingsError, match=r"BLIPQ_WEBHOOK_SECRET=.* must be at least 16 characters") as error:
            settings.from_env({"BLIPQ_WEBHOOK_SECRET": secret})
        assert secret not in str(error.value)
    worker = WorkerSettings.from_env({"BLIPQ_WEBHOOK_SECRET": secret + "!"})
    assert worker.webhook_secret == secret + "!" and secret not in repr(worker)
    assert ApiSettings.from_env({"BLIPQ_WEBHOOK_SECRET": secret + "!"}).webhooks_enabled


def test_a_blank_value_is_unset_and_values_are_stripped() -> None:
    settings = WorkerSettings.from_env({"BLIPQ_MAX_NEW_TOKENS": "  ", "BLIPQ_QUEUE": "", "BLIPQ_DTYPE": " float16 "})

    assert (settings.max_new_tokens, settings.queue, settings.dtype) == (20, "blipq", "float16")


def test_only_the_upper_case_names_are_read() -> None:
    assert WorkerSettings.from_env({"blipq_max_new_tokens": "5", "Blipq_Max_New_Tokens": "6"}).max_new_tokens == 20


def test_the_task_picks_the_default_queue_and_model_and_the_batch_size_the_concurrency() -> None:
    settings = WorkerSettings.from_env({"BLIPQ_TASK": "caption", "BLIPQ_BATCH_MAX_SIZE": "4"})

    assert (settings.task, settings.queue, settings.model) == (
        JobTask.CAPTION,
        "blipq-caption",
        str(DEMO_CAPTION_MODEL_DIR),
    )
    assert (settings.concurrency, settings.intake) == (8, 8)
    assert WorkerSettings.from_env({"BLIPQ_TASK": "caption", "BLIPQ_QUEUE": "gpu"}).queue == "gpu"


def test_settings_built_in_code_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPQ_QUEUE", "from-the-environment")
    monkeypatch.setenv("BLIPQ_URL", "http://elsewhere:8000")

    assert (ApiSettings().queue, WorkerSettings().queue) == ("blipq", "blipq")
    assert ApiSettings.from_env().queue == "from-the-environment"
    assert (ClientSettings().url, ClientSettings.from_env().url) == ("http://127.0.0.1:8000", "http://elsewhere:8000")


def test_every_variable_the_code_names_is_a_setting_of_a_model() -> None:
    """A variable read somewhere but missing from the models would be neither checked at start nor documented."""
    named = {
        variable
        for package in ("api", "worker")
        for path in (ROOT / package).rglob("*.py")
        for variable in VARIABLE.findall(path.read_text())
    }
    models = [model for _, _, model, _ in configuration_tables()]
    read = {variable for model in models for variable in model.variables()}
    documented = {model.variable(name) for _, _, model, names in configuration_tables() for name in names}

    assert {ApiSettings, WorkerSettings, ClientSettings, UpSettings} <= set(models)
    assert named - read == set(), "named in the code but read by no settings model"
    assert read <= documented, "read but not on the configuration page"
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description and "\n" not in field.description, f"{model.__name__}.{name}: one line, please"
