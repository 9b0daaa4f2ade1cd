"""What chat and completions share: model check, sampling, fan-out into sub-requests, usage,
finish reasons, the two logprobs shapes and a choice's hidden state."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from pdserve.config.router_spec import RouterSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish, GenerateReq, ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.errors import APIError, bad_request, sampling_error
from pdserve.router.generate_result import hidden_states
from pdserve.router.openai_models import ResponseFormat, SamplingFields
from pdserve.router.tool_calls import ToolPlan
from pdserve.tokenizer_proc.chat_template import check_template_kwargs


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
    tool_plan: ToolPlan | None = None  # chat with tools: how the choices' calls are read
    reasoning_parser: str | None = None  # chat: how the answers' <think> part is told apart


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
        "no_stop_trim": _no_stop_trim(body),
        "logit_bias": body.logit_bias,
        "n": body.n,
        **_grammar_fields(body),
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


def _no_stop_trim(body: SamplingFields) -> bool:
    """Whether a matched stop string stays in the text: SGLang's no_stop_trim or vLLM's
    include_stop_str_in_output (a 400 when both are given and differ)."""
    vllm = body.include_stop_str_in_output
    if vllm is None:
        return body.no_stop_trim
    if "no_stop_trim" in body.model_fields_set and body.no_stop_trim != vllm:
        raise bad_request(
            "no_stop_trim and include_stop_str_in_output disagree: give one",
            "include_stop_str_in_output",
        )
    return vllm


def _grammar_fields(body: SamplingFields) -> dict[str, Any]:
    """The constraint on the output as SamplingParams takes it, from whichever field the client
    used: OpenAI's `response_format` (a JSON schema, any JSON object, a structural tag), SGLang's
    `json_schema`, `regex`, `ebnf`, or vLLM's `guided_json`, `guided_regex`, `guided_choice`
    (any one of the strings), `guided_grammar` and `structured_outputs`. Two of them: a 400
    naming the second."""
    given: list[tuple[str, str, Any]] = []  # (the request's field, SamplingParams key, value)
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        given.append(("response_format", *_response_format_constraint(fmt)))
    for name in ("json_schema", "regex", "ebnf"):
        if getattr(body, name) is not None:
            given.append((name, name, getattr(body, name)))
    vllm = {"guided_json": ("json_schema", body.guided_json),
            "guided_regex": ("regex", body.guided_regex),
            "guided_choice": ("regex", _choice_regex(body.guided_choice)),
            "guided_grammar": ("ebnf", body.guided_grammar)}  # fmt: skip
    for name, (key, value) in vllm.items():
        if value is not None:
            given.append((name, key, value))
    so = body.structured_outputs
    if so is not None:
        asked = [(key, value) for key, value in (
            ("json_schema", so.json_), ("regex", so.regex), ("regex", _choice_regex(so.choice)),
            ("ebnf", so.grammar), ("json_object", so.json_object or None),
            ("structural_tag", so.structural_tag),
        ) if value is not None]  # fmt: skip
        if len(asked) != 1:
            raise bad_request(
                "structured_outputs: expected exactly one of json, regex, choice, grammar, "
                "json_object, structural_tag",
                "structured_outputs",
            )
        given.append(("structured_outputs", *asked[0]))
    if len(given) > 1:
        raise bad_request(
            f"{given[0][0]} and {given[1][0]} are both set: expected one constraint per request",
            given[1][0],
        )
    return {given[0][1]: given[0][2]} if given else {}


def _response_format_constraint(fmt: ResponseFormat) -> tuple[str, Any]:
    """(SamplingParams key, value) of a response_format that is not plain text."""
    if fmt.type == "json_object":
        return "json_object", True
    if fmt.type == "structural_tag":
        if (fmt.format is not None) == (fmt.structures is not None or fmt.triggers is not None):
            raise bad_request(
                "response_format of type 'structural_tag' needs 'structures' and 'triggers', "
                "or 'format'",
                "response_format",
            )
        return "structural_tag", json.dumps(fmt.structural_tag())
    if fmt.json_schema is None:
        raise bad_request(
            "response_format.json_schema is required when response_format.type is 'json_schema'",
            "response_format",
        )
    return "json_schema", json.dumps(fmt.json_schema.schema_)


_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}/")


def _choice_regex(choices: list[str] | None) -> str | None:
    """A regex matching exactly one of `choices` (vLLM's guided_choice), or None."""
    if choices is None:
        return None
    escaped = ("".join("\\" + c if c in _REGEX_SPECIAL else c for c in s) for s in choices)
    return "(" + "|".join(escaped) + ")"


def truncation(value: int | None) -> int:
    """GenerateReq.truncate_prompt_tokens of vLLM's `truncate_prompt_tokens` (None: 0, keep all);
    0 is refused (vLLM takes -1, the context length, or a count >= 1)."""
    if value == 0:
        raise bad_request(
            "truncate_prompt_tokens=0 is invalid: expected -1 (the context length) or >= 1",
            "truncate_prompt_tokens",
        )
    return value or 0


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


def usage_so_far(body: SamplingFields, states: list[ChoiceState], n: int) -> dict[str, Any]:
    """A streamed chunk's `usage` entry: the counts so far under vLLM's continuous_usage_stats
    (an empty dict otherwise, and before the prompt's count is known: `usage: null` stays)."""
    if not body.continuous_usage or not any(s.prompt_tokens for s in states):
        return {}
    return {"usage": usage(states, n)}


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request's `chat_template_kwargs`, checked (400 naming it); None when empty."""
    try:
        return check_template_kwargs(kwargs) or None
    except ValueError as e:
        raise bad_request(str(e), "chat_template_kwargs") from None


def finish_reason(finish: Finish | None) -> str | None:
    """OpenAI's finish_reason: an abort that reaches a client as a choice reads "stop"."""
    if finish is None:
        return None
    return "length" if finish.kind == "length" else "stop"


def last_hidden_state(c: ChoiceState) -> list[float]:
    """A choice's `hidden_states` as SGLang's OpenAI routes give it: the final-layer state of the
    last token fed to the model, i.e. the last entry of /generate's `meta_info.hidden_states`;
    [] when only the prompt ran (a single generated token)."""
    rows = hidden_states(c)
    return rows[-1] if len(rows) > 1 else []


class _TokenRow(NamedTuple):
    """One generated token as both OpenAI logprobs shapes show it."""

    text: str
    logprob: float
    top: list[tuple[str, float]]  # (text, logprob) of each alternative, most likely first


def _name(texts: list[str], j: int, token_id: int) -> str:
    # Without the tokenizer's texts (token in, token out) a token is named by its id, as in vLLM.
    return texts[j] if j < len(texts) else f"token_id:{token_id}"


def _token_rows(out: ReqOutput | ChoiceState, as_ids: bool = False) -> list[_TokenRow]:
    """`as_ids`: every token named by its id ("token_id:N", vLLM's return_tokens_as_token_ids)."""
    texts = [] if as_ids else list(out.token_texts or ())
    tops = list(out.top_logprobs or ())
    top_texts = [] if as_ids else list(out.top_token_texts or ())
    rows = []
    for j, logprob in enumerate(out.logprobs or ()):
        token_id = out.output_ids[j] if j < len(out.output_ids) else -1
        top = tops[j] if j < len(tops) else []
        alt_texts = top_texts[j] if j < len(top_texts) else []
        alts = [(_name(alt_texts, k, int(alt_id)), float(lp)) for k, (alt_id, lp) in enumerate(top)]
        rows.append(_TokenRow(_name(texts, j, token_id), float(logprob), alts))
    return rows


def chat_logprobs(out: ReqOutput | ChoiceState, top_n: int, as_ids: bool = False) -> dict[str, Any]:
    """Chat's logprobs: each token and each alternative with its text and that text's UTF-8
    bytes. `as_ids`: named by their ids instead (`_token_rows`)."""
    content = []
    for row in _token_rows(out, as_ids):
        alternatives = [
            {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            for text, logprob in row.top[:top_n]
        ]
        content.append(
            {"token": row.text, "logprob": row.logprob, "bytes": list(row.text.encode()),
             "top_logprobs": alternatives}
        )  # fmt: skip
    return {"content": content}


def completion_logprobs(
    out: ReqOutput | ChoiceState, top_n: int, text_offset: int, as_ids: bool = False
) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs shape, and the text offset after these tokens. `as_ids`: tokens
    named by their ids (`_token_rows`)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for row in _token_rows(out, as_ids):
        tokens.append(row.text)
        token_logprobs.append(row.logprob)
        top_logprobs.append(_alternatives(row.top, top_n))
        offsets.append(text_offset)
        text_offset += len(row.text)
    shape = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
    return shape, text_offset


def _alternatives(top: list[tuple[str, float]], top_n: int) -> dict[str, float]:
    """The legacy shape's alternatives, {text: logprob}, most likely first; ids sharing a text:
    the likelier one shows."""
    alternatives: dict[str, float] = {}
    for text, logprob in top[:top_n]:
        alternatives.setdefault(text, logprob)
    return alternatives


def echoed_logprobs(
    out: ReqOutput | ChoiceState,
    top_n: int,
    after: dict[str, Any] | None = None,
    as_ids: bool = False,
) -> dict[str, Any]:
    """`after` (the generated tokens' legacy logprobs, if any) preceded by the prompt's, for
    `echo` with `logprobs` (vLLM's shape): the first prompt token has no logprob and no
    alternatives (None), each later one its logprob given the tokens before it; offsets count
    from 0. `as_ids`: tokens named by their ids (`_token_rows`)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    tops = list(out.input_top_logprobs or ())
    for j, (logprob, token_id, text) in enumerate(out.input_token_logprobs or ()):
        text = text if text is not None and not as_ids else f"token_id:{token_id}"
        tokens.append(text)
        token_logprobs.append(None if logprob is None else float(logprob))
        top = tops[j] if j < len(tops) else None
        if logprob is None:
            top_logprobs.append(None)
        else:
            named = [
                (t if t is not None and not as_ids else f"token_id:{i}", float(lp))
                for lp, i, t in top or ()
            ]
            top_logprobs.append(_alternatives(named, top_n))
        offsets.append(offset)
        offset += len(text)
    prompt = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
              "text_offset": offsets}  # fmt: skip
    return {key: value + (after or {}).get(key, []) for key, value in prompt.items()}
