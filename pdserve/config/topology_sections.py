"""The sections of a topology file: router, tokenizer, kv_transfer, nodes and one worker entry.

Each is a frozen dataclass validated in `__post_init__`; `topology.py` assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.config.request_limits import RequestLimits

Role = Literal["prefill", "decode", "mixed"]
ROUTING_POLICIES = ("round_robin", "least_load")
KV_BACKENDS = ("auto", "nccl", "cuda_ipc", "tcp")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_name(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_value(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid: expected {expected}")


# ---------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port, picked at launch
    api_key: str | None = None
    routing_policy: str = "round_robin"  # round_robin | least_load
    node: str | None = None  # where the router and tokenizers run; resolved(): the first node
    limits: RequestLimits = field(default_factory=RequestLimits)  # YAML: a mapping

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", RequestLimits.from_dict(self.limits))
        check_value(is_name(self.host), "host", self.host, "a host name or address")
        check_value(is_int(self.port) and 0 <= self.port <= 65535, "port", self.port, "0..65535")
        check_value(
            self.api_key is None or is_name(self.api_key), "api_key", self.api_key, "a string"
        )
        check_value(
            self.routing_policy in ROUTING_POLICIES,
            "routing_policy",
            self.routing_policy,
            f"one of {list(ROUTING_POLICIES)}",
        )
        check_value(self.node is None or is_name(self.node), "node", self.node, "a node name")


@dataclass(frozen=True)
class TokenizerConfig:
    replicas: int = 1  # tokenizer processes

    def __post_init__(self) -> None:
        check_value(is_int(self.replicas) and self.replicas >= 1, "replicas", self.replicas, ">= 1")


@dataclass(frozen=True)
class KVTransferConfig:
    backend: str = "auto"  # auto | nccl | cuda_ipc | tcp
    timeout_s: float = 30.0  # a transfer not done by then aborts its request

    def __post_init__(self) -> None:
        check_value(
            self.backend in KV_BACKENDS, "backend", self.backend, f"one of {list(KV_BACKENDS)}"
        )
        ok = isinstance(self.timeout_s, (int, float)) and not isinstance(self.timeout_s, bool)
        check_value(ok and self.timeout_s > 0, "timeout_s", self.timeout_s, "a number > 0")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str  # reachable from the other nodes (ZeroMQ tcp:// and NCCL)

    def __post_init__(self) -> None:
        check_value(is_name(self.name), "name", self.name, "a non-empty node name")
        check_value(is_name(self.address), "address", self.address, "a host name or address")


@dataclass(frozen=True)
class WorkerConfig:
    """One entry of `prefill:`, `decode:` or `mixed:`."""

    gpus: tuple[int, ...] | None = None  # None: assigned by resolved(); () on cpu
    tp: int = 1
    node: str | None = None  # a name from `nodes:` (required when nodes are declared)

    def __post_init__(self) -> None:
        if self.gpus is not None:
            check_value(
                isinstance(self.gpus, (list, tuple))
                and all(is_int(g) and g >= 0 for g in self.gpus),
                "gpus",
                self.gpus,
                "a list of GPU indices >= 0",
            )
            object.__setattr__(self, "gpus", tuple(self.gpus))  # a YAML list, frozen
            for i, gpu in enumerate(self.gpus):
                if gpu in self.gpus[:i]:
                    raise ValueError(f"gpus: GPU {gpu} is listed twice")
        check_value(is_int(self.tp) and self.tp >= 1, "tp", self.tp, "an integer >= 1")
        if self.gpus and self.tp != len(self.gpus):
            raise ValueError(
                f"tp={self.tp} is invalid: expected len(gpus)={len(self.gpus)} "
                "(one GPU per tensor-parallel rank)"
            )
        check_value(self.node is None or is_name(self.node), "node", self.node, "a node name")


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: `idx` numbers prefill workers 0.. and decode-side (decode and mixed)
    workers 0.., the indices the router's messages carry."""

    role: Role
    idx: int
    name: str  # prefill0, decode0, mixed0
    gpus: tuple[int, ...] | None  # the worker's CUDA_VISIBLE_DEVICES; () on cpu
    tp: int
    node: str | None

    @property
    def is_decode_side(self) -> bool:
        return self.role in ("decode", "mixed")
