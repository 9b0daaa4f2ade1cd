"""SGLang's native `/generate` result for one request: `text`, `output_ids` and `meta_info`.

The one place this shape is built: the router's `/generate` route and the in-process Engine both
call `generate_result` on a `ChoiceState`, so the two engines give the same fields and values.
"""

from __future__ import annotations

from typing import Any

from pdserve.router.choice_state import ChoiceState

LogprobEntry = list[Any]  # SGLang's [logprob, token_id, text or None]


def generate_result(
    c: ChoiceState,
    e2e_latency: float,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    return_text_in_logprobs: bool = True,
    return_hidden_states: bool = False,
) -> dict[str, Any]:
    """The result (or, streaming, the cumulative chunk) of one request, as SGLang returns it."""
    meta: dict[str, Any] = {
        "id": c.rid,
        "finish_reason": c.finish.to_api() if c.finish is not None else None,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cached_tokens": c.cached_tokens,
        "e2e_latency": round(e2e_latency, 6),
    }
    if c.spec_verify_ct:  # the request was decoded speculatively (accept length: tokens / this)
        meta["spec_verify_ct"] = c.spec_verify_ct
    if return_logprob:  # top logprobs come with it only, as in SGLang
        meta["input_token_logprobs"] = input_entries(
            c.input_token_logprobs, return_text_in_logprobs
        )
        meta["output_token_logprobs"] = output_token_logprobs(c, return_text_in_logprobs)
        if top_logprobs_num > 0:
            meta["input_top_logprobs"] = [
                input_entries(row, return_text_in_logprobs) if row is not None else None
                for row in c.input_top_logprobs or []
            ]
            meta["output_top_logprobs"] = output_top_logprobs(c, return_text_in_logprobs)
    if return_hidden_states:
        meta["hidden_states"] = hidden_states(c)
    return {"text": c.text, "output_ids": list(c.output_ids), "meta_info": meta}


def input_entries(entries: list[LogprobEntry] | None, with_text: bool) -> list[LogprobEntry]:
    """Prompt entries [logprob|None, id, text] (from logprob_start_len), texts None unless asked."""
    return [[lp, tid, text if with_text else None] for lp, tid, text in entries or []]


def hidden_states(c: ChoiceState) -> list[Any]:
    """SGLang's shape: the prompt's rows as the first entry, then one row per fed output token."""
    rows = c.hidden_states
    if not rows:
        return []
    return [rows[: c.prompt_tokens], *rows[c.prompt_tokens :]]


def output_token_logprobs(c: ChoiceState, with_text: bool) -> list[LogprobEntry]:
    """One [logprob, id, text] per generated token; text None unless asked for (and known)."""
    texts = c.token_texts if with_text else []
    return [[float(lp), _at(c.output_ids, j), _at(texts, j)] for j, lp in enumerate(c.logprobs)]


def output_top_logprobs(c: ChoiceState, with_text: bool) -> list[list[LogprobEntry]]:
    """Per generated token, its alternatives as [logprob, id, text], most likely first."""
    texts = c.top_token_texts if with_text else []
    return [
        [[float(lp), int(tid), _at(_at(texts, j) or [], k)] for k, (tid, lp) in enumerate(row)]
        for j, row in enumerate(c.top_logprobs)
    ]


def _at(items: list[Any], i: int) -> Any:
    return items[i] if i < len(items) else None


def encode_result(c: ChoiceState, e2e_latency: float) -> dict[str, Any]:
    """One input's result, as SGLang's /encode and Engine.encode return it."""
    meta = {
        "id": c.rid,
        "finish_reason": c.finish.to_api() if c.finish is not None else None,
        "prompt_tokens": c.prompt_tokens,
        "cached_tokens": c.cached_tokens,
        "e2e_latency": round(e2e_latency, 6),
    }
    return {"embedding": list(c.embedding or []), "meta_info": meta}
