"""The topology file: parsing, defaults, every refusal naming its key, resolving `auto`, and the
deploy/ examples (topologies, Kubernetes, Prometheus, Grafana) staying loadable and in step."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.request_limits import RequestLimits
from pdserve.config.topology import Topology, WorkerConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLES = sorted((DEPLOY / "topologies").glob("*.yaml"))


@pytest.fixture
def model(tmp_path: Path) -> str:
    """A fake model directory: only the config.json fields the topology reads, and a few more."""
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "num_hidden_layers": 2,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    return str(model_dir)


def topo(model: str, **d: Any) -> Topology:
    return Topology.from_dict({"model": model, **d})


# ---------------------------------------------------------------------------------- defaults


def test_defaults_are_one_prefill_and_one_decode_with_auto_values(model: str) -> None:
    t = topo(model)
    assert t.prefill == (WorkerConfig(gpus=None, tp=1, node=None),)
    assert t.decode == (WorkerConfig(),)
    assert t.mixed == () and t.nodes == ()
    assert (t.device, t.dtype, t.attention_backend, t.cuda_graph) == ("auto", "auto", "auto", True)
    assert (t.router.host, t.router.port, t.router.api_key) == ("127.0.0.1", 8000, None)
    assert t.router.routing_policy == "round_robin"
    assert t.tokenizer.replicas == 1
    assert (t.kv_transfer.backend, t.kv_transfer.timeout_s) == ("auto", 30.0)
    assert t.scheduler == SchedulerConfig()
    assert t.bind_host == "127.0.0.1"
    assert t.served_model_name is None and t.model_name == "tiny-model"


def test_empty_worker_lists_mean_the_default_pair(model: str) -> None:
    t = topo(model, prefill=[], decode=None, mixed=[])
    assert len(t.prefill) == 1 and len(t.decode) == 1 and t.mixed == ()


def test_topology_is_frozen(model: str) -> None:
    t = topo(model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.device = "cpu"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.router.port = 1  # type: ignore[misc]


def test_scheduler_section_builds_scheduler_config(model: str) -> None:
    t = topo(model, scheduler={"page_size": 8, "chunk_size": 128, "num_pages": 64})
    assert t.scheduler == SchedulerConfig(page_size=8, chunk_size=128, num_pages=64)


# ---------------------------------------------------------------------------------- refusals

BAD: list[tuple[dict[str, Any], str]] = [
    ({"modle": "x"}, "topology: unknown key(s) ['modle']: expected some of"),
    ({"router": {"hots": "h"}}, "router: unknown key(s) ['hots']"),
    ({"prefill": [{}, {"gpu": [0]}], "decode": [{}]}, "prefill[1]: unknown key(s) ['gpu']"),
    ({"scheduler": {"pagesize": 8}}, "scheduler: unknown key(s) ['pagesize']"),
    ({"kv_transfer": {"backend": "tcp", "retries": 3}}, "kv_transfer: unknown key(s)"),
    ({"tokenizer": {"replica": 2}}, "tokenizer: unknown key(s) ['replica']"),
    ({"nodes": [{"name": "a", "addr": "x"}]}, "nodes[0]: unknown key(s) ['addr']"),
    ({"prefill": [{}]}, "decode: missing"),
    ({"decode": [{}]}, "prefill: missing"),
    ({"mixed": [{}], "prefill": [{}], "decode": [{}]}, "mixed: given together with prefill"),
    ({"prefill": {"gpus": [0]}, "decode": [{}]}, "prefill: expected a list"),
    ({"router": [1]}, "router: expected a mapping"),
    ({"device": "cpu", "prefill": [{"gpus": [0]}], "decode": [{}]}, "prefill[0].gpus=[0]"),
    ({"device": "cuda", "prefill": [{"gpus": []}], "decode": [{}]}, "prefill[0].gpus=[]"),
    ({"prefill": [{"gpus": [0, 0], "tp": 2}], "decode": [{}]}, "prefill[0].gpus: GPU 0 is listed"),
    ({"prefill": [{"gpus": "0"}], "decode": [{}]}, "prefill[0].gpus='0' is invalid"),
    ({"prefill": [{"gpus": [-1]}], "decode": [{}]}, "prefill[0].gpus=[-1] is invalid"),
    (
        {"prefill": [{"gpus": [0]}], "decode": [{"gpus": [1]}, {"gpus": [1]}]},
        "decode[1].gpus: GPU 1 is listed twice (also in decode[0])",
    ),
    (
        {"prefill": [{"gpus": [0]}, {"gpus": [0]}], "decode": [{"gpus": [0]}]},
        "prefill[1].gpus: GPU 0 is listed twice (also in prefill[0])",
    ),
    ({"mixed": [{"gpus": [2]}, {"gpus": [2]}]}, "mixed[1].gpus: GPU 2 is listed twice"),
    (
        {
            "prefill": [{"gpus": [0]}],
            "decode": [{"gpus": [0]}],
            "kv_transfer": {"backend": "nccl"},
        },
        "kv_transfer.backend='nccl' is invalid: prefill[0] and decode[0] share GPU 0",
    ),
    ({"prefill": [{"tp": 0}], "decode": [{}]}, "prefill[0].tp=0 is invalid"),
    ({"prefill": [{}], "decode": [{"gpus": [0, 1]}]}, "decode[0].tp=1 is invalid"),
    ({"mixed": [{"tp": 8}]}, "mixed[0].tp=8 is invalid: expected a divisor"),
    ({"prefill": [{"tp": 3}], "decode": [{}]}, "prefill[0].tp=3 is invalid: expected a divisor"),
    ({"router": {"port": 65536}}, "router.port=65536 is invalid"),
    ({"router": {"port": -1}}, "router.port=-1 is invalid"),
    ({"router": {"port": "8000"}}, "router.port='8000' is invalid"),
    ({"router": {"host": ""}}, "router.host='' is invalid"),
    ({"router": {"routing_policy": "random"}}, "router.routing_policy='random' is invalid"),
    ({"tokenizer": {"replicas": 0}}, "tokenizer.replicas=0 is invalid"),
    ({"kv_transfer": {"backend": "rdma"}}, "kv_transfer.backend='rdma' is invalid"),
    ({"kv_transfer": {"timeout_s": 0}}, "kv_transfer.timeout_s=0 is invalid"),
    ({"device": "cpu", "kv_transfer": {"backend": "nccl"}}, "kv_transfer.backend='nccl'"),
    ({"device": "cpu", "kv_transfer": {"backend": "cuda_ipc"}}, "kv_transfer.backend='cuda_ipc'"),
    ({"device": "gpu"}, "device='gpu' is invalid"),
    ({"dtype": "fp8"}, "dtype='fp8' is invalid"),
    ({"attention_backend": "sdpa"}, "attention_backend='sdpa' is invalid"),
    ({"device": "cpu", "attention_backend": "triton"}, "attention_backend='triton' is invalid"),
    ({"cuda_graph": "yes"}, "cuda_graph='yes' is invalid"),
    ({"served_model_name": ""}, "served_model_name='' is invalid"),
    ({"bind_host": ""}, "bind_host='' is invalid"),
    ({"scheduler": {"page_size": 0}}, "scheduler.page_size=0 is invalid"),
    ({"scheduler": {"mem_fraction": 1.5}}, "scheduler.mem_fraction=1.5 is invalid"),
    ({"prefill": [{"node": "a"}], "decode": [{}]}, "prefill[0].node='a' is invalid"),
    ({"router": {"node": "a"}}, "router.node='a' is invalid"),
    ({"nodes": [{"name": "a"}]}, "nodes[0].address: missing"),
    (
        {"nodes": [{"name": "a", "address": "h1"}, {"name": "a", "address": "h2"}]},
        "nodes[1].name='a' is invalid: the name is used twice",
    ),
    (
        {"nodes": [{"name": "a", "address": "h"}], "prefill": [{"node": "a"}], "decode": [{}]},
        "decode[0].node: missing",
    ),
    (
        {
            "nodes": [{"name": "a", "address": "h1"}, {"name": "b", "address": "h2"}],
            "prefill": [{"node": "a"}],
            "decode": [{"node": "b"}],
            "kv_transfer": {"backend": "cuda_ipc"},
        },
        "kv_transfer.backend='cuda_ipc' is invalid: prefill and decode workers are on different",
    ),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[m[:40] for _, m in BAD])
def test_invalid_topology_is_refused_naming_the_key(
    model: str, bad: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        topo(model, **bad)
    assert message in str(info.value)


def test_missing_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^model: missing"):
        Topology.from_dict({"prefill": [{}], "decode": [{}]})
    with pytest.raises(ValueError, match=r"^model='.*nowhere' is invalid.*config\.json"):
        Topology.from_dict({"model": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^model='.*empty' is invalid"):
        Topology(model=str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^model: cannot read"):
        Topology(model=str(tmp_path / "broken"))


def test_direct_construction_is_validated_too(model: str) -> None:
    with pytest.raises(
        ValueError, match=r"decode\[1\]\.gpus: GPU 3 is listed twice \(also in decode\[0\]\)"
    ):
        Topology(
            model=model,
            prefill=(WorkerConfig(gpus=(0,)),),
            decode=(WorkerConfig(gpus=(3,)), WorkerConfig(gpus=(3,))),
            mixed=(),
        )
    with pytest.raises(ValueError, match=r"^gpus: GPU 1 is listed twice"):
        WorkerConfig(gpus=(1, 1), tp=2)


def test_one_gpu_may_hold_one_prefill_and_one_decode_worker(model: str) -> None:
    for backend in ("auto", "cuda_ipc"):
        t = topo(
            model,
            prefill=[{"gpus": [0]}],
            decode=[{"gpus": [0]}],
            kv_transfer={"backend": backend},
        )
        assert t.prefill[0].gpus == t.decode[0].gpus == (0,)
        assert t.resolved(num_gpus=1).kv_transfer.backend == "cuda_ipc"


def test_tensor_parallel_prefill_and_decode_may_use_cuda_ipc(model: str) -> None:
    t = topo(
        model,
        prefill=[{"gpus": [0, 1], "tp": 2}],
        decode=[{"gpus": [0]}],
        kv_transfer={"backend": "cuda_ipc"},
    )
    assert t.resolved(num_gpus=2).kv_transfer.backend == "cuda_ipc"


def test_same_gpu_index_on_different_nodes_is_not_a_conflict(model: str) -> None:
    t = topo(
        model,
        nodes=[{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        prefill=[{"gpus": [0], "node": "a"}],
        decode=[{"gpus": [0], "node": "a"}, {"gpus": [0], "node": "b"}],
    )
    assert [w.node for w in t.workers()] == ["a", "a", "b"]


# ---------------------------------------------------------------------------------- resolved()


def test_resolved_on_cpu_gives_tcp_and_no_gpus(model: str) -> None:
    t = topo(model)
    r = t.resolved(num_gpus=0)
    assert r.device == "cpu"
    assert [w.gpus for w in r.workers()] == [(), ()]
    assert r.kv_transfer.backend == "tcp"
    assert r.served_model_name == "tiny-model"
    assert t.device == "auto" and t.prefill[0].gpus is None  # the original is untouched
    assert r.resolved(num_gpus=0) == r


def test_resolved_with_device_cpu_never_asks_torch(model: str, monkeypatch: Any) -> None:
    import pdserve.config.topology as topology_module

    def fail() -> int:
        raise AssertionError("probed the GPUs for device: cpu")

    monkeypatch.setattr(topology_module, "_visible_gpu_count", fail)
    r = topo(model, device="cpu").resolved()
    assert (r.device, r.kv_transfer.backend) == ("cpu", "tcp")


def test_resolved_assigns_gpus_from_what_the_machine_has(model: str) -> None:
    two = topo(model).resolved(num_gpus=2)
    assert two.device == "cuda"
    assert [(w.name, w.gpus) for w in two.workers()] == [("prefill0", (0,)), ("decode0", (1,))]
    assert two.kv_transfer.backend == "nccl"  # each worker sees only its own GPU
    one = topo(model).resolved(num_gpus=1)
    assert [w.gpus for w in one.workers()] == [(0,), (0,)]
    assert one.kv_transfer.backend == "cuda_ipc"
    mixed = topo(model, mixed=[{}, {}]).resolved(num_gpus=4)
    assert [w.gpus for w in mixed.workers()] == [(0,), (1,)]


def test_resolved_skips_gpus_already_listed(model: str) -> None:
    t = topo(model, prefill=[{}, {"gpus": [0]}], decode=[{}]).resolved(num_gpus=3)
    assert [w.gpus for w in t.workers()] == [(1,), (0,), (2,)]


def test_resolved_refuses_what_the_machine_cannot_hold(model: str) -> None:
    with pytest.raises(ValueError, match=r"^device='cuda' is invalid: no CUDA GPU"):
        topo(model, device="cuda").resolved(num_gpus=0)
    with pytest.raises(ValueError, match=r"^prefill\[0\]\.gpus=\[1\] is invalid.*'cpu'"):
        topo(model, prefill=[{"gpus": [1]}], decode=[{}]).resolved(num_gpus=0)
    with pytest.raises(ValueError, match=r"^decode\[0\]\.gpus: GPU 2 is not visible"):
        topo(model, prefill=[{}], decode=[{"gpus": [2]}]).resolved(num_gpus=2)
    with pytest.raises(ValueError, match=r"^prefill\[1\]\.gpus: no free GPU left"):
        topo(model, prefill=[{}, {}], decode=[{}]).resolved(num_gpus=1)
    with pytest.raises(ValueError, match=r"^kv_transfer\.backend='nccl' is invalid"):
        topo(model, kv_transfer={"backend": "nccl"}).resolved(num_gpus=1)


def test_resolved_multi_node_picks_nccl_and_the_first_node_for_the_router(model: str) -> None:
    t = topo(
        model,
        nodes=[{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        prefill=[{"gpus": [0], "node": "a"}],
        decode=[{"gpus": [0], "node": "b"}],
    )
    r = t.resolved(num_gpus=8)
    assert r.kv_transfer.backend == "nccl"
    assert r.router.node == "a" and t.router.node is None
    assert r.is_multi_node
    assert r.node_address("b") == "10.0.0.2"
    assert r.bind_address("b") == "10.0.0.2"  # loopback bind_host means the node's own address
    assert dataclasses.replace(r, bind_host="0.0.0.0").bind_address("b") == "0.0.0.0"
    with pytest.raises(ValueError, match=r"node='c' is invalid"):
        r.node_address("c")


def test_single_machine_binds_loopback(model: str) -> None:
    t = topo(model)
    assert t.node_address(None) == "127.0.0.1" and t.bind_address(None) == "127.0.0.1"


# ---------------------------------------------------------------------------------- API


def test_workers_are_numbered_per_side(model: str) -> None:
    t = topo(model, prefill=[{}, {}], decode=[{}, {}, {}])
    got = [(w.role, w.idx, w.name, w.is_decode_side) for w in t.workers()]
    assert got == [
        ("prefill", 0, "prefill0", False),
        ("prefill", 1, "prefill1", False),
        ("decode", 0, "decode0", True),
        ("decode", 1, "decode1", True),
        ("decode", 2, "decode2", True),
    ]
    mixed = topo(model, mixed=[{"gpus": [3]}, {"gpus": [1]}]).workers()
    assert [(w.role, w.idx, w.name, w.gpus) for w in mixed] == [
        ("mixed", 0, "mixed0", (3,)),
        ("mixed", 1, "mixed1", (1,)),
    ]


def test_engine_config_carries_the_shared_settings(model: str) -> None:
    t = topo(
        model,
        device="cpu",
        dtype="float32",
        cuda_graph=False,
        seed=7,
        scheduler={"page_size": 4, "num_pages": 32},
    )
    cfg = t.engine_config(t.workers()[1])
    assert cfg == EngineConfig(
        model_path=model,
        device="cpu",
        dtype="float32",
        attention_backend="auto",
        cuda_graph=False,
        seed=7,
        scheduler=SchedulerConfig(page_size=4, num_pages=32),
    )


def test_to_dict_is_json_and_round_trips(model: str) -> None:
    t = topo(
        model,
        router={"api_key": "secret", "port": 9000},
        prefill=[{"gpus": [0]}],
        decode=[{"gpus": [1]}],
    ).resolved(num_gpus=2)
    public = json.loads(json.dumps(t.to_dict()))
    assert public["router"]["api_key"] == "<redacted>"
    assert public["prefill"] == [{"gpus": [0], "tp": 1, "node": None}]
    assert public["kv_transfer"]["backend"] == "nccl"
    assert '"secret"' not in json.dumps(public)  # the api key's value
    assert Topology.from_dict(t.to_dict(redact=False)) == t


def test_for_model_pd_is_the_default(model: str) -> None:
    t = Topology.for_model(model)
    assert (len(t.prefill), len(t.decode), t.mixed) == (1, 1, ())
    assert t == topo(model)


def test_for_model_mixed_and_overrides(model: str) -> None:
    t = Topology.for_model(
        model,
        mode="mixed",
        host="0.0.0.0",
        port=9001,
        api_key="k",
        device="cpu",
        dtype="float32",
        page_size=8,
        num_pages=128,
        kv_transfer="tcp",
        tokenizer_replicas=2,
        seed=3,
        max_context_len=None,  # None: not given (an unset CLI flag)
    )
    assert (t.prefill, t.decode, len(t.mixed)) == ((), (), 1)
    assert (t.router.host, t.router.port, t.router.api_key) == ("0.0.0.0", 9001, "k")
    assert (t.device, t.dtype, t.seed, t.tokenizer.replicas) == ("cpu", "float32", 3, 2)
    assert t.scheduler == SchedulerConfig(page_size=8, num_pages=128)
    assert t.kv_transfer.backend == "tcp"
    assert [w.name for w in t.workers()] == ["mixed0"]


def test_for_model_merges_sections_and_flat_keys(model: str) -> None:
    t = Topology.for_model(
        model, scheduler={"chunk_size": 64}, page_size=4, router={"port": 7000}, port=7001
    )
    assert (t.scheduler.chunk_size, t.scheduler.page_size) == (64, 4)
    assert t.router.port == 7001
    assert Topology.for_model(model, kv_transfer_backend="tcp").kv_transfer.backend == "tcp"


def test_for_model_refuses_unknown_options_and_modes(model: str) -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pagesize'\]"):
        Topology.for_model(model, pagesize=8)
    with pytest.raises(ValueError, match=r"^mode='both' is invalid"):
        Topology.for_model(model, mode="both")
    with pytest.raises(ValueError, match=r"^router\.port=0\.5 is invalid"):
        Topology.for_model(model, port=0.5)


# ---------------------------------------------------------------------------------- supervision


def test_supervision_defaults_reach_for_model_and_a_section_overrides_them(model: str) -> None:
    default = Topology.for_model(model).supervision
    assert (default.max_restarts, default.heartbeat_interval_s) == (5, 1.0)
    assert (default.heartbeat_timeout_s, default.progress_timeout_s) == (5.0, 300.0)
    t = topo(model, supervision={"max_restarts": 0, "progress_timeout_s": 0})
    assert (t.supervision.max_restarts, t.supervision.progress_timeout_s) == (0, 0)
    t = Topology.for_model(model, supervision={"restart_backoff_s": 0.5})
    assert t.supervision.restart_backoff_s == 0.5 and t.supervision.max_restarts == 5
    assert Topology.from_dict(t.to_dict(redact=False)) == t


@pytest.mark.parametrize(
    "section, message",
    [
        ({"max_restarts": -1}, "supervision.max_restarts=-1 is invalid"),
        ({"heartbeat_interval_s": 0}, "supervision.heartbeat_interval_s=0 is invalid"),
        ({"heartbeat_timeout_s": 1.5}, "supervision.heartbeat_timeout_s=1.5 is invalid"),
        ({"progress_timeout_s": "soon"}, "supervision.progress_timeout_s='soon' is invalid"),
        ({"restart_window_s": True}, "supervision.restart_window_s=True is invalid"),
        ({"restarts": 3}, "supervision: unknown key(s) ['restarts']"),
    ],
)
def test_invalid_supervision_is_refused_naming_the_key(
    model: str, section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        topo(model, supervision=section)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------- YAML


def test_from_yaml_names_the_file_and_the_key(model: str, tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {model}\nrouter: {{port: 99999}}\n")
    with pytest.raises(ValueError, match=r"t\.yaml: router\.port=99999 is invalid"):
        Topology.from_yaml(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"not valid YAML"):
        Topology.from_yaml(path)
    with pytest.raises(ValueError, match=r"does not exist"):
        Topology.from_yaml(tmp_path / "missing.yaml")
    path.write_text("- model\n")
    with pytest.raises(ValueError, match=r"topology: expected a mapping"):
        Topology.from_yaml(path)


def _load_with_model(path: Path, model: str, tmp_path: Path) -> Topology:
    """Load an example with its model path pointed at the fake model (the real one is absent)."""
    data = yaml.safe_load(path.read_text())
    data["model"] = model
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(data))
    return Topology.from_yaml(copy)


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "1p1d-cpu.yaml",
        "1p1d-one-gpu.yaml",
        "1p1d-two-gpus.yaml",
        "mixed.yaml",
        "2p2d-two-nodes.yaml",
    } <= names


EXPECTED = {
    # file: (device, worker names, resolved kv_transfer.backend with 2 GPUs per node)
    "1p1d-cpu.yaml": ("cpu", ["prefill0", "decode0"], "tcp"),
    "router-alone.yaml": ("cpu", [], "tcp"),  # workers join at runtime
    "1p1d-one-gpu.yaml": ("cuda", ["prefill0", "decode0"], "cuda_ipc"),
    "1p1d-two-gpus.yaml": ("cuda", ["prefill0", "decode0"], "nccl"),
    "mixed.yaml": ("cuda", ["mixed0", "mixed1"], "cuda_ipc"),
    "2p2d-two-nodes.yaml": ("cuda", ["prefill0", "prefill1", "decode0", "decode1"], "nccl"),
}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_topology_loads(path: Path, model: str, tmp_path: Path) -> None:
    t = _load_with_model(path, model, tmp_path)
    r = t.resolved(num_gpus=2)
    device, names, backend = EXPECTED[path.name]
    assert r.device == device
    assert [w.name for w in r.workers()] == names
    assert r.kv_transfer.backend == backend
    assert all(w.tp == 1 for w in r.workers())


def test_two_node_example_places_each_side_on_its_node(model: str, tmp_path: Path) -> None:
    t = _load_with_model(DEPLOY / "topologies" / "2p2d-two-nodes.yaml", model, tmp_path)
    assert {w.node for w in t.workers() if w.role == "prefill"} == {"node-a"}
    assert {w.node for w in t.workers() if w.role == "decode"} == {"node-b"}
    assert t.router.node == "node-a" and t.router.host == "0.0.0.0"


def test_kubernetes_manifest_runs_its_configmap_topology(model: str, tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "pdserve.yaml").read_text())]
    by_kind = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "Deployment", "Service"} <= set(by_kind)
    data = yaml.safe_load(by_kind["ConfigMap"]["data"]["topology.yaml"])
    data["model"] = model
    t = Topology.from_dict(data)
    assert t.router.host == "0.0.0.0"  # reachable through the Service
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["pdserve", "launch", "--topology", "/etc/pdserve/topology.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["topology"] == "/etc/pdserve"
    gpus_needed = len({g for w in t.workers() for g in w.gpus or ()})
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus_needed
    assert container["ports"][0]["containerPort"] == t.router.port
    assert (
        by_kind["Service"]["spec"]["selector"]
        == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    )


def test_prometheus_scrapes_the_router_metrics() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def _exposed_metric_names() -> set[str]:
    from pdserve.router.metrics import RouterMetrics

    text = RouterMetrics("m", lambda: []).render().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names |= {name + s for s in suffixes}
    return names


def test_grafana_dashboard_queries_only_metrics_the_router_exposes() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bpdserve_\w+", e)}
    assert used and used <= _exposed_metric_names(), used - _exposed_metric_names()
    for needed in (
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_e2e_request_latency_seconds_bucket",
        "pdserve_generation_tokens_total",
        "pdserve_num_running_reqs",
        "pdserve_num_queue_reqs",
        "pdserve_kv_pages_used",
        "pdserve_cache_hit_rate",
        "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfer_seconds_total",
    ):
        assert needed in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_workers_sharing_one_gpu_each_take_a_smaller_memory_fraction(model: str) -> None:
    one_gpu = Topology.from_dict({"model": model}).resolved(num_gpus=1)
    configs = [one_gpu.engine_config(w) for w in one_gpu.workers()]
    assert [c.scheduler.mem_fraction for c in configs] == [0.45, 0.45]
    two_gpus = Topology.from_dict({"model": model}).resolved(num_gpus=2)
    assert [two_gpus.engine_config(w).scheduler.mem_fraction for w in two_gpus.workers()] == [
        0.85,
        0.85,
    ]


# ---------------------------------------------------------------------------------- router limits


def test_router_limits_default_to_production_values(model: str) -> None:
    limits = topo(model).router.limits
    assert limits == RequestLimits()
    assert (limits.max_body_bytes, limits.max_prompt_chars, limits.max_prompt_tokens) == (
        16 * 2**20,
        1_000_000,
        0,
    )
    assert (limits.max_prompts, limits.max_choices, limits.max_in_flight) == (1024, 1024, 4096)
    assert (limits.max_stop_strings, limits.max_stop_chars) == (32, 256)
    assert (limits.max_stop_token_ids, limits.max_logit_bias, limits.retry_after_s) == (
        256,
        1024,
        1,
    )


def test_router_limits_are_read_from_the_router_section_and_round_trip(model: str) -> None:
    t = topo(model, router={"limits": {"max_body_bytes": 1024, "max_in_flight": 8}})
    assert t.router.limits.max_body_bytes == 1024 and t.router.limits.max_in_flight == 8
    assert t.router.limits.max_prompts == 1024  # the rest keep their defaults
    assert json.loads(json.dumps(t.to_dict()))["router"]["limits"]["max_in_flight"] == 8
    assert Topology.from_dict(t.to_dict(redact=False)) == t
    merged = Topology.for_model(model, router={"limits": {"max_prompts": 3}}, port=7000)
    assert merged.router.limits.max_prompts == 3 and merged.router.port == 7000


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        (
            {"max_body_bytes": 0},
            r"router\.limits\.max_body_bytes=0 is invalid: expected an integer >= 1",
        ),
        ({"max_in_flight": "10"}, r"router\.limits\.max_in_flight='10' is invalid"),
        ({"max_prompt_tokens": -1}, r"router\.limits\.max_prompt_tokens=-1 is invalid: .* >= 0"),
        ({"max_stop": 3}, r"router\.limits: unknown key\(s\) \['max_stop'\]"),
        ([1], r"router\.limits: expected a mapping"),
    ],
)
def test_bad_router_limits_are_refused_naming_the_key(model: str, limits: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        topo(model, router={"limits": limits})


def test_the_router_spec_carries_the_limits(model: str) -> None:
    from pdserve.config.router_spec import RouterSpec

    spec = {"model_name": "m", "inbox": "ipc://r", "tokenizer_inboxes": ["ipc://t"],
            "workers": [{"name": "mixed0", "role": "mixed", "idx": 0, "inbox": "ipc://w"}],
            "limits": {"max_prompts": 7}}  # fmt: skip
    router_spec = RouterSpec.from_dict(spec)
    assert router_spec.limits == RequestLimits(max_prompts=7)
    assert RouterSpec.from_dict(router_spec.to_dict()).limits == router_spec.limits


# ---------------------------------------------------------------------------------- launch overrides


def test_host_and_port_override_only_the_router_address(model: str) -> None:
    t = topo(model, router={"host": "127.0.0.1", "port": 8000, "api_key": "k" * 16})
    moved = t.with_router_address(host="0.0.0.0", port=9123)
    assert (moved.router.host, moved.router.port) == ("0.0.0.0", 9123)
    assert dataclasses.replace(moved, router=t.router) == t  # nothing else changed
    assert moved.router.api_key == t.router.api_key
    assert t.with_router_address(port=0).router.host == "127.0.0.1"  # None keeps the file's
    assert t.with_router_address() is t


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ({"port": 70000}, r"^router\.port=70000 is invalid: expected 0\.\.65535"),
        ({"host": " "}, r"^router\.host=' ' is invalid"),
    ],
)
def test_a_bad_override_is_refused_naming_the_router_key(
    model: str, address: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        topo(model).with_router_address(**address)


def test_a_model_path_under_home_is_expanded(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Path(model).parent
    monkeypatch.setenv("HOME", str(home))
    t = topo(f"~/{Path(model).name}")
    assert t.model == model and t.model_name == Path(model).name
    path = tmp_path / "t.yaml"
    path.write_text(f"model: ~/{Path(model).name}\n")
    assert Topology.from_yaml(path).model == model


@pytest.mark.parametrize("tp", [2, 4])  # 4 query heads over 2 KV heads: tp 4 replicates them
def test_a_mixed_worker_may_be_tensor_parallel_and_its_engine_config_says_so(
    model: str, tp: int
) -> None:
    t = topo(model, device="cuda", mixed=[{"gpus": list(range(tp)), "tp": tp}])
    (worker,) = t.workers()
    assert worker.tp == tp and t.engine_config(worker).tp_size == tp
    assert Topology.for_model(model, mode="mixed", tp_size=tp).mixed[0].tp == tp


def test_tensor_parallel_prefill_and_decode_workers_resolve_to_tcp(model: str) -> None:
    t = topo(model, device="cuda", prefill=[{"gpus": [0, 1], "tp": 2}], decode=[{"gpus": [2]}])
    assert t.resolved(num_gpus=3).kv_transfer.backend == "tcp"  # relayed through rank 0
