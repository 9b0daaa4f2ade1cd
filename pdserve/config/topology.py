"""The cluster layer of the configuration: which workers run where, read from a topology YAML.

A `Topology` is validated once when built, and every error names its key path (`decode[1].gpus`,
`router.port`); `resolved()` turns the `auto` values into this machine's choices and returns a new
frozen Topology. `workers()` and `engine_config()` hand each process its part.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve import env
from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.gpu_assignment import assign_gpus
from pdserve.config.lora_config import LoraConfig
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.config.topology_parsing import FOR_MODEL_MODES as FOR_MODEL_MODES
from pdserve.config.topology_parsing import (
    for_model_fields,
    read_num_heads,
    topology_fields,
)
from pdserve.config.topology_sections import (
    FaultInjectionConfig,
    KVTransferConfig,
    NodeConfig,
    Role,
    RouterConfig,
    SecurityConfig,
    SupervisionConfig,
    TokenizerConfig,
    WorkerConfig,
    WorkerPlan,
    check_cluster_secret,
    check_value,
    is_int,
    is_name,
)

_ROLES: tuple[Role, ...] = ("prefill", "decode", "mixed")
_ENGINE_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(EngineConfig) if f.name != "scheduler"
}
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SHARED_GPU_MEM_FRACTION = 0.45


# ---------------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """The whole cluster: model, engine settings shared by every worker, and the processes."""

    model: str  # a Hugging Face model directory (with config.json)
    served_model_name: str | None = None  # None: the model directory's name
    # The chat template to use instead of the model's: a file, or the Jinja text itself.
    chat_template: str | None = None
    device: str = _ENGINE_DEFAULTS["device"]  # auto | cuda | cpu
    dtype: str = _ENGINE_DEFAULTS["dtype"]  # auto | float32 | float16 | bfloat16
    attention_backend: str = _ENGINE_DEFAULTS["attention_backend"]
    cuda_graph: bool = _ENGINE_DEFAULTS["cuda_graph"]
    overlap_schedule: bool = _ENGINE_DEFAULTS["overlap_schedule"]
    cuda_graph_max_batch: int = _ENGINE_DEFAULTS["cuda_graph_max_batch"]
    piecewise_graph_max_tokens: int = _ENGINE_DEFAULTS["piecewise_graph_max_tokens"]
    seed: int = _ENGINE_DEFAULTS["seed"]
    is_embedding: bool | None = None  # embeddings/rewards; None: detected (resolved() decides)
    router: RouterConfig = field(default_factory=RouterConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prefill: tuple[WorkerConfig, ...] = ()
    decode: tuple[WorkerConfig, ...] = ()
    mixed: tuple[WorkerConfig, ...] = ()  # co-located workers; or prefill + decode, not both
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    nodes: tuple[NodeConfig, ...] = ()  # more than one machine
    bind_host: str = "127.0.0.1"  # internal sockets; see bind_address()
    security: SecurityConfig = field(default_factory=SecurityConfig)  # see cluster_secret()
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)  # tests
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)  # restarts, liveness
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters at start, slot pool

    def __post_init__(self) -> None:
        # Normalize before the object is used: lists from YAML become tuples, no workers at
        # all means the default one prefill + one decode, and a model path under `~` is the
        # user's home, as a shell would expand it (deploy/topologies/1p1d-cpu.yaml uses one).
        for key in ("prefill", "decode", "mixed", "nodes"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if isinstance(self.model, str) and self.model.startswith("~"):
            object.__setattr__(self, "model", os.path.expanduser(self.model))
        if not (self.prefill or self.decode or self.mixed or self.router.membership):
            object.__setattr__(self, "prefill", (WorkerConfig(),))
            object.__setattr__(self, "decode", (WorkerConfig(),))
        self._check_engine_keys()
        self._check_roles()
        self._check_nodes()
        self._check_gpus()
        self._check_tp(*read_num_heads(self.model))
        self._check_kv_backend()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_yaml(cls, path: str | Path) -> Topology:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"topology file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Topology:
        return cls(**topology_fields(data, [f.name for f in dataclasses.fields(cls)]))

    @classmethod
    def for_model(cls, model_path: str | Path, mode: str = "pd", **overrides: Any) -> Topology:
        """One machine's topology for `pdserve launch --model` and `Engine(model_path=...)`.

        mode "pd": one prefill + one decode worker; "mixed": one mixed worker. Overrides are any
        top-level key, a section as a dict (`router={...}`; `kv_transfer="tcp"` names the
        backend), or a flat key: host, port, api_key, routing_policy, tokenizer_replicas,
        kv_transfer_backend, kv_transfer_timeout_s, the scheduler's keys and tp_size (every
        worker's tensor-parallel degree). None means "not given" (the default), as from an unset
        CLI flag.
        """
        field_names = [f.name for f in dataclasses.fields(cls)]
        return cls.from_dict(for_model_fields(model_path, mode, field_names, overrides))

    def with_router_address(self, host: str | None = None, port: int | None = None) -> Topology:
        """This topology with its router on `host` and `port` instead of the file's (None keeps
        the file's): `pdserve launch --topology FILE --port N`, `Engine(topology=..., port=N)`.
        ValueError naming router.host or router.port for a bad value."""
        changes = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        if not changes:
            return self
        try:
            router = dataclasses.replace(self.router, **changes)
        except ValueError as e:
            raise ValueError(f"router.{e}") from None
        return dataclasses.replace(self, router=router)

    # ------------------------------------------------------------------ resolving

    def resolved(self, num_gpus: int | None = None) -> Topology:
        """A new Topology with `auto` resolved: device (cuda when a GPU is visible), each worker's
        gpus (the lowest free ones; a decode worker shares a prefill worker's GPU when none is
        left; () on cpu), kv_transfer.backend (tcp on cpu, cuda_ipc when prefill and decode share one GPU,
        else nccl),
        served_model_name and router.node. dtype and attention_backend are left to each worker's
        `EngineConfig.resolved()`. num_gpus: GPUs per node; None asks torch on this machine."""
        if num_gpus is None and self.device != "cpu":
            num_gpus = _visible_gpu_count()
        num_gpus = num_gpus or 0
        device = self.device
        if device == "auto":
            device = "cuda" if num_gpus > 0 else "cpu"
        if device == "cuda" and num_gpus == 0 and not self.nodes:
            raise ValueError("device='cuda' is invalid: no CUDA GPU is visible on this machine")
        workers = self._resolved_workers(device, num_gpus)
        backend = self.kv_transfer.backend
        is_tp_pd = any(w.tp > 1 for w in (*self.prefill, *self.decode))
        if backend == "auto" and is_tp_pd:  # the only backend that moves KV rank to rank yet
            backend = "tcp"
        if backend == "auto":
            backend = "tcp" if device == "cpu" else "nccl"
            # CUDA IPC only where prefill and decode see the same device: each worker is pinned
            # to its own GPUs, so across two GPUs the pool could not be opened.
            gpus = {g for role in ("prefill", "decode") for w in workers[role] for g in w.gpus}
            if device == "cuda" and len(gpus) <= 1 and not self._spans_nodes():
                backend = "cuda_ipc"
        router_node = self.router.node or (self.nodes[0].name if self.nodes else None)
        return dataclasses.replace(
            self,
            served_model_name=self.model_name,
            is_embedding=self._detected_is_embedding(),
            device=device,
            router=dataclasses.replace(self.router, node=router_node),
            kv_transfer=dataclasses.replace(self.kv_transfer, backend=backend),
            **workers,
        )

    def _detected_is_embedding(self) -> bool:
        """is_embedding as the workers will decide it (config/pooling_config.py), so the router
        knows which routes the model serves."""
        from pdserve.config.engine_config import ModelConfig

        try:
            return ModelConfig.from_hf(self.model, is_embedding=self.is_embedding).is_embedding
        except (KeyError, ValueError, OSError):  # the workers refuse such a model, naming why
            return bool(self.is_embedding)

    def _resolved_workers(self, device: str, num_gpus: int) -> dict[str, tuple[WorkerConfig, ...]]:
        if device == "cpu":
            for path, _, w in self._entries():
                if w.gpus:
                    raise ValueError(
                        f"{path}.gpus={list(w.gpus)} is invalid: device {self.device!r} "
                        "resolved to 'cpu' (no CUDA GPU visible): expected no gpus"
                    )
            return {
                role: tuple(dataclasses.replace(w, gpus=()) for w in getattr(self, role))
                for role in _ROLES
            }
        if not self.nodes:
            for path, _, w in self._entries():
                for gpu in w.gpus or ():
                    if gpu >= num_gpus:
                        raise ValueError(
                            f"{path}.gpus: GPU {gpu} is not visible: this machine has "
                            f"{num_gpus} GPU(s)"
                        )
        assigned = assign_gpus(list(self._entries()), num_gpus)
        return {
            role: tuple(
                dataclasses.replace(w, gpus=assigned.get(f"{role}[{i}]", w.gpus))
                for i, w in enumerate(getattr(self, role))
            )
            for role in _ROLES
        }

    # ------------------------------------------------------------------ what processes get

    @property
    def model_name(self) -> str:
        """The name clients use (`model` in OpenAI requests, /v1/models)."""
        return self.served_model_name or Path(self.model).resolve().name

    @property
    def is_multi_node(self) -> bool:
        return len(self.nodes) > 1

    def workers(self) -> list[WorkerPlan]:
        """Prefill workers, then decode-side workers (decode or mixed), each side numbered 0.."""
        specs = [
            WorkerPlan("prefill", i, f"prefill{i}", w.gpus, w.tp, w.node)
            for i, w in enumerate(self.prefill)
        ]
        decode_side = [("decode", w) for w in self.decode] + [("mixed", w) for w in self.mixed]
        for i, (role, w) in enumerate(decode_side):
            plan = WorkerPlan(role, i, f"{role}{i}", w.gpus, w.tp, w.node, w.speculative)
            specs.append(plan)
        return specs

    def engine_config(self, worker: WorkerPlan | None = None) -> EngineConfig:
        """The EngineConfig of `worker` (GPUs are pinned by CUDA_VISIBLE_DEVICES, not here); the
        worker resolves its `auto` values itself. Workers that share a GPU each size their KV pool
        from at most _SHARED_GPU_MEM_FRACTION of the free memory they find, so the second one to
        start still has room for its weights and pool."""
        scheduler = self.scheduler
        if worker is not None and worker.gpus and self._num_sharing(worker) > 1:
            fraction = min(scheduler.mem_fraction, _SHARED_GPU_MEM_FRACTION)
            scheduler = dataclasses.replace(scheduler, mem_fraction=fraction)
        return EngineConfig(
            model_path=self.model,
            device=self.device,
            dtype=self.dtype,
            attention_backend=self.attention_backend,
            cuda_graph=self.cuda_graph,
            overlap_schedule=self.overlap_schedule,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
            piecewise_graph_max_tokens=self.piecewise_graph_max_tokens,
            seed=self.seed,
            scheduler=scheduler,
            is_embedding=self.is_embedding,
            lora=self.lora,
            tp_size=worker.tp if worker is not None else 1,
            speculative=worker.speculative if worker is not None else SpeculativeConfig(),
        )

    def _num_sharing(self, worker: WorkerPlan) -> int:
        """Workers (this one included) on the same node that use any of its GPUs."""
        return sum(
            1
            for w in self.workers()
            if w.node == worker.node and set(w.gpus or ()) & set(worker.gpus or ())
        )

    def node_address(self, node: str | None) -> str:
        """Where the other nodes reach `node`; 127.0.0.1 on a single machine."""
        for n in self.nodes:
            if n.name == node:
                return n.address
        if node is None and not self.nodes:
            return "127.0.0.1"
        raise ValueError(f"node={node!r} is invalid: expected one of {self._node_names()}")

    def bind_address(self, node: str | None) -> str:
        """The host internal sockets on `node` bind to: bind_host, except that a loopback
        bind_host on more than one machine means the node's own address."""
        if self.is_multi_node and self.bind_host in _LOOPBACK_HOSTS:
            return self.node_address(node)
        return self.bind_host

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """JSON-able (lists, not tuples); `redact` hides router.api_key (for /server_info).
        With redact=False, `Topology.from_dict(t.to_dict(redact=False)) == t`."""
        d = _jsonable(dataclasses.asdict(self))
        for w in (*d["prefill"], *d["decode"], *d["mixed"]):  # no speculation: nothing to say
            if w["speculative"]["speculative_algorithm"] is None:
                del w["speculative"]
        if redact and self.router.api_key is not None:
            d["router"]["api_key"] = "<redacted>"
        if redact and self.security.cluster_secret is not None:
            d["security"]["cluster_secret"] = "<redacted>"
        return d

    def cluster_secret(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The secret keying the CURVE authentication of internal tcp sockets:
        security.cluster_secret, else $PDSERVE_CLUSTER_SECRET; None on one machine without
        either (its sockets are ipc://). Required with nodes: ValueError naming the key."""
        secret = self.security.cluster_secret
        if secret is None:
            secret = env.cluster_secret(environ)
            if secret is not None:
                check_cluster_secret(secret, f"${env.CLUSTER_SECRET_VAR}")
        if secret is None and self.router.membership:
            raise ValueError(
                "security.cluster_secret: missing: with router.membership, workers join over "
                "tcp, which must be authenticated: set "
                f"${env.CLUSTER_SECRET_VAR} (the same on every machine) or security.cluster_secret"
            )
        if secret is None and self.is_multi_node:
            raise ValueError(
                "security.cluster_secret: missing: a topology with nodes carries every internal "
                "message over tcp, which must be authenticated: set "
                f"${env.CLUSTER_SECRET_VAR} (the same on every node) or security.cluster_secret"
            )
        return secret

    # ------------------------------------------------------------------ checks

    def _entries(self) -> Iterator[tuple[str, Role, WorkerConfig]]:
        """(key path, role, worker) for every worker, prefill first."""
        for role in _ROLES:
            for i, w in enumerate(getattr(self, role)):
                yield f"{role}[{i}]", role, w

    def _node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def _spans_nodes(self) -> bool:
        """Some prefill worker and some decode worker are on different nodes."""
        return len({w.node for w in self.prefill} | {w.node for w in self.decode}) > 1

    def _check_engine_keys(self) -> None:
        check_value(is_name(self.model), "model", self.model, "a Hugging Face model directory")
        if self.chat_template is not None:
            chat_template_text(self.chat_template)
        check_value(
            self.served_model_name is None or is_name(self.served_model_name),
            "served_model_name",
            self.served_model_name,
            "a non-empty name or null",
        )
        check_value(
            isinstance(self.cuda_graph, bool), "cuda_graph", self.cuda_graph, "true or false"
        )
        check_value(
            isinstance(self.overlap_schedule, bool),
            "overlap_schedule",
            self.overlap_schedule,
            "true or false",
        )
        check_value(
            is_int(self.cuda_graph_max_batch) and self.cuda_graph_max_batch >= 1,
            "cuda_graph_max_batch",
            self.cuda_graph_max_batch,
            "an integer >= 1",
        )
        check_value(
            is_int(self.piecewise_graph_max_tokens) and self.piecewise_graph_max_tokens >= 0,
            "piecewise_graph_max_tokens",
            self.piecewise_graph_max_tokens,
            "an integer >= 0 (0: no piecewise graphs)",
        )
        check_value(is_int(self.seed), "seed", self.seed, "an integer")
        check_value(
            self.is_embedding in (None, True, False),
            "is_embedding",
            self.is_embedding,
            "true, false or null (detect)",
        )
        check_value(is_name(self.bind_host), "bind_host", self.bind_host, "a host name or address")
        self.engine_config()  # device, dtype, attention_backend: EngineConfig's own checks
        if self.device == "cpu" and self.attention_backend not in ("auto", "torch"):
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is invalid on device 'cpu': "
                "expected 'auto' or 'torch'"
            )

    def _check_roles(self) -> None:
        if self.router.membership and (self.prefill or self.decode or self.mixed):
            raise ValueError(
                "router.membership=True: workers join with `pdserve worker --router`: expected "
                "no prefill, decode or mixed workers in the topology"
            )
        if self.mixed and (self.prefill or self.decode):
            other = "prefill" if self.prefill else "decode"
            raise ValueError(
                f"mixed: given together with {other}: expected either mixed workers or "
                "prefill + decode workers, not both"
            )
        if bool(self.prefill) != bool(self.decode):
            given, missing = ("prefill", "decode") if self.prefill else ("decode", "prefill")
            raise ValueError(
                f"{missing}: missing: {given} workers need {missing} workers (or use mixed workers)"
            )

    def _check_nodes(self) -> None:
        names = self._node_names()
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"nodes[{i}].name={name!r} is invalid: the name is used twice")
        where = [("router.node", self.router.node)] + [
            (f"{path}.node", w.node) for path, _, w in self._entries()
        ]
        for key, node in where:
            if node is not None and node not in names:
                raise ValueError(
                    f"{key}={node!r} is invalid: expected a node declared in `nodes:` "
                    f"(declared: {names})"
                )
            if node is None and names and key != "router.node":
                raise ValueError(f"{key}: missing: expected one of {names} (nodes are declared)")

    def _check_gpus(self) -> None:
        # A GPU may hold at most one worker of each role: one prefill and one decode worker may
        # share it (KV moves by cuda_ipc on one device), two of one role may not.
        holders: dict[tuple[str | None, int], dict[str, str]] = {}
        for path, role, w in self._entries():
            if w.gpus and self.device == "cpu":
                raise ValueError(
                    f"{path}.gpus={list(w.gpus)} is invalid: device is 'cpu': expected no gpus"
                )
            if w.gpus == () and self.device == "cuda":
                raise ValueError(
                    f"{path}.gpus=[] is invalid on device 'cuda': expected GPU indices, or "
                    "leave gpus out to have them assigned"
                )
            for gpu in w.gpus or ():
                held = holders.setdefault((w.node, gpu), {})
                if role in held:
                    on = f" of node {w.node!r}" if w.node else ""
                    raise ValueError(
                        f"{path}.gpus: GPU {gpu}{on} is listed twice (also in {held[role]})"
                    )
                held[role] = path
        if self.kv_transfer.backend != "nccl":
            return
        for (_, gpu), held in holders.items():
            if len(held) > 1:
                raise ValueError(
                    f"kv_transfer.backend='nccl' is invalid: {held['prefill']} and "
                    f"{held['decode']} share GPU {gpu} and NCCL refuses two ranks on one "
                    "device: expected 'cuda_ipc' or 'auto'"
                )

    def _check_tp(self, num_heads: int, num_kv_heads: int) -> None:
        for path, _, w in self._entries():
            if w.tp == 1:
                continue
            kv_ok = num_kv_heads % w.tp == 0 or w.tp % num_kv_heads == 0
            if num_heads % w.tp or not kv_ok:
                raise ValueError(
                    f"{path}.tp={w.tp} is invalid: expected a divisor of the model's "
                    f"num_attention_heads={num_heads} that divides or is a multiple of "
                    f"num_key_value_heads={num_kv_heads}"
                )

    def _check_kv_backend(self) -> None:
        backend = self.kv_transfer.backend
        if self.device == "cpu" and backend in ("nccl", "cuda_ipc"):
            raise ValueError(
                f"kv_transfer.backend={backend!r} is invalid on device 'cpu': "
                "expected 'tcp' or 'auto'"
            )
        if backend == "cuda_ipc" and self._spans_nodes():
            raise ValueError(
                "kv_transfer.backend='cuda_ipc' is invalid: prefill and decode workers are on "
                "different nodes and CUDA IPC works within one: expected 'nccl', 'tcp' or 'auto'"
            )


# ---------------------------------------------------------------------------------- helpers


def chat_template_text(value: Any) -> str:
    """The Jinja text of the `chat_template` setting: the file it names, or the value itself
    when it is a template (`{{` or `{%` in it, as vLLM's --chat-template takes it); a
    ValueError naming the key otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template={value!r:.80} is invalid: expected a file or a template")
    if "{{" in value or "{%" in value:
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise ValueError(
            f"chat_template={value!r:.200} is invalid: no such file, and not a Jinja template"
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat_template={value!r:.200}: cannot read it: {e}") from None


def _visible_gpu_count() -> int:
    import torch  # lazy: the router and tokenizer processes never need it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
