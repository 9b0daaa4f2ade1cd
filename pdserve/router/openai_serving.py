"""What chat and completions share: model check, sampling, fan-out into sub-requests, usage,
finish reasons and the two logprobs shapes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pdserve.config.router_spec import RouterSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish, GenerateReq, ReqOutput
from pdserve.router.errors import APIError, bad_request, sampling_error
from pdserve.router.group_reader import ChoiceState
from pdserve.router.openai_models import SamplingFields


@dataclass
class Prompt:
    """One prompt of a request, in the form GenerateReq takes."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    input_ids: list[int] | None = None


@dataclass
class Fanout:
    """The sub-requests of one HTTP request: choice index = prompt_idx * n + i."""

    group_id: str
    reqs: list[GenerateReq]
    route_keys: list[int]  # prompt index: the n copies of a prompt share a route
    n: int
    created: int  # unix seconds, for the response's `created`


def check_model(spec: RouterSpec, model: str | None) -> None:
    if model is None or model in (spec.model_name, spec.model_path):
        return
    raise APIError(
        f"The model `{model}` does not exist. This server serves `{spec.model_name}`.",
        400,
        param="model",
        code="model_not_found",
    )


def sampling_dicts(body: SamplingFields, max_tokens: int | None, default_max: int) -> list[dict]:
    """One validated SamplingParams dict per copy (n); a seeded request gets seed + i."""
    fields = {
        "max_new_tokens": default_max if max_tokens is None else max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "spaces_between_special_tokens": body.spaces_between_special_tokens,
        "no_stop_trim": body.no_stop_trim,
        "logit_bias": body.logit_bias,
        "n": body.n,
    }
    try:
        params = SamplingParams.from_dict(fields)
    except ValueError as e:
        raise sampling_error(e) from None
    out = []
    for i in range(body.n):
        d = params.to_dict()
        d["n"] = 1
        if params.seed is not None:
            d["seed"] = params.seed + i
        out.append(d)
    return out


def fan_out(prompts: list[Prompt], samplings: list[dict], **req_fields: Any) -> Fanout:
    group_id = uuid.uuid4().hex
    n = len(samplings)
    reqs, keys = [], []
    for p_idx, prompt in enumerate(prompts):
        for i, sampling in enumerate(samplings):
            index = p_idx * n + i
            rid = group_id if len(prompts) * n == 1 else f"{group_id}-{index}"
            reqs.append(
                GenerateReq(
                    rid=rid,
                    sampling=sampling,
                    text=prompt.text,
                    messages=prompt.messages,
                    input_ids=prompt.input_ids,
                    **req_fields,
                )
            )
            keys.append(p_idx)
    return Fanout(group_id, reqs, keys, n, int(time.time()))


def usage(choices: list[ChoiceState], n: int) -> dict[str, Any]:
    """OpenAI usage: each prompt counted once (not n times), every completion counted."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt_tokens = sum(c.prompt_tokens for c in firsts)
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
    }


def finish_reason(finish: Finish | None) -> str | None:
    """OpenAI's finish_reason: an abort that reaches a client as a choice reads "stop"."""
    if finish is None:
        return None
    return "length" if finish.kind == "length" else "stop"


def check_logprob_request(top_n: int | None, echo: bool = False) -> None:
    if echo and top_n is not None:
        raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")


def _top_text(token_id: int, chosen_id: int | None, chosen_text: str | None) -> str:
    # ReqOutput carries the text of the chosen token only; an alternative is named by its id
    # (vLLM's `token_id:N` form).
    if chosen_text is not None and token_id == chosen_id:
        return chosen_text
    return f"token_id:{token_id}"


def _token_rows(out: ReqOutput | ChoiceState) -> list[tuple[int, str, float, list]]:
    """(token id, text, logprob, [[id, logprob], ...]) per generated token."""
    texts = list(out.token_texts or ())
    logprobs = list(out.logprobs or ())
    tops = list(out.top_logprobs or ())
    rows = []
    for j, logprob in enumerate(logprobs):
        token_id = out.output_ids[j] if j < len(out.output_ids) else -1
        text = texts[j] if j < len(texts) else f"token_id:{token_id}"
        rows.append((token_id, text, float(logprob), tops[j] if j < len(tops) else []))
    return rows


def chat_logprobs(out: ReqOutput | ChoiceState, top_n: int) -> dict[str, Any]:
    content = []
    for token_id, text, logprob, top in _token_rows(out):
        alternatives = []
        for alt_id, alt_logprob in top[:top_n]:
            alt_text = _top_text(int(alt_id), token_id, text)
            alternatives.append(
                {"token": alt_text, "logprob": float(alt_logprob),
                 "bytes": list(alt_text.encode())}
            )  # fmt: skip
        content.append(
            {"token": text, "logprob": logprob, "bytes": list(text.encode()),
             "top_logprobs": alternatives}
        )  # fmt: skip
    return {"content": content}


def completion_logprobs(
    out: ReqOutput | ChoiceState, top_n: int, text_offset: int
) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs shape, and the text offset after these tokens."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, text, logprob, top in _token_rows(out):
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append({_top_text(int(a), token_id, text): float(lp) for a, lp in top[:top_n]})
        offsets.append(text_offset)
        text_offset += len(text)
    shape = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
    return shape, text_offset
