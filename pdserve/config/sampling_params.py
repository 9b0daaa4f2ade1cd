"""Per-request sampling parameters, in SGLang's names, validated once where they enter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_EPS = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # <= 1e-6 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL: divides positive logits of seen tokens
    frequency_penalty: float = 0.0  # OpenAI: minus count * penalty (generated tokens)
    presence_penalty: float = 0.0  # OpenAI: minus penalty if generated at least once
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{key}={getattr(self, key)!r} is invalid: expected {expected}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"<= max_new_tokens={self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "a number in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a number in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (-1, 0)):
            raise bad("top_k", "-1 (off) or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "a number in (0, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "a number in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "a number in [-2, 2]")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise bad("n", "an integer in [1, 128]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= _EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """From a request's JSON dict; unknown keys are refused with their names."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}")
        d = {k: v for k, v in d.items() if v is not None}
        if isinstance(d.get("stop"), str):
            d["stop"] = (d["stop"],)
        for key in ("stop", "stop_token_ids"):
            if key in d:
                d[key] = tuple(d[key])
        if "logit_bias" in d:
            d["logit_bias"] = {int(k): float(v) for k, v in d["logit_bias"].items()}
        for key in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
                d[key] = float(d[key])
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return d
