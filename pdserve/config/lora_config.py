"""LoRA serving options (SGLang's names): which adapters load at start, and the slot pool's size.

`lora_paths` entries are `NAME=PATH` or a bare `PATH` (named by its folder). LoRA is on when any
option is given; the worker then preallocates `max_loras_per_batch` adapter slots per target
module, each `max_lora_rank` wide (see worker/lora/lora_weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The projections pdserve's Llama-family decoder can adapt, in PEFT's (checkpoint) names.
LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
LORA_KEYS = ("lora_paths", "max_loras_per_batch", "max_lora_rank", "lora_target_modules")


@dataclass(frozen=True)
class LoraRef:
    """One adapter to load: the name requests use, and its PEFT directory."""

    name: str
    path: str

    @classmethod
    def parse(cls, entry: str | Mapping[str, str]) -> LoraRef:
        """`NAME=PATH`, a bare `PATH` (named by its folder), or {name, path}."""
        if isinstance(entry, Mapping):
            if set(entry) != {"name", "path"}:
                raise ValueError(
                    f"lora_paths entry {dict(entry)!r} is invalid: expected keys name and path"
                )
            return cls(str(entry["name"]), str(entry["path"]))
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"lora_paths entry {entry!r} is invalid: expected NAME=PATH or PATH")
        name, sep, path = entry.partition("=")
        if not sep:
            return cls(Path(entry.rstrip("/")).name, entry)
        if not name or not path:
            raise ValueError(f"lora_paths entry {entry!r} is invalid: expected NAME=PATH or PATH")
        return cls(name, path)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA options of one worker; `enabled` when any is given."""

    lora_paths: tuple[LoraRef, ...] = ()
    max_loras_per_batch: int = 8  # adapter slots on the device; distinct adapters per batch
    max_lora_rank: int | None = None  # None: the largest rank among lora_paths (16 if none)
    lora_target_modules: tuple[str, ...] | None = None  # None: the union of lora_paths' targets

    def __post_init__(self) -> None:
        names = [ref.name for ref in self.lora_paths]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"lora_paths names {dup} appear twice: expected distinct names")
        if self.max_loras_per_batch < 1:
            raise ValueError(
                f"max_loras_per_batch={self.max_loras_per_batch!r} is invalid: expected >= 1"
            )
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={self.max_lora_rank!r} is invalid: expected >= 1")
        bad = [m for m in self.lora_target_modules or () if m not in LORA_TARGET_MODULES]
        if bad:
            raise ValueError(
                f"lora_target_modules {bad} are not supported: expected some of "
                f"{list(LORA_TARGET_MODULES)} (or 'all')"
            )

    @property
    def enabled(self) -> bool:
        return (
            bool(self.lora_paths)
            or self.max_lora_rank is not None
            or bool(self.lora_target_modules)
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LoraConfig:
        """From flat options (CLI, Engine(...), the topology's `lora:` section); None = unset."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(LORA_KEYS))
        if unknown:
            raise ValueError(
                f"unknown LoRA option(s) {unknown}: expected some of {list(LORA_KEYS)}"
            )
        out: dict[str, Any] = {}
        if "lora_paths" in given:
            out["lora_paths"] = tuple(LoraRef.parse(e) for e in _entries(given["lora_paths"]))
        if "lora_target_modules" in given:
            mods = tuple(given["lora_target_modules"])
            out["lora_target_modules"] = LORA_TARGET_MODULES if "all" in mods else mods
        for key in ("max_loras_per_batch", "max_lora_rank"):
            if key in given:
                out[key] = int(given[key])
        return cls(**out)


def _entries(paths: Any) -> Iterable[Any]:
    """lora_paths as a list of entries: a list, a {name: path} mapping, or one string."""
    if isinstance(paths, str):
        return [paths]
    if isinstance(paths, Mapping):
        return [f"{name}={path}" for name, path in paths.items()]
    return list(paths)


def lora_names_for(lora_path: Any, num_prompts: int) -> list[str | None]:
    """A request's `lora_path` (one name, a list aligned with the prompts, or None) as one
    adapter name or None per prompt; ValueError naming a misaligned or non-string value."""
    if lora_path is None or isinstance(lora_path, str):
        return [lora_path or None] * num_prompts
    if not isinstance(lora_path, (list, tuple)) or len(lora_path) != num_prompts:
        raise ValueError(
            f"lora_path={lora_path!r} is invalid: expected an adapter name, null, or a list "
            f"of {num_prompts} (one per prompt)"
        )
    bad = [p for p in lora_path if p is not None and not isinstance(p, str)]
    if bad:
        raise ValueError(f"lora_path entry {bad[0]!r} is invalid: expected an adapter name")
    return [p or None for p in lora_path]


def lora_reply(success: bool, error_message: str, loaded: list[str]) -> dict[str, Any]:
    """The body of /load_lora_adapter and /unload_lora_adapter (SGLang's shape)."""
    return {"success": success, "error_message": error_message, "loaded_adapters": list(loaded)}
