"""deploy/k8s and deploy/prometheus.yml, checked without a cluster: named objects that select their own pods, probes
on routes the API has, known settings, a GPU per worker, KEDA scaling the worker on the jobs in hand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.app import create_app
from api.settings import ApiSettings
from tests.conftest import ROOT
from tests.test_compose import BLIPQ_COMMANDS, FOREIGN_VARIABLES, known_variables

K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
WORKLOADS = ("Deployment", "StatefulSet")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are meant for
DEFAULT_METRICS_PORT = 9808  # a worker's BLIPQ_METRICS_PORT when unset


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
    webhook_keys = [
        item["valueFrom"]["secretKeyRef"]
        for name in ("blipq-api", "blipq-worker")
        for item in containers(named("Deployment", name))[0]["env"]
        if item["name"] == "BLIPQ_WEBHOOK_SECRET"
    ]
    assert len(webhook_keys) == 2 and webhook_keys[0] == webhook_keys[1], "the API and workers share the signing key"
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


def test_the_worker_has_a_gpu_the_real_model_and_time_to_finish_its_job() -> None:
    worker = named("Deployment", "blipq-worker")
    (container,) = containers(worker)
    env = environment(container)
    assert container["command"][:2] == ["blipq", "worker"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert env["BLIPQ_MODEL"] == "Salesforce/blip-vqa-base" and env["BLIPQ_DTYPE"] == "float16"
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(env["BLIPQ_SHUTDOWN_GRACE_S"])
    assert any(mount["mountPath"] == env["HF_HOME"] for mount in container["volumeMounts"]), "the model cache"
    api_env = environment(containers(named("Deployment", "blipq-api"))[0])
    assert api_env["BLIPQ_JOB_TIME_LIMIT_S"] == env["BLIPQ_JOB_TIME_LIMIT_S"], "the visibility timeout must agree"


def test_the_worker_metrics_port_is_declared_and_announced_to_prometheus() -> None:
    worker = named("Deployment", "blipq-worker")
    (container,) = containers(worker)
    port = int(environment(container).get("BLIPQ_METRICS_PORT", DEFAULT_METRICS_PORT))
    assert port in container_ports(worker)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    api = named("Deployment", "blipq-api")
    api_annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert int(api_annotations["prometheus.io/port"]) in container_ports(api)


def test_keda_scales_the_worker_on_jobs_queued_and_running() -> None:
    (scaled,) = objects("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and named("Deployment", target["name"])
    assert target["name"] == "blipq-worker"
    assert 0 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["cooldownPeriod"] > 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    queue = environment(containers(named("Deployment", "blipq-worker"))[0]).get("BLIPQ_QUEUE", "blipq")
    for metric in ("blipq_jobs_queued", "blipq_jobs_running"):
        assert f'{metric}{{queue="{queue}"}}' in query, f"the query counts {metric} of the worker's queue"
    assert int(trigger["metadata"]["threshold"]) >= 1


def test_manifests_match_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kubernetes-validate is not installed (a dev dependency)")
        pytest.skip("kubernetes-validate is not installed: pip install -e '.[dev]'")
    errors = []
    for path, doc in MANIFESTS:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: no schema ships for it
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: no unknown field either
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
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
    worker_port = int(compose["worker"]["environment"].get("BLIPQ_METRICS_PORT", DEFAULT_METRICS_PORT))
    assert ("api", api_port) in targets(jobs["blipq-api"])
    # By DNS, not a fixed list: the service name resolves to every replica of `--scale worker=N`.
    assert jobs["blipq-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert ("worker", worker_port) in targets(jobs["blipq-worker"])
    assert str(worker_port) in [str(port) for port in compose["worker"].get("expose", [])]
    assert all(path.get("metrics_path", "/metrics") == "/metrics" for path in jobs.values())
    assert ("flower", 5555) in targets(jobs["flower"])
