"""What has been received for one choice (one sub-request): the `ReqOutput` deltas summed up.

It imports nothing but the protocol, so the in-process Engine keeps the same record the router does
and shapes it with the same functions (`generate_result.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.protocol import Finish, ReqOutput


@dataclass
class ChoiceState:
    """Everything received so far for one choice (one sub-request)."""

    index: int
    rid: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)  # per token: [[id, lp]..]
    token_texts: list[str] = field(default_factory=list)
    top_token_texts: list[list[str]] = field(default_factory=list)  # per token: its top ids' texts
    finish: Finish | None = None
    error: str | None = None
    prompt_text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    spec_verify_ct: int = 0  # speculative verify passes (SGLang's meta_info name)
    hidden_states: list[list[float]] = field(default_factory=list)  # prompt rows, then outputs
    input_token_logprobs: list[list[Any]] | None = None  # SGLang's [logprob|None, id, text]
    input_top_logprobs: list[Any] | None = None
    embedding: list[float] | None = None  # an embedding / score request's result

    def add(self, out: ReqOutput) -> None:
        self.text += out.text_delta
        self.output_ids.extend(out.output_ids)
        self.logprobs.extend(out.logprobs or ())
        self.top_logprobs.extend(out.top_logprobs or ())
        self.token_texts.extend(out.token_texts or ())
        self.top_token_texts.extend(out.top_token_texts or ())
        if out.prompt_text is not None:
            self.prompt_text = out.prompt_text
        self.prompt_tokens = max(self.prompt_tokens, out.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        self.spec_verify_ct = max(self.spec_verify_ct, out.spec_verify_ct)
        self.completion_tokens = max(out.completion_tokens, len(self.output_ids))
        self.finish = out.finish if out.finish is not None else self.finish
        self.error = out.error if out.error is not None else self.error
        self.hidden_states.extend(out.hidden_states or ())
        if out.input_token_logprobs is not None:
            self.input_token_logprobs = out.input_token_logprobs
            self.input_top_logprobs = out.input_top_logprobs
        if out.embedding is not None:
            self.embedding = out.embedding

    def final_output(self) -> ReqOutput:
        """An output carrying just the choice's end (finish or error), for `failure_of`."""
        return ReqOutput(self.rid, "", [], self.finish, error=self.error)
