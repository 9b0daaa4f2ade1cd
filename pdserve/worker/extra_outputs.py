"""What a request asks for beyond its sampled tokens, recorded from the forward passes that
compute it: final-layer hidden states (every prompt token, then every generated token that is fed
back) and the prompt's token logprobs from `logprob_start_len` (SGLang's `/generate` options).

Who computes what, prefill + decode: the prefill worker computes the prompt rows and sends them to
the tokenizer with the first token (the tokenizer orders pieces by token index, so they always
come first); the decode worker starts at position len(prompt) and sends a generated token's hidden
state with the next token. A mixed worker does both. The hidden state of the last generated token
is never computed (it is never fed back), as in SGLang.

The prefix cache must not skip positions whose outputs are wanted: `first_needed_position` caps
how much of a cached prefix a request may reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

TopLogprobs = list[list[float]]  # [[token_id, logprob], ...], most likely first


class PromptLogprob(NamedTuple):
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing precedes it)
    top: TopLogprobs  # [] for the first prompt token


@dataclass
class ExtraOutputs:
    """Held in Request.outputs on every worker that computes a part of it."""

    return_hidden_states: bool = False
    logprob_start_len: int = -1  # first prompt token with an input logprob; -1: none
    top_logprobs_num: int = 0
    num_hidden_sent: int = 0  # positions whose hidden state went out (decode: len(prompt))
    is_prompt_sent: bool = False  # input logprobs went out (decode: nothing to send)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> [hidden] f32 cpu
    input_logprobs: dict[int, PromptLogprob] = field(default_factory=dict)  # by prompt index

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob_start_len >= 0 and not self.is_prompt_sent

    @property
    def wants_rows(self) -> bool:
        """The next forward pass must read out every new token's hidden state for this one."""
        return self.return_hidden_states or self.wants_input_logprobs

    def first_needed_position(self) -> int | None:
        """The first prompt position whose output is wanted (reuse no cached KV past it)."""
        if self.return_hidden_states and self.num_hidden_sent == 0:
            return 0
        if self.wants_input_logprobs:
            return max(self.logprob_start_len - 1, 0)  # token i's logprob comes from row i - 1
        return None

    def record(
        self,
        rows: torch.Tensor,  # [n, hidden] model dtype: final-normed, positions start..start+n-1
        start: int,
        token_ids: list[int],  # the request's prompt + output ids
        prompt_len: int,
        compute_logits: object,  # Callable[[Tensor], Tensor]: [m, hidden] -> [m, V] float32
    ) -> None:
        if self.return_hidden_states:
            first = max(start, self.num_hidden_sent)  # recomputed rows already sent are kept
            kept = rows[first - start :].float().cpu()
            for i in range(kept.shape[0]):
                self.hidden[first + i] = kept[i]
        if self.wants_input_logprobs:
            self._record_input_logprobs(rows, start, token_ids, prompt_len, compute_logits)

    def _record_input_logprobs(
        self,
        rows: torch.Tensor,
        start: int,
        token_ids: list[int],
        prompt_len: int,
        compute_logits: object,
    ) -> None:
        """Prompt token i's logprob is log_softmax(logits of row i - 1)[token i]."""
        lo = max(start, self.logprob_start_len - 1, 0)
        hi = min(start + rows.shape[0], prompt_len - 1)  # the last row predicts the output
        if self.logprob_start_len == 0 and start == 0:
            self.input_logprobs[0] = PromptLogprob(token_ids[0], None, [])
        if hi <= lo:
            return
        logprobs = torch.log_softmax(compute_logits(rows[lo - start : hi - start]), dim=-1)
        next_ids = torch.tensor(token_ids[lo + 1 : hi + 1], device=logprobs.device)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
        tops: list[TopLogprobs] = [[] for _ in chosen]
        if self.top_logprobs_num > 0:
            k = min(self.top_logprobs_num, logprobs.shape[-1])
            values, ids = logprobs.topk(k, dim=-1)
            tops = [
                [[int(t), float(v)] for t, v in zip(row_ids, row_vals)]
                for row_ids, row_vals in zip(ids.tolist(), values.tolist())
            ]
        for j, (lp, top) in enumerate(zip(chosen, tops)):
            index = lo + 1 + j
            self.input_logprobs[index] = PromptLogprob(token_ids[index], float(lp), top)

    def take_hidden(self, num_computed: int) -> list[list[float]]:
        """The hidden states computed and not yet sent, in position order."""
        out: list[list[float]] = []
        while self.num_hidden_sent < num_computed and self.num_hidden_sent in self.hidden:
            out.append(self.hidden.pop(self.num_hidden_sent).tolist())
            self.num_hidden_sent += 1
        return out

    def take_input_logprobs(self, prompt_len: int) -> list[PromptLogprob] | None:
        """Every prompt token's entry from logprob_start_len, once all are computed."""
        if not self.wants_input_logprobs:
            return None
        wanted = range(min(self.logprob_start_len, prompt_len), prompt_len)
        if any(i not in self.input_logprobs for i in wanted):
            return None
        self.is_prompt_sent = True
        entries = [self.input_logprobs.pop(i) for i in wanted]
        self.input_logprobs.clear()
        return entries
