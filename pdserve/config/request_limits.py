"""Size limits on one HTTP request and on the router's load, set in the topology's `router.limits`.

They keep one client from slowing or failing the others: the router refuses what is over a limit
before any tokenizer or worker sees it (413 for the body, 429 when the router is full, 400 for the
rest), and the tokenizer enforces `max_prompt_tokens` while it tokenizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Batch API lines running at once, all batches together. Measured on an H200 (Llama-1B shape,
# 1P1D, docs/BENCHMARKS.md): online TTFT p50 with a batch running was 1.02x idle at 8 lines and
# 4.8x at 64 (the router and tokenizer stream every running line's tokens).
DEFAULT_MAX_RUNNING_BATCH_LINES = 8


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 16 * 2**20  # HTTP body; 413 above
    max_prompt_chars: int = 1_000_000  # one prompt's text, or all its messages' content
    max_prompt_tokens: int = 0  # 0: the model's context length (the tokenizer checks it)
    max_prompts: int = 1024  # prompts in one request (a completions or /generate list)
    max_choices: int = 1024  # n x prompts: sub-requests of one request
    max_stop_strings: int = 32  # per request (OpenAI itself allows 4)
    max_stop_chars: int = 256  # per stop string
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024  # logit_bias entries
    # One JSON schema, regex or EBNF grammar's text. xgrammar's compile grows faster than the
    # text (an object of n optional properties: 2.5 s at 67 K characters, 14 s at 237 K on one
    # CPU core, benchmarks/grammar_limits.py) and a worker compiles on one thread, so one huge
    # schema would hold every later constrained request back.
    max_grammar_chars: int = 65536
    max_in_flight: int = 4096  # sub-requests queued or running in the cluster; 429 above
    retry_after_s: int = 1  # the 429's Retry-After header

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            minimum = 0 if f.name == "max_prompt_tokens" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"limits.{f.name}={value!r} is invalid: expected an integer >= {minimum}"
                )

    @classmethod
    def from_dict(cls, d: Any) -> RequestLimits:
        """From the topology's `limits:` mapping (or an instance); unknown keys refused."""
        if isinstance(d, RequestLimits):
            return d
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"limits: expected a mapping of limit names to integers, got {d!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"limits: unknown key(s) {unknown}: expected some of {known}")
        return cls(**d)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
