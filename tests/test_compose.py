"""docker-compose.yml, checked without a Docker engine: real entry points, known settings, production choices."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

SETTINGS_SOURCES = [ROOT / "worker" / "settings.py", ROOT / "api" / "settings.py"]
FOREIGN_VARIABLES = {"HF_HOME", "CUDA_VISIBLE_DEVICES"}  # read by transformers and CUDA, not by blipq
BLIPQ_COMMANDS = {"api", "worker"}  # `blipq up` is for one machine, not for production


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def known_variables() -> set[str]:
    names: set[str] = set()
    for source in SETTINGS_SOURCES:
        names |= set(re.findall(r'"(BLIPQ_[A-Z0-9_]+)"', source.read_text()))
    return names


def test_every_service_runs_a_real_blipq_command(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        command = compose["services"][name]["command"]
        assert command[0] == "blipq" and command[1] in BLIPQ_COMMANDS, (name, command)
    entry_points = (ROOT / "pyproject.toml").read_text()
    assert 'blipq = "api.cli:main"' in entry_points
    cli = (ROOT / "api" / "cli.py").read_text()
    assert all(f'add_parser("{command}"' in cli for command in BLIPQ_COMMANDS)


def test_every_variable_set_is_one_the_settings_know(compose: dict[str, Any]) -> None:
    known = known_variables()
    assert {"BLIPQ_REDIS_URL", "BLIPQ_MODEL", "BLIPQ_DTYPE"} <= known
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            assert variable in known | FOREIGN_VARIABLES, f"{name} sets {variable}, which nothing reads"


def test_redis_keeps_jobs(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_workers_reserve_a_gpu_share_the_cache_and_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert worker["environment"]["BLIPQ_MODEL"] == "Salesforce/blip-vqa-base"
    cache = worker["environment"]["HF_HOME"]
    assert any(volume.endswith(f":{cache}") for volume in worker["volumes"])
    assert "ports" not in worker and "container_name" not in worker, "replicas of a scaled service must not clash"


def test_images_build_from_the_dockerfile(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in ("api", "worker"):
        assert compose["services"][name]["build"]["context"] == "."
    for copied in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (ROOT / copied).exists(), f"the Dockerfile copies {copied}, which is not in the repository"


def test_flower_watches_the_workers_broker_and_sees_their_tasks(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    assert f"--broker={compose['services']['worker']['environment']['BLIPQ_REDIS_URL']}" in command
    assert "--port=5555" in command and flower["ports"] == ["127.0.0.1:5555:5555"], "no password: local only"
    worker_command = compose["services"]["worker"]["command"]
    assert "--task-events" in worker_command, "without task events Flower lists the workers but not their tasks"


def test_prometheus_reads_the_scrape_config_of_the_repository(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    config = next(arg.partition("=")[2] for arg in prometheus["command"] if arg.startswith("--config.file="))
    source = next(host for host, container in mounts.items() if container == config)
    assert (ROOT / source).is_file(), f"Prometheus mounts {source}, which is not in the repository"
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"], "no password: local only"


def test_the_api_requires_keys_and_limits_rates(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    keys_file = api["environment"]["BLIPQ_API_KEYS_FILE"]
    (secret,) = api["secrets"]
    assert keys_file == f"/run/secrets/{secret}"
    assert (ROOT / compose["secrets"][secret]["file"]).with_suffix(".example").exists(), "say how to make the file"
    assert api["environment"]["BLIPQ_RATE_LIMIT"]
