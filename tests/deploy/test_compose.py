"""docker-compose.yml, checked without a Docker engine: real entry points, known settings, production choices, a
worker for each task the API serves, and the `ha` profile's Redis with failover."""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from contract.states import JobTask
from tests.support.compose import (
    BLIPQ_COMMANDS,
    FOREIGN_VARIABLES,
    PRODUCTION_MODELS,
    api_settings,
    known_variables,
    worker_settings,
)
from tests.support.environment import ROOT

HA_PROFILE = "ha"
REDIS_PORT = 6379  # redis-server's port when not set
SENTINEL_PORT = 26379  # a sentinel's port when its config sets none
# The worker services, by the task each serves: one of each starts by default.
WORKERS = {"worker": JobTask.VQA, "caption-worker": JobTask.CAPTION}
# What the `ha` variants of api and the workers set differently: where Redis is, and how many replicas hold a job.
SENTINEL_VARIABLES = {"BLIPQ_REDIS_URL", "BLIPQ_REDIS_SENTINELS", "BLIPQ_REDIS_MASTER", "BLIPQ_MIN_REPLICAS_ACK"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def blipq_services(services: dict[str, dict[str, Any]], command: str | None = None) -> dict[str, dict[str, Any]]:
    """The services built from the repository's Dockerfile; with `command`, those that run `blipq COMMAND`."""
    return {
        name: service
        for name, service in services.items()
        if "build" in service and (command is None or service["command"][:2] == ["blipq", command])
    }


def test_every_service_runs_a_real_blipq_command(compose: dict[str, Any]) -> None:
    built = blipq_services(compose["services"])
    assert {"api", *WORKERS} <= built.keys()
    for name, service in built.items():
        command = service["command"]
        assert command[0] == "blipq" and command[1] in BLIPQ_COMMANDS, (name, command)
    entry_points = (ROOT / "pyproject.toml").read_text()
    assert 'blipq = "blipq.cli:main"' in entry_points
    cli = (ROOT / "blipq" / "cli.py").read_text()
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


@pytest.mark.parametrize("name", WORKERS)
def test_workers_reserve_a_gpu_share_the_cache_and_scale(compose: dict[str, Any], name: str) -> None:
    worker = compose["services"][name]
    assert worker["command"][:2] == ["blipq", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    settings = worker_settings(worker["environment"])
    assert settings.task is WORKERS[name], f"{name} serves {settings.task}"
    assert settings.model == PRODUCTION_MODELS[settings.task] and settings.dtype == "float16"
    cache = worker["environment"]["HF_HOME"]
    assert any(volume.endswith(f":{cache}") for volume in worker["volumes"])
    assert "ports" not in worker and "container_name" not in worker, "replicas of a scaled service must not clash"
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace[1]) > settings.shutdown_grace_s, "Docker's SIGKILL must wait for the jobs' grace"


def test_each_task_the_api_serves_has_a_worker_on_its_queue(compose: dict[str, Any]) -> None:
    for profile in (None, HA_PROFILE):
        services = profiled(compose, profile)
        ((api_name, api),) = blipq_services(services, "api").items()
        settings = api_settings(api["environment"])
        assert set(settings.tasks) == set(JobTask), "captions are served beside answers"
        workers = {name: worker_settings(s["environment"]) for name, s in blipq_services(services, "worker").items()}
        for task in settings.tasks:
            # With BLIPQ_WAIT_FOR_WORKERS off, a task with no worker started along with the API gets only 503s.
            serving = [name for name, worker in workers.items() if worker.queue == settings.queue_for(task)]
            assert serving, f"no worker beside {api_name} reads the {task} queue {settings.queue_for(task)!r}"
            for name in serving:
                assert workers[name].task is task and workers[name].model == PRODUCTION_MODELS[task], name
        queues = {settings.queue_for(task) for task in settings.tasks}
        assert {worker.queue for worker in workers.values()} <= queues, "a worker on a queue the API never fills"


def test_images_build_from_the_dockerfile(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in ("api", *WORKERS):
        assert compose["services"][name]["build"]["context"] == "."
    for copied in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (ROOT / copied).exists(), f"the Dockerfile copies {copied}, which is not in the repository"


def test_flower_watches_the_workers_broker_and_sees_their_tasks(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    assert "--port=5555" in command and flower["ports"] == ["127.0.0.1:5555:5555"], "no password: local only"
    for name in WORKERS:
        worker = compose["services"][name]
        assert f"--broker={worker['environment']['BLIPQ_REDIS_URL']}" in command, name
        assert "--task-events" in worker["command"], "without task events Flower lists the workers but not their tasks"


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


def profiled(compose: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """The services that `--profile PROFILE` adds; with None, those that start without a profile."""
    return {
        name: service
        for name, service in compose["services"].items()
        if (profile in service.get("profiles", []) if profile else not service.get("profiles"))
    }


def script(service: dict[str, Any]) -> str:
    """A service's command on one line: the script of `sh -c`, or the arguments."""
    command = service["command"]
    return str(command[2]) if command[:2] == ["sh", "-c"] else " ".join(command)


def redis_server_arguments(service: dict[str, Any]) -> list[str]:
    """What the service's script passes to redis-server (its config file first)."""
    found = re.search(r"redis-server\s+([^;&|]+)", script(service))
    assert found, "the service runs no redis-server"
    # Through the image's entrypoint, which hands the volume to the redis user and runs the server as that user.
    assert "exec docker-entrypoint.sh redis-server" in script(service)
    return shlex.split(found[1])


def named_mounts(compose: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """Mount point -> named volume (host paths left out)."""
    pairs = (volume.split(":")[:2] for volume in service.get("volumes", []))
    return {target: source for source, target in pairs if source in (compose.get("volumes") or {})}


def on_volume(compose: dict[str, Any], service: dict[str, Any], path: str) -> str:
    """The named volume of `service` that holds `path`, which fails if none does."""
    (volume,) = [name for target, name in named_mounts(compose, service).items() if path.startswith(target + "/")]
    return volume


def redis_nodes(compose: dict[str, Any]) -> tuple[str, dict[str, tuple[str, int]]]:
    """The `ha` profile's Redis servers: the one that starts as the primary, and each replica's (host, port) source."""
    nodes = {
        name: service
        for name, service in profiled(compose, HA_PROFILE).items()
        if "redis-server" in script(service) and "--sentinel" not in script(service)
    }
    sources = {name: re.search(r"replicaof\s+(\S+)\s+(\d+)", script(service)) for name, service in nodes.items()}
    primaries = [name for name, source in sources.items() if source is None]
    assert len(primaries) == 1, f"one Redis server must start as the primary, not {primaries}"
    return primaries[0], {name: (source[1], int(source[2])) for name, source in sources.items() if source}


def sentinel_directives(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_default_deployment_needs_no_profile(compose: dict[str, Any]) -> None:
    default, ha = profiled(compose, None), profiled(compose, HA_PROFILE)
    assert {"redis", "api", *WORKERS} <= default.keys()
    for services in (default, ha):
        for name, service in services.items():
            for dependency in service.get("depends_on", {}):
                assert dependency in services, f"{name} needs {dependency}, which is not started along with it"


def test_the_ha_profile_has_a_primary_and_a_replica_that_keep_jobs(compose: dict[str, Any]) -> None:
    primary, replicas = redis_nodes(compose)
    assert primary == "redis-primary" and list(replicas) == ["redis-replica"]
    assert replicas["redis-replica"] == (primary, REDIS_PORT)
    services = compose["services"]
    volumes = []
    for name in (primary, *replicas):
        service = services[name]
        arguments = redis_server_arguments(service)
        line = " ".join(arguments)
        assert "--appendonly yes" in line and "--maxmemory-policy noeviction" in line, name
        assert f"--replica-announce-ip {name}" in line, "sentinels hand out names, which outlive container addresses"
        # The role the sentinels set is kept in the config file on the volume; a flag would undo it at each start.
        assert arguments[0].endswith(".conf") and "--replicaof" not in arguments, name
        volumes.append(on_volume(compose, service, arguments[0]))
        assert service["healthcheck"]["test"]
    assert len(set(volumes)) == len(volumes), "each Redis server keeps its data and role on a volume of its own"


def test_three_sentinels_watch_the_master_that_the_services_ask_for(compose: dict[str, Any]) -> None:
    ha = profiled(compose, HA_PROFILE)
    sentinels = {
        name: service for name, service in ha.items() if re.search(r"redis-server\s.*--sentinel", script(service))
    }
    assert len(sentinels) == 3
    templates, volumes = set(), []
    for name, service in sentinels.items():
        config, *flags = redis_server_arguments(service)
        assert flags == ["--sentinel"], name
        # A sentinel rewrites its config: it runs a copy of the template, on a volume of its own.
        copied = re.search(r"\bcp\s+([^\s;]+)\s+([^\s;]+)", script(service))
        assert copied and copied[2] == config, name
        template = copied[1]
        volumes.append(on_volume(compose, service, config))
        mounted = {item["target"]: compose["configs"][item["source"]]["file"] for item in service["configs"]}
        templates.add(mounted[template])
    assert len(set(volumes)) == len(sentinels)
    (template,) = templates
    directives = sentinel_directives((ROOT / template).read_text())
    port = int(next((d[1] for d in directives if d[0] == "port"), SENTINEL_PORT))
    ((position, monitor),) = [(i, d) for i, d in enumerate(directives) if d[:2] == ["sentinel", "monitor"]]
    master, host, master_port, quorum = monitor[2], monitor[3], int(monitor[4]), int(monitor[5])
    primary, replicas = redis_nodes(compose)
    assert (host, master_port) == (primary, REDIS_PORT)
    assert len(sentinels) // 2 < quorum <= len(sentinels), "a majority of the sentinels decides a failover"
    # Hostnames: resolved from the `monitor` line on (so set before it), and handed to clients as they are.
    assert directives.index(["sentinel", "resolve-hostnames", "yes"]) < position
    assert ["sentinel", "announce-hostnames", "yes"] in directives
    timings = {d[1]: int(d[3]) for d in directives if d[0] == "sentinel" and len(d) == 4 and d[2] == master}
    assert timings["down-after-milliseconds"] > 0 and timings["failover-timeout"] > 0
    assert {"api-ha", *(f"{name}-ha" for name in WORKERS)} <= blipq_services(ha).keys()
    for name, service in blipq_services(ha).items():
        env = service["environment"]
        assert env["BLIPQ_REDIS_MASTER"] == master, name
        assert sorted(env["BLIPQ_REDIS_SENTINELS"].split(",")) == sorted(f"{s}:{port}" for s in sentinels), name
        assert urlsplit(env["BLIPQ_REDIS_URL"]).hostname in ha, "never the `redis` of the default deployment"
    # The API's 202 waits for this many replicas to hold the job: no more than there are.
    assert 1 <= int(ha["api-ha"]["environment"]["BLIPQ_MIN_REPLICAS_ACK"]) <= len(replicas)


def test_the_ha_api_and_workers_are_the_default_ones_on_the_ha_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    scraped = {
        name for job in prometheus["scrape_configs"] for sd in job.get("dns_sd_configs", []) for name in sd["names"]
    }
    defaults = blipq_services(profiled(compose, None))
    assert {"api", *WORKERS} <= defaults.keys()
    for name, default in defaults.items():
        assert f"{name}-ha" in services, f"the ha profile has no variant of {name}"
        ha = services[f"{name}-ha"]
        assert HA_PROFILE in ha["profiles"]
        for key in ("build", "command", "deploy", "secrets", "ports", "expose", "volumes", "stop_grace_period"):
            assert ha.get(key) == default.get(key), (name, key)
        unchanged = {key: value for key, value in default["environment"].items() if key not in SENTINEL_VARIABLES}
        assert unchanged.items() <= ha["environment"].items(), f"{name}-ha must differ from {name} in Redis only"
        assert set(ha["environment"]) - set(default["environment"]) <= SENTINEL_VARIABLES
        database = urlsplit(default["environment"]["BLIPQ_REDIS_URL"]).path
        assert urlsplit(ha["environment"]["BLIPQ_REDIS_URL"]).path == database
        # Prometheus finds the replicas by the default service's name.
        assert name in scraped and name in ha["networks"]["default"]["aliases"]
