"""Reading a topology: the YAML mapping checked key by key into the sections' dataclasses,
`for_model`'s options merged into such a mapping, and the model's head counts from config.json.

Every error names its key path (`decode[1].gpus`, `router.port`). `Topology` (topology.py) calls
these with its own field names, so this module does not import it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pdserve.config.engine_config import SCHEDULER_KEYS, SchedulerConfig
from pdserve.config.lora_config import LORA_KEYS, LoraConfig
from pdserve.config.speculative_config import SPECULATIVE_KEYS
from pdserve.config.topology_sections import (
    FaultInjectionConfig,
    KVTransferConfig,
    NodeConfig,
    RouterConfig,
    SecurityConfig,
    SupervisionConfig,
    TokenizerConfig,
    WorkerConfig,
    check_value,
    is_int,
)

FOR_MODEL_MODES = ("pd", "mixed")

_SECTIONS: dict[str, type] = {
    "router": RouterConfig,
    "tokenizer": TokenizerConfig,
    "kv_transfer": KVTransferConfig,
    "scheduler": SchedulerConfig,
    "security": SecurityConfig,
    "fault_injection": FaultInjectionConfig,
    "supervision": SupervisionConfig,
}

# Flat for_model() options (CLI flags, Engine keyword arguments) -> (section, key).
_FLAT_OVERRIDES: dict[str, tuple[str, str]] = (
    {
        "host": ("router", "host"),
        "port": ("router", "port"),
        "api_key": ("router", "api_key"),
        "routing_policy": ("router", "routing_policy"),
        "tokenizer_replicas": ("tokenizer", "replicas"),
        "kv_transfer_backend": ("kv_transfer", "backend"),
        "kv_transfer_timeout_s": ("kv_transfer", "timeout_s"),
    }
    | {key: ("scheduler", key) for key in SCHEDULER_KEYS}
    | {key: ("lora", key) for key in LORA_KEYS}
)


def topology_fields(data: Any, field_names: list[str]) -> dict[str, Any]:
    """`Topology(**...)`'s arguments from a topology mapping: unknown keys refused, each section
    built into its dataclass."""
    d = dict(_mapping(data, "topology"))
    _refuse_unknown(d, field_names, "topology")
    if "model" not in d:
        raise ValueError("model: missing: expected a Hugging Face model directory")
    for key, section in _SECTIONS.items():
        if key in d:
            d[key] = _build(section, d[key], key)
    if "lora" in d:
        d["lora"] = _build_lora(d["lora"])
    for key in ("prefill", "decode", "mixed"):
        if key in d:
            d[key] = tuple(_build(WorkerConfig, w, f"{key}[{i}]") for i, w in _items(d, key))
    for i, w in enumerate(d.get("prefill") or ()):
        if w.speculative.enabled:
            raise ValueError(
                f"prefill[{i}].speculative: speculative decoding runs on decode and mixed "
                "workers: expected none on a prefill worker"
            )
    if "nodes" in d:
        d["nodes"] = tuple(_build(NodeConfig, n, f"nodes[{i}]") for i, n in _items(d, "nodes"))
    return d


def for_model_fields(
    model_path: str | Path, mode: str, field_names: list[str], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The topology mapping of `Topology.for_model` (see there for `mode` and `overrides`)."""
    check_value(mode in FOR_MODEL_MODES, "mode", mode, f"one of {list(FOR_MODEL_MODES)}")
    d: dict[str, Any] = {"model": str(model_path)}
    if mode == "mixed":
        d["mixed"] = [{}]
    top_keys = set(field_names) - {"model"}
    allowed = sorted(top_keys | set(_FLAT_OVERRIDES) | {"tp_size"} | set(SPECULATIVE_KEYS))
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: expected some of {allowed}")
    if isinstance(given.get("kv_transfer"), str):  # kv_transfer="tcp": the backend
        given["kv_transfer"] = {"backend": given["kv_transfer"]}
    for key, value in given.items():
        if key in top_keys:
            merge = key in _SECTIONS and isinstance(value, dict)
            d[key] = {**d.get(key, {}), **value} if merge else value
    tp_size = given.pop("tp_size", None)
    if tp_size is not None:  # every worker of the mode gets tp_size ranks
        roles = ("mixed",) if mode == "mixed" else ("prefill", "decode")
        for role in roles:
            d[role] = [{"tp": tp_size}]
    speculative = {k: given.pop(k) for k in SPECULATIVE_KEYS if k in given}
    if speculative:  # the decode-side worker speculates
        if mode == "pd":
            d.setdefault("prefill", [{}])
        side = "mixed" if mode == "mixed" else "decode"
        d[side] = [{**w, "speculative": speculative} for w in d.get(side, [{}])]
    for key, value in given.items():
        if key in _FLAT_OVERRIDES:
            section, sub = _FLAT_OVERRIDES[key]
            d[section] = {**d.get(section, {}), sub: value}
    return d


def _mapping(data: Any, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {data!r}")
    return data


def _items(d: dict[str, Any], key: str) -> list[tuple[int, Any]]:
    value = d[key]
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: expected a list, got {value!r}")
    return list(enumerate(value))


def _refuse_unknown(d: dict[str, Any], allowed: Any, path: str) -> None:
    unknown = sorted(set(d) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}: expected some of {sorted(allowed)}")


def _build(cls: type, data: Any, path: str) -> Any:
    """`cls(**data)` with unknown keys refused and errors prefixed by the key path."""
    d = _mapping(data, path)
    allowed = (
        SCHEDULER_KEYS if cls is SchedulerConfig else [f.name for f in dataclasses.fields(cls)]
    )
    _refuse_unknown(d, allowed, path)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in d:
            raise ValueError(f"{path}.{key}: missing")
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{path}.{e}") from None


def _build_lora(data: Any) -> LoraConfig:
    """The `lora:` section (LoRA's option names), errors prefixed by the key path."""
    d = _mapping(data, "lora")
    _refuse_unknown(d, LORA_KEYS, "lora")
    try:
        return LoraConfig.from_options(d)
    except ValueError as e:
        raise ValueError(f"lora: {e}") from None


def read_num_heads(model: str) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) from the model's config.json."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"model={model!r} is invalid: expected a Hugging Face model directory with a "
            "config.json"
        )
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read {config_file}: {e}") from None
    if isinstance(hf, dict) and isinstance(hf.get("text_config"), dict):  # a VLM's decoder
        hf = {**hf, **hf["text_config"]}
    num_heads = hf.get("num_attention_heads") if isinstance(hf, dict) else None
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"model: {config_file} has no valid num_attention_heads")
    num_kv_heads = hf.get("num_key_value_heads") or num_heads
    if not is_int(num_kv_heads) or num_kv_heads < 1:
        raise ValueError(f"model: {config_file} has an invalid num_key_value_heads")
    return num_heads, num_kv_heads
