"""The topology's `security:` and `fault_injection:` sections: parsed, refused by key, redacted,
carried to the workers; a multi-node topology refuses to start without a cluster secret."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from pdserve.config.engine_config import EngineConfig
from pdserve.config.process_specs import KVTransferSpec, WorkerSpec
from pdserve.config.topology import Topology
from pdserve.config.topology_sections import FaultInjectionConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRET = "0123456789abcdef0123"
TWO_NODES = {
    "device": "cpu",
    "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
    "prefill": [{"node": "a"}],
    "decode": [{"node": "b"}],
}


@pytest.fixture
def model(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    return str(tmp_path)


def topo(model: str, **d: Any) -> Topology:
    return Topology.from_dict({"model": model, **d})


def test_a_multi_node_topology_needs_a_cluster_secret_and_says_where_to_put_it(model: str) -> None:
    t = topo(model, **TWO_NODES)
    with pytest.raises(ValueError, match=r"^security\.cluster_secret: missing.*PDSERVE_CLUSTER"):
        t.cluster_secret(environ={})
    assert t.cluster_secret(environ={"PDSERVE_CLUSTER_SECRET": SECRET}) == SECRET
    in_file = topo(model, **TWO_NODES, security={"cluster_secret": SECRET})
    assert in_file.cluster_secret(environ={"PDSERVE_CLUSTER_SECRET": "x" * 20}) == SECRET


def test_one_machine_needs_no_secret_and_short_ones_are_refused(model: str) -> None:
    assert topo(model).cluster_secret(environ={}) is None
    with pytest.raises(ValueError, match=r"^security\.cluster_secret is invalid.*at least 16"):
        topo(model, security={"cluster_secret": "short"})
    with pytest.raises(ValueError, match=r"PDSERVE_CLUSTER_SECRET is invalid"):
        topo(model, **TWO_NODES).cluster_secret(environ={"PDSERVE_CLUSTER_SECRET": "short"})
    with pytest.raises(ValueError, match=r"security: unknown key\(s\) \['key'\]"):
        topo(model, security={"key": SECRET})


def test_the_secret_is_redacted_from_what_clients_see(model: str) -> None:
    t = topo(model, security={"cluster_secret": SECRET})
    assert SECRET not in json.dumps(t.to_dict())
    assert t.to_dict()["security"]["cluster_secret"] == "<redacted>"
    assert Topology.from_dict(t.to_dict(redact=False)) == t


def test_fault_injection_is_off_by_default_and_parsed_by_key(model: str) -> None:
    assert not topo(model).fault_injection.is_enabled
    t = topo(model, fault_injection={"kv_failure_prob": 0.1, "seed": 4})
    assert t.fault_injection == FaultInjectionConfig(kv_failure_prob=0.1, seed=4)
    assert t.fault_injection.is_enabled
    with pytest.raises(ValueError, match=r"^fault_injection\.kv_delay_s=-1 is invalid"):
        topo(model, fault_injection={"kv_delay_s": -1})
    for_model = Topology.for_model(model, fault_injection={"step_failure_prob": 0.5})
    assert for_model.fault_injection.step_failure_prob == 0.5


def test_worker_spec_carries_fault_injection_through_msgpack() -> None:
    spec = WorkerSpec(
        name="prefill0",
        role="prefill",
        idx=0,
        engine=EngineConfig(model_path="/m", device="cpu"),
        inbox="ipc://p0",
        tokenizer_inboxes=("ipc://t0",),
        kv=KVTransferSpec(backend="tcp", timeout_s=5.0),
        fault_injection=FaultInjectionConfig(kv_failure_prob=0.1, kv_delay_s=0.5, seed=3),
    )
    piped = msgpack.unpackb(msgpack.packb(spec.to_dict(), use_bin_type=True), raw=False)
    assert WorkerSpec.from_dict(piped) == spec
    older = {k: v for k, v in piped.items() if k != "fault_injection"}
    assert WorkerSpec.from_dict(older) == dataclasses.replace(
        spec, fault_injection=FaultInjectionConfig()
    )
    with pytest.raises(ValueError, match=r"fault_injection: unknown key\(s\) \['prob'\]"):
        WorkerSpec.from_dict({**piped, "fault_injection": {"prob": 1}})


def test_the_kubernetes_manifest_takes_its_api_key_from_a_secret() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "pdserve.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    topology = yaml.safe_load(by_kind["ConfigMap"]["data"]["topology.yaml"])
    assert topology["router"]["host"] == "0.0.0.0" and "api_key" not in topology["router"]
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    ref = env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pdserve-api-key", "key": "api-key"}  # not optional: no key, no pod
    assert not any("api-key" in part and part != "--api-key-file" for part in container["command"])


def test_the_two_node_example_says_how_to_give_the_cluster_secret() -> None:
    text = (DEPLOY / "topologies" / "2p2d-two-nodes.yaml").read_text()
    assert "PDSERVE_CLUSTER_SECRET" in text and "PDSERVE_API_KEY" in text
