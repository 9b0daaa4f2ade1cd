"""Speculative decoding options, under SGLang's names (`speculative_*`).

`speculative_algorithm`: None (off), "NGRAM" (drafts copied from earlier text of the same request,
no draft model) or "EAGLE" (an EAGLE-2 draft head, `speculative_draft_model_path`). Each verify pass
feeds a row its last token plus up to `speculative_num_draft_tokens - 1` draft tokens; EAGLE drafts
them in `speculative_num_steps` steps of `speculative_eagle_topk` candidates each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ALGORITHMS = ("NGRAM", "EAGLE")


@dataclass(frozen=True)
class SpeculativeConfig:
    """One worker's speculation settings; `enabled` when an algorithm is set."""

    speculative_algorithm: str | None = None  # None | "NGRAM" | "EAGLE"
    speculative_draft_model_path: str | None = None  # EAGLE: the draft head's directory
    speculative_num_steps: int = 3  # EAGLE: draft depth
    speculative_eagle_topk: int = 1  # EAGLE: candidates per step (1: a chain; > 1: a tree)
    speculative_num_draft_tokens: int = 4  # tokens per row per verify pass, the last one included
    speculative_ngram_min_match_window_size: int = 1  # NGRAM: shortest suffix looked up
    speculative_ngram_max_match_window_size: int = 12  # NGRAM: longest suffix looked up

    def __post_init__(self) -> None:
        algo = self.speculative_algorithm
        if algo is not None and algo not in ALGORITHMS:
            raise ValueError(
                f"speculative_algorithm={algo!r} is not supported: expected one of "
                f"{list(ALGORITHMS)} or None"
            )
        for key in (
            "speculative_num_steps",
            "speculative_eagle_topk",
            "speculative_num_draft_tokens",
            "speculative_ngram_min_match_window_size",
            "speculative_ngram_max_match_window_size",
        ):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1")
        if self.speculative_num_draft_tokens < 2 and algo is not None:
            raise ValueError(
                f"speculative_num_draft_tokens={self.speculative_num_draft_tokens} is invalid: "
                "expected >= 2 (the row's last token and at least one draft)"
            )
        if (
            self.speculative_ngram_min_match_window_size
            > self.speculative_ngram_max_match_window_size
        ):
            raise ValueError(
                "speculative_ngram_min_match_window_size="
                f"{self.speculative_ngram_min_match_window_size} is invalid: expected <= "
                f"speculative_ngram_max_match_window_size="
                f"{self.speculative_ngram_max_match_window_size}"
            )
        if algo == "EAGLE":
            if not self.speculative_draft_model_path:
                raise ValueError(
                    "speculative_draft_model_path is required with speculative_algorithm='EAGLE'"
                )
        elif self.speculative_draft_model_path is not None:
            raise ValueError(
                f"speculative_draft_model_path={self.speculative_draft_model_path!r} needs "
                "speculative_algorithm='EAGLE'"
            )

    @property
    def enabled(self) -> bool:
        return self.speculative_algorithm is not None

    @property
    def num_drafts(self) -> int:
        """Most draft tokens one row carries into a verify pass."""
        if self.speculative_algorithm == "EAGLE":
            return min(self.speculative_num_steps, self.speculative_num_draft_tokens - 1)
        return self.speculative_num_draft_tokens - 1

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SpeculativeConfig:
        """From flat options (CLI, Engine(...), the topology's `speculative:` section, whose keys
        may leave out the `speculative_` prefix); None values are unset."""
        given = {_full_key(k): v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(SPECULATIVE_KEYS))
        if unknown:
            raise ValueError(
                f"unknown speculative option(s) {unknown}: expected some of {list(SPECULATIVE_KEYS)}"
            )
        algo = given.get("speculative_algorithm")
        if isinstance(algo, str):
            given["speculative_algorithm"] = algo.upper()
        return cls(**given)


SPECULATIVE_KEYS = tuple(f.name for f in fields(SpeculativeConfig))


def _full_key(key: str) -> str:
    return key if key.startswith("speculative_") else f"speculative_{key}"
