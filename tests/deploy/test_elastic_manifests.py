"""deploy/k8s/elastic without a cluster: the router started alone (router.membership) and worker
Deployments whose pods join it (`pdserve worker --router`). Every object is rendered and validated
against the Kubernetes OpenAPI schemas (strict); the pieces are checked against each other and
against pdserve: the workers dial the router's join port through a Service published before the
router is ready, their command lines parse, their grace period outlasts the drain, and the
decode autoscaler scales the decode Deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kustomize_lite import Obj, render

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import plan_endpoints

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _objects() -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "elastic")}


def _container(obj: Obj) -> Obj:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def _topology(objects: dict[tuple[str, str], Obj], tmp_path: Path) -> Topology:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64})
    )
    data = yaml.safe_load(objects["ConfigMap", "pdserve-topology"]["data"]["topology.yaml"])
    data["model"] = str(tmp_path)
    data["security"] = {"cluster_secret": "a-secret-from-the-pdserve-secrets-secret"}
    return Topology.from_dict(data)


def _worker_args(obj: Obj) -> Any:
    from pdserve.entrypoints.cli import build_parser

    subst = {"$(POD_NAME)": "pdserve-decode-abc12", "$(POD_IP)": "10.1.2.3"}
    args = [subst.get(a, a) for a in _container(obj)["args"]]
    return build_parser().parse_args(args)  # argparse exits on a flag pdserve lacks


def test_every_elastic_object_is_valid_for_kubernetes() -> None:
    objects = list(_objects().values())
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "ConfigMap"}
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_router_starts_alone_and_workers_join_at_its_inbox(tmp_path: Path) -> None:
    objects = _objects()
    topology = _topology(objects, tmp_path)
    assert topology.router.membership and topology.workers() == []
    router_inbox = plan_endpoints(topology.resolved(), [])["router"]
    port = int(router_inbox.bind.rpartition(":")[2])
    service = objects["Service", "pdserve-router"]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert service["ports"][0]["port"] == port
    router_labels = objects["Deployment", "pdserve-router"]["spec"]["template"]["metadata"]
    assert service["selector"].items() <= router_labels["labels"].items()
    router_args = _container(objects["Deployment", "pdserve-router"])["args"]
    assert "--node" not in router_args and router_args[0] == "launch"
    for role in ("prefill", "decode"):
        deployment = objects["Deployment", f"pdserve-{role}"]
        args = _worker_args(deployment)
        assert (args.command, args.role) == ("worker", role)
        assert args.router == f"tcp://pdserve-router:{port}"
        assert args.host == "10.1.2.3" and args.kv_transfer == "tcp"
        env = {e["name"]: e for e in _container(deployment)["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        secret = env["PDSERVE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "pdserve-secrets", "key": "cluster-secret"}
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert topology.router.drain_timeout_s < args.drain_timeout_s < grace


def test_the_decode_autoscaler_scales_the_joining_decode_deployment() -> None:
    (hpa,) = render(K8S / "autoscaling")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "pdserve-decode")
    decode = _objects()["Deployment", "pdserve-decode"]
    assert decode["metadata"]["labels"]["app.kubernetes.io/component"] == "decode"
    assert hpa["spec"]["minReplicas"] <= decode["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_pods_load_the_model_the_router_serves(role: str, tmp_path: Path) -> None:
    objects = _objects()
    data = yaml.safe_load(objects["ConfigMap", "pdserve-topology"]["data"]["topology.yaml"])
    assert _worker_args(objects["Deployment", f"pdserve-{role}"]).model == data["model"]
