"""What the launcher hands each child process: a tokenizer's or a worker's whole setup, typed.

Specs cross the process boundary as msgpack-able dicts (`to_dict`/`from_dict`, round-trip tested);
inside a process they are frozen dataclasses. Defaults live in the topology sections and
`EngineConfig`, never here a second time: the launcher always fills every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.lora_config import LoraConfig
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.config.topology_sections import FaultInjectionConfig, SupervisionConfig

Role = Literal["prefill", "decode", "mixed"]
_ROLES = ("prefill", "decode", "mixed")


def _bad(what: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{what}: {key}={value!r} is invalid: expected {expected}")


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}")


@dataclass(frozen=True)
class KVTransferSpec:
    """How a worker moves KV pages. A decode worker binds `address` (tcp/nccl), advertising `host`."""

    backend: str  # resolved: tcp | cuda_ipc | nccl
    timeout_s: float
    address: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """One prefill, decode or mixed worker process."""

    name: str
    role: Role
    idx: int  # prefill workers 0..; decode-side (decode, mixed) workers 0..
    engine: EngineConfig
    inbox: str  # the address this worker binds
    tokenizer_inboxes: tuple[str, ...]
    kv: KVTransferSpec
    report_interval_s: float = 0.2  # how often it sends the router a LoadReport
    router_inbox: str | None = None
    launcher_inbox: str | None = None
    decode_inboxes: tuple[str, ...] = ()  # decode-side workers, by idx (a prefill pushes to them)
    prefill_inboxes: tuple[str, ...] = ()  # prefill workers, by idx (a decode asks them)
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)  # tests
    heartbeat_interval_s: float = SupervisionConfig.heartbeat_interval_s  # to the router

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise _bad(f"worker {self.name}", "role", self.role, f"one of {_ROLES}")
        if self.idx < 0:
            raise _bad(f"worker {self.name}", "idx", self.idx, "an integer >= 0")
        if self.report_interval_s <= 0:
            raise _bad(f"worker {self.name}", "report_interval_s", self.report_interval_s, "> 0")
        if self.heartbeat_interval_s <= 0:
            what = f"worker {self.name}"
            raise _bad(what, "heartbeat_interval_s", self.heartbeat_interval_s, "> 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerSpec:
        _check_keys(cls, d, "worker spec")
        _check_keys(KVTransferSpec, d["kv"], "worker spec: kv")
        faults = d.get("fault_injection", {})
        _check_keys(FaultInjectionConfig, faults, "worker spec: fault_injection")
        return cls(
            **{
                **d,
                "engine": engine_config_from_dict(d["engine"]),
                "kv": KVTransferSpec(**d["kv"]),
                "fault_injection": FaultInjectionConfig(**faults),
                "tokenizer_inboxes": tuple(d["tokenizer_inboxes"]),
                "decode_inboxes": tuple(d.get("decode_inboxes", ())),
                "prefill_inboxes": tuple(d.get("prefill_inboxes", ())),
            }
        )


def engine_config_from_dict(d: dict[str, Any]) -> EngineConfig:
    """The inverse of dataclasses.asdict(EngineConfig): how a worker's settings travel to a child
    process (msgpack, never pickle)."""
    engine = dict(d)
    _check_keys(EngineConfig, engine, "worker spec: engine")
    engine["scheduler"] = SchedulerConfig(**engine["scheduler"])
    engine["lora"] = LoraConfig.from_options(engine.get("lora") or {})
    engine["speculative"] = SpeculativeConfig.from_options(engine.get("speculative") or {})
    return EngineConfig(**engine)


@dataclass(frozen=True)
class TokenizerSpec:
    """One tokenizer process: replica `idx` of the cluster's tokenizers."""

    name: str
    idx: int
    model_path: str
    inbox: str  # the address this process binds
    router_inbox: str
    worker_inboxes: tuple[str, ...]  # decode-side workers, by idx (router.membership: none)
    max_context_len: int  # 0: the model's own limit
    launcher_inbox: str | None = None
    trust_remote_code: bool = False
    heartbeat_interval_s: float = SupervisionConfig.heartbeat_interval_s  # to the router
    chat_template: str | None = None  # Jinja text used instead of the model's own
    # A vision-language model's per-request limits (ImageLimits, VideoLimits fields); None: theirs
    image_limits: dict[str, Any] | None = None
    video_limits: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.idx < 0:
            raise _bad(f"tokenizer {self.name}", "idx", self.idx, "an integer >= 0")
        if self.heartbeat_interval_s <= 0:
            what = f"tokenizer {self.name}"
            raise _bad(what, "heartbeat_interval_s", self.heartbeat_interval_s, "> 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerSpec:
        _check_keys(cls, d, "tokenizer spec")
        return cls(**{**d, "worker_inboxes": tuple(d["worker_inboxes"])})
