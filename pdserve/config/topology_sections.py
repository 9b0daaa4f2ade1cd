"""The sections of a topology file: router, tokenizer, kv_transfer, nodes, security,
fault_injection, supervision and one worker entry.

Each is a frozen dataclass validated in `__post_init__`; `topology.py` assembles them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.config.request_limits import DEFAULT_MAX_RUNNING_BATCH_LINES, RequestLimits
from pdserve.config.sampling_params import REASONING_PARSERS
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.multimodal.image_loader import ImageLimits
from pdserve.multimodal.video_loader import VideoLimits

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
    data_dir: str | None = None  # files and batches (--data-dir); None: ~/.cache/pdserve/data
    max_file_bytes: int = 200 * 10**6  # largest upload to /v1/files
    max_running_batch_lines: int = DEFAULT_MAX_RUNNING_BATCH_LINES  # online traffic goes first
    # Workers join and leave at runtime (`pdserve worker --router`): the router's and the
    # tokenizers' inboxes are tcp at port + 1, + 2, ...; the topology lists no workers.
    membership: bool = False
    drain_timeout_s: float = 120.0  # a leaving worker's requests get this long to end
    # Chat answers' <think> part into reasoning_content (router/reasoning.py); None: left as is.
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", RequestLimits.from_dict(self.limits))
        check_value(
            self.reasoning_parser is None or self.reasoning_parser in REASONING_PARSERS,
            "reasoning_parser",
            self.reasoning_parser,
            f"one of {list(REASONING_PARSERS)}",
        )
        check_value(
            isinstance(self.membership, bool), "membership", self.membership, "true or false"
        )
        check_value(
            is_number(self.drain_timeout_s) and self.drain_timeout_s > 0,
            "drain_timeout_s",
            self.drain_timeout_s,
            "a number > 0",
        )
        check_value(
            self.data_dir is None or is_name(self.data_dir), "data_dir", self.data_dir, "a path"
        )
        for key in ("max_file_bytes", "max_running_batch_lines"):
            value = getattr(self, key)
            check_value(is_int(value) and value >= 1, key, value, "an integer >= 1")
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
    # What one request may send a vision-language model (YAML: mappings of some of the keys).
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    video_limits: VideoLimits = field(default_factory=VideoLimits)

    def __post_init__(self) -> None:
        check_value(is_int(self.replicas) and self.replicas >= 1, "replicas", self.replicas, ">= 1")
        for key, cls in (("image_limits", ImageLimits), ("video_limits", VideoLimits)):
            object.__setattr__(self, key, media_limits(key, cls, getattr(self, key)))


def media_limits(key: str, cls: Any, value: Any) -> Any:
    """ImageLimits or VideoLimits from the topology's mapping (or an instance); unknown keys and
    bad values refused naming them."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, dict):
        raise ValueError(f"{key}={value!r} is invalid: expected a mapping of some of {known}")
    unknown = sorted(set(value) - set(known), key=str)
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}: expected some of {known}")
    floats = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)}
    for name, number in value.items():
        real = name in floats  # seconds, frames a second; the others are counts
        if not (is_number(number) if real else is_int(number)):
            expected = "a number" if real else "an integer"
            raise ValueError(f"{key}.{name}={number!r} is invalid: expected {expected}")
    try:
        return cls(**value)
    except ValueError as e:
        raise ValueError(f"{key}.{e}") from None


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


MIN_SECRET_LEN = 16


def check_cluster_secret(value: Any, key: str) -> None:
    """ValueError naming `key` unless `value` is long enough to be a shared secret."""
    if not isinstance(value, str) or len(value.strip()) < MIN_SECRET_LEN:
        shown = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{key} is invalid ({shown}): expected a shared secret of at least "
            f"{MIN_SECRET_LEN} characters (e.g. `openssl rand -hex 32`)"
        )


@dataclass(frozen=True)
class SecurityConfig:
    """`security:`. With nodes, every internal socket is tcp; a cluster secret (this key, or
    `$PDSERVE_CLUSTER_SECRET`, which keeps it out of the file) keys their CURVE authentication."""

    cluster_secret: str | None = None

    def __post_init__(self) -> None:
        if self.cluster_secret is not None:
            check_cluster_secret(self.cluster_secret, "cluster_secret")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FaultInjectionConfig:
    """`fault_injection:`, for tests (default off): KV pushes fail or lag and worker steps fail
    on purpose, so a test can prove every request still ends and every page comes back."""

    kv_failure_prob: float = 0.0  # a KV push fails with this probability
    kv_delay_s: float = 0.0  # a KV push first waits U(0, kv_delay_s) (part of its timeout)
    step_failure_prob: float = 0.0  # a worker's forward step fails with this probability
    seed: int | None = None  # None: a different sequence each run
    step_delay_s: float = 0.0  # each step with work first sleeps this long (a slower device)

    def __post_init__(self) -> None:
        for key in ("kv_failure_prob", "step_failure_prob"):
            value = getattr(self, key)
            check_value(_is_number(value) and 0 <= value <= 1, key, value, "a number in [0, 1]")
        ok = _is_number(self.kv_delay_s) and self.kv_delay_s >= 0
        check_value(ok, "kv_delay_s", self.kv_delay_s, "a number of seconds >= 0")
        ok = _is_number(self.step_delay_s) and self.step_delay_s >= 0
        check_value(ok, "step_delay_s", self.step_delay_s, "a number of seconds >= 0")
        check_value(self.seed is None or is_int(self.seed), "seed", self.seed, "an integer")

    @property
    def is_enabled(self) -> bool:
        faults = (self.kv_failure_prob, self.kv_delay_s, self.step_failure_prob, self.step_delay_s)
        return any(faults)


@dataclass(frozen=True)
class WorkerConfig:
    """One entry of `prefill:`, `decode:` or `mixed:`."""

    gpus: tuple[int, ...] | None = None  # None: assigned by resolved(); () on cpu
    tp: int = 1
    node: str | None = None  # a name from `nodes:` (required when nodes are declared)
    # Speculative decoding on this (decode or mixed) worker: SGLang's speculative_* keys, the
    # prefix optional (`speculative: {algorithm: NGRAM}`).
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.speculative, SpeculativeConfig):
            spec = self.speculative
            if not isinstance(spec, dict):
                raise ValueError(f"speculative: expected a mapping of keys to values, got {spec!r}")
            try:
                object.__setattr__(self, "speculative", SpeculativeConfig.from_options(spec))
            except ValueError as e:
                raise ValueError(f"speculative: {e}") from None
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
    speculative: SpeculativeConfig = SpeculativeConfig()  # decode-side workers only

    @property
    def is_decode_side(self) -> bool:
        return self.role in ("decode", "mixed")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SupervisionConfig:
    """How the launcher keeps processes alive and how the router judges them (`supervision:`)."""

    max_restarts: int = 5  # restarts of one process within restart_window_s; then it stays down
    restart_window_s: float = 600.0
    restart_backoff_s: float = 1.0  # wait before a restart; doubles per restart in the window
    heartbeat_interval_s: float = 1.0  # each tokenizer and worker tells the router it is alive
    heartbeat_timeout_s: float = 5.0  # a process silent this long is unhealthy; its requests end
    progress_timeout_s: float = 300.0  # no new output this long (not queued): it ends; 0: never

    def __post_init__(self) -> None:
        check_value(
            is_int(self.max_restarts) and self.max_restarts >= 0,
            "max_restarts",
            self.max_restarts,
            "an integer >= 0 (0: never restart)",
        )
        for key in ("restart_window_s", "heartbeat_interval_s", "heartbeat_timeout_s"):
            value = getattr(self, key)
            check_value(is_number(value) and value > 0, key, value, "a number > 0")
        for key in ("restart_backoff_s", "progress_timeout_s"):
            value = getattr(self, key)
            check_value(is_number(value) and value >= 0, key, value, "a number >= 0")
        check_value(
            self.heartbeat_timeout_s >= 2 * self.heartbeat_interval_s,
            "heartbeat_timeout_s",
            self.heartbeat_timeout_s,
            f"at least twice heartbeat_interval_s={self.heartbeat_interval_s!r} "
            "(one late heartbeat must not look like a dead process)",
        )
