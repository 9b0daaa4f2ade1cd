"""deploy/k8s without a cluster: every kustomization is rendered (kustomize_lite.py) and each object
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are
errors) of the oldest and newest Kubernetes versions we target; the ServiceMonitor, a CRD the core
schemas lack, against SERVICE_MONITOR_SCHEMA below. Then the pieces are checked against each other
and against pdserve itself: the topology in each overlay names exactly the pods the StatefulSets
make, at their DNS names; secrets, ports, metrics and the dashboard are the ones pdserve uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kustomize_lite import Obj, merge, pod_containers, render

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import plan_endpoints
from pdserve.entrypoints.launch_cli import _read_api_key_file

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
KUSTOMIZATIONS = (*OVERLAYS, "elastic", "monitoring", "autoscaling")
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SECRET = "pdserve-secrets"

# monitoring.coreos.com/v1 ServiceMonitor: the fields deploy/k8s uses, written from the Prometheus
# operator's API reference (prometheus-operator.dev/docs/api-reference/api). Fields outside this
# subset are refused, so a typo cannot pass; the real CRD accepts more.
_SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
    "additionalProperties": False,
}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "authorization": {
                                "type": "object",
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": _SECRET_KEY,
                                },
                                "additionalProperties": False,
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


def rendered(name: str) -> list[Obj]:
    return render(K8S / name)


def by_kind_name(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def secret_example() -> Obj:
    return yaml.safe_load((K8S / "secret.example.yaml").read_text())


def container(obj: Obj) -> Obj:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture
def model(tmp_path: Path) -> str:
    """A model directory with just what the topology reads (the real model is not here)."""
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64})
    )
    return str(tmp_path)


def overlay_topology(objects: list[Obj], model: str) -> Topology:
    config_map = by_kind_name(objects)["ConfigMap", "pdserve-topology"]
    data = yaml.safe_load(config_map["data"]["topology.yaml"])
    data["model"] = model
    return Topology.from_dict(data)


# ---------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_for_kubernetes(name: str) -> None:
    objects = rendered(name)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_secret_example_and_the_one_pod_manifest_are_valid_for_kubernetes() -> None:
    one_pod = yaml.safe_load_all((DEPLOY / "kubernetes" / "pdserve.yaml").read_text())
    for obj in [secret_example(), *one_pod]:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_catches_a_misspelled_field() -> None:
    stateful_set = by_kind_name(rendered("overlays/cpu"))["StatefulSet", "pdserve-decode"]
    container(stateful_set)["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(stateful_set, K8S_VERSIONS[-1], strict=True)
    monitor = by_kind_name(rendered("monitoring"))["ServiceMonitor", "pdserve"]
    monitor["spec"]["endpoints"][0]["bearerTokenFle"] = "/x"
    with pytest.raises(jsonschema.ValidationError, match="bearerTokenFle"):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    theirs = by_kind_name([o for o in yaml.safe_load_all(out) if o])
    assert by_kind_name(rendered(name)) == theirs


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        render(tmp_path)
    with pytest.raises(ValueError, match="ports"):
        merge({"ports": [{"containerPort": 1}]}, {"ports": [{"containerPort": 2}]}, "spec")


# ---------------------------------------------------------------------------------- topology


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_topology_names_every_pod_at_its_dns_name(name: str, model: str) -> None:
    objects = by_kind_name(rendered(name))
    topology = overlay_topology(list(objects.values()), model)
    expected = {"pdserve-router": "pdserve-router"}
    for role in ("prefill", "decode"):
        sts = objects["StatefulSet", f"pdserve-{role}"]
        service = sts["spec"]["serviceName"]
        headless = objects["Service", service]["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"]
        pods = [f"pdserve-{role}-{i}" for i in range(sts["spec"]["replicas"])]
        expected |= {pod: f"{pod}.{service}" for pod in pods}
        # one worker per pod, of the StatefulSet's role
        assert sorted(w.node for w in topology.workers() if w.role == role) == pods
    assert {n.name: n.address for n in topology.nodes} == expected
    peers = objects["Service", "pdserve-router"]["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"]
    assert (
        peers["selector"]
        == objects["Deployment", "pdserve-router"]["spec"]["selector"]["matchLabels"]
    )
    assert topology.router.node == "pdserve-router" and topology.router.host == "0.0.0.0"
    assert topology.bind_host == "0.0.0.0"  # a DNS name is no interface to bind
    assert topology.security.cluster_secret is None  # from the Secret, never the ConfigMap
    assert topology.router.api_key is None


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_starts_its_own_node_of_the_topology(name: str) -> None:
    objects = by_kind_name(rendered(name))
    router = container(objects["Deployment", "pdserve-router"])
    assert router["args"][:5] == [
        "launch",
        "--topology",
        "/etc/pdserve/topology.yaml",
        "--node",
        "pdserve-router",
    ]
    for role in ("prefill", "decode"):
        c = container(objects["StatefulSet", f"pdserve-{role}"])
        assert c["args"] == [
            "launch",
            "--topology",
            "/etc/pdserve/topology.yaml",
            "--node",
            "$(POD_NAME)",
        ]
        env = {e["name"]: e["valueFrom"] for e in c["env"]}
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for obj in objects.values():
        for c in pod_containers(obj):
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/etc/pdserve/topology.yaml"]["subPath"] == "topology.yaml"
            env = {e["name"]: e.get("valueFrom") for e in c["env"]}
            assert env["PDSERVE_CLUSTER_SECRET"] == {
                "secretKeyRef": {"name": SECRET, "key": "cluster-secret"}
            }


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_internal_address_resolves_to_a_headless_service(name: str, model: str) -> None:
    objects = by_kind_name(rendered(name))
    topology = overlay_topology(list(objects.values()), model)
    headless = {
        n
        for (kind, n), o in objects.items()
        if kind == "Service" and o["spec"].get("clusterIP") == "None"
    }
    for pod_gpus in (0, 1):  # the router pod sees no GPU, a worker pod one: same plan on both
        resolved = topology.resolved(num_gpus=pod_gpus)
        plan = plan_endpoints(resolved, resolved.workers())
        for endpoint in plan.values():
            host, port = re.fullmatch(r"tcp://([^:]+):(\d+)", endpoint.connect).groups()
            assert host.rpartition(".")[2] in headless, host
            assert endpoint.bind == f"tcp://0.0.0.0:{port}"
    backends = {topology.resolved(num_gpus=n).kv_transfer.backend for n in (0, 1)}
    assert len(backends) == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_router_serves_http_where_the_service_and_probes_point(name: str, model: str) -> None:
    objects = by_kind_name(rendered(name))
    topology = overlay_topology(list(objects.values()), model)
    deployment = objects["Deployment", "pdserve-router"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two routers at once
    router = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports["http"] == topology.router.port
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert router["livenessProbe"]["tcpSocket"] == {"port": "http"}
    api = objects["Service", "pdserve"]["spec"]
    assert api["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert api["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]


def test_the_gpu_overlay_gives_each_worker_pod_the_gpus_it_names(model: str) -> None:
    objects = by_kind_name(rendered("overlays/gpu"))
    topology = overlay_topology(list(objects.values()), model)
    for role in ("prefill", "decode"):
        limits = container(objects["StatefulSet", f"pdserve-{role}"])["resources"]["limits"]
        gpus = {len(w.gpus or ()) for w in topology.workers() if w.role == role}
        assert gpus == {limits["nvidia.com/gpu"]}
    router = container(objects["Deployment", "pdserve-router"])
    assert "nvidia.com/gpu" not in router["resources"]["limits"]
    shipped = yaml.safe_load(objects["ConfigMap", "pdserve-topology"]["data"]["topology.yaml"])
    for obj in objects.values():
        for c in pod_containers(obj):
            assert c["image"] == "pdserve:latest"
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert Path(shipped["model"]).parent.as_posix() in mounts  # the model, on every pod


def test_the_cpu_overlay_serves_the_model_built_into_its_image(model: str) -> None:
    objects = by_kind_name(rendered("overlays/cpu"))
    config_map = objects["ConfigMap", "pdserve-topology"]
    data = yaml.safe_load(config_map["data"]["topology.yaml"])
    dockerfile = (DEPLOY.parent / "Dockerfile.cpu").read_text()
    assert f"pdserve tiny-model {data['model']}\n" in dockerfile
    assert data["device"] == "cpu" and data["kv_transfer"]["backend"] == "tcp"
    for obj in objects.values():
        for c in pod_containers(obj):
            assert c["image"] == "pdserve:cpu"


# ---------------------------------------------------------------------------------- secrets


def test_the_pods_read_the_secret_keys_the_example_defines() -> None:
    keys = set(secret_example()["stringData"])
    assert keys == {"api-key", "cluster-secret"}
    for name in OVERLAYS:
        for obj in rendered(name):
            volumes = obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
            for v in volumes:
                if "secret" in v:
                    assert v["secret"]["secretName"] == SECRET
                    assert {i["key"] for i in v["secret"]["items"]} <= keys
    monitor = by_kind_name(rendered("monitoring"))["ServiceMonitor", "pdserve"]
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "name": SECRET,
        "key": "api-key",
    }


def test_an_unfilled_secret_example_is_refused_at_start(tmp_path: Path, model: str) -> None:
    values = secret_example()["stringData"]
    key_file = tmp_path / "api-key"
    key_file.write_text(values["api-key"])
    with pytest.raises(ValueError, match="empty"):
        _read_api_key_file(key_file)
    topology = overlay_topology(rendered("overlays/cpu"), model)
    with pytest.raises(ValueError, match="cluster_secret"):
        topology.cluster_secret({"PDSERVE_CLUSTER_SECRET": values["cluster-secret"]})


def test_the_router_reads_the_api_key_from_the_mounted_secret() -> None:
    objects = by_kind_name(rendered("overlays/cpu"))
    router = container(objects["Deployment", "pdserve-router"])
    key_file = router["args"][router["args"].index("--api-key-file") + 1]
    mounts = {m["name"]: m["mountPath"] for m in router["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in objects["Deployment", "pdserve-router"]["spec"]["template"]["spec"]["volumes"]
    }
    (item,) = volumes["secrets"]["secret"]["items"]
    assert key_file == f"{mounts['secrets']}/{item['path']}" and item["key"] == "api-key"
    assert all(e["name"] != "PDSERVE_API_KEY" for e in router["env"])  # one source for the key


# ---------------------------------------------------------------------------------- monitoring


def _exported_metrics() -> set[str]:
    from pdserve.router.metrics import RouterMetrics

    text = RouterMetrics("m", lambda: []).render().decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))


def test_the_service_monitor_scrapes_the_router_api_service() -> None:
    monitor = by_kind_name(rendered("monitoring"))["ServiceMonitor", "pdserve"]
    services = [o for o in rendered("overlays/cpu") if o["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    chosen = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in chosen] == ["pdserve"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in chosen[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_dashboard_config_map_is_the_dashboard_file() -> None:
    config_map = by_kind_name(rendered("monitoring"))["ConfigMap", "pdserve-grafana-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    assert json.loads(config_map["data"]["pdserve-dashboard.json"]) == shipped


def test_the_decode_autoscaler_reads_the_queue_metric_the_router_exports() -> None:
    (hpa,) = rendered("autoscaling")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",  # deploy/k8s/elastic's decode workers, which join on their own
        "name": "pdserve-decode",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["target"]["type"] == "AverageValue"  # per decode pod
    values = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series in _exported_metrics()
    assert 'role="decode"' in rule["seriesQuery"] and 'role="decode"' in rule["metricsQuery"]
    decode = by_kind_name(rendered("elastic"))["Deployment", "pdserve-decode"]
    assert hpa["spec"]["minReplicas"] <= decode["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_command_line_is_one_pdserve_accepts(name: str, model: str) -> None:
    from pdserve.entrypoints.cli import build_parser

    parser = build_parser()
    topology = overlay_topology(rendered(name), model)
    for obj in rendered(name):
        for c in pod_containers(obj):
            args = [a.replace("$(POD_NAME)", "pdserve-decode-0") for a in c["args"]]
            parsed = parser.parse_args(args)  # argparse exits on a flag pdserve lacks
            assert parsed.topology == Path("/etc/pdserve/topology.yaml")
            assert parsed.node in {n.name for n in topology.nodes}
