"""`/v1/completions`: OpenAI's (legacy) text completion shapes, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from pdserve.config.router_spec import RouterSpec
from pdserve.protocol import ReqOutput
from pdserve.router.admission import admit, build_checked
from pdserve.router.errors import bad_request
from pdserve.router.group_reader import (
    ChoiceState,
    failure_of,
    guarded,
    iter_outputs,
    open_stream,
    run_to_end,
)
from pdserve.router.lora_adapters import openai_lora, set_lora
from pdserve.router.openai_models import CompletionRequest, PromptType
from pdserve.router.openai_serving import (
    Fanout,
    Prompt,
    completion_logprobs,
    echoed_logprobs,
    fan_out,
    finish_reason,
    last_hidden_state,
    sampling_dicts,
    truncation,
    usage,
    usage_so_far,
)
from pdserve.router.request_fields import check_fields, extra_flag
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router
from pdserve.router.sse import DONE, SSEResponse, sse, sse_error

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for completions


def prompts_of(prompt: PromptType) -> list[Prompt]:
    """str | list[str] | list[int] | list[list[int]] -> one Prompt each."""
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [Prompt(text=p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [Prompt(input_ids=list(prompt))]
    if any(not p for p in prompt):
        raise bad_request("prompt token lists must not be empty", "prompt")
    return [Prompt(input_ids=list(p)) for p in prompt]


def build_completion(spec: RouterSpec, body: CompletionRequest) -> Fanout:
    check_fields(body, "completions")  # the model (or adapter) name: create_completion
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    samplings = sampling_dicts(body, max_tokens, spec.default_max_tokens)
    return fan_out(
        prompts_of(body.prompt),
        samplings,
        return_logprob=body.logprobs is not None,
        top_logprobs_num=body.logprobs or 0,
        echo=body.echo,
        # echo with logprobs: the prompt's token logprobs too, as vLLM gives them
        logprob_start_len=0 if body.echo and body.logprobs is not None else -1,
        return_hidden_states=extra_flag(body, "return_hidden_states"),
        truncate_prompt_tokens=truncation(body.truncate_prompt_tokens),
    )


async def create_completion(router: Router, request: Request, body: CompletionRequest) -> Response:
    lora = openai_lora(router.lora, body)
    fan = build_checked(lambda: build_completion(router.spec, body))
    set_lora(fan.reqs, [lora] * len(fan.reqs))
    admit(router, fan, "prompt")
    group = router.submit(fan.group_id, fan.reqs, fan.route_keys)
    if body.stream:
        buffered = await open_stream(router, request, group)
        return SSEResponse(
            guarded(router, group, lambda: _completion_events(router, body, fan, group, buffered))
        )
    choices = await run_to_end(router, request, group)
    return JSONResponse(_completion_response(router.spec, body, fan, choices))


def _completion_response(
    spec: RouterSpec, body: CompletionRequest, fan: Fanout, choices: list[ChoiceState]
) -> dict[str, Any]:
    out_choices = []
    with_hidden = extra_flag(body, "return_hidden_states")
    as_ids = bool(body.return_tokens_as_token_ids)
    for c in choices:
        prefix = (c.prompt_text or "") if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs, _ = completion_logprobs(c, body.logprobs, len(prefix), as_ids)
            if body.echo:
                logprobs = echoed_logprobs(c, body.logprobs, logprobs, as_ids)
        choice = {
            "index": c.index,
            "text": prefix + c.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(c.finish),
        }
        if with_hidden:
            choice["hidden_states"] = last_hidden_state(c)
        out_choices.append(choice)
    return {
        "id": f"cmpl-{fan.group_id}",
        "object": "text_completion",
        "created": fan.created,
        "model": spec.model_name,
        "choices": out_choices,
        "usage": usage(choices, fan.n),
        "system_fingerprint": None,
    }


async def _completion_events(
    router: Router,
    body: CompletionRequest,
    fan: Fanout,
    group: RequestGroup,
    buffered: list[tuple[int, ReqOutput]],
) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": f"cmpl-{fan.group_id}",
        "object": "text_completion",
        "created": fan.created,
        "model": router.spec.model_name,
    }
    if body.include_usage:
        base["usage"] = None
    states = [ChoiceState(i, rid) for i, rid in enumerate(group.rids)]
    offsets = [0] * group.num_choices  # text offset of each choice's next token
    as_ids = bool(body.return_tokens_as_token_ids)
    async for index, out in iter_outputs(buffered, group):
        states[index].add(out)
        err = failure_of(out)
        if err is not None:
            yield sse_error(err.message, err.status)
            yield DONE
            return
        text = out.text_delta
        if body.echo and out.prompt_text is not None:
            text = out.prompt_text + text
            offsets[index] += len(out.prompt_text)
        logprobs = None
        if body.logprobs is not None and out.logprobs:
            logprobs, offsets[index] = completion_logprobs(
                out, body.logprobs, offsets[index], as_ids
            )
        if body.logprobs is not None and body.echo and out.input_token_logprobs:
            logprobs = echoed_logprobs(out, body.logprobs, logprobs, as_ids)
        reason = finish_reason(out.finish)
        if not text and reason is None and logprobs is None:
            continue
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        yield sse({**base, "choices": [choice], **usage_so_far(body, states, fan.n)})
    if extra_flag(body, "return_hidden_states"):  # as SGLang: one chunk per choice, at the end
        for c in states:
            hidden = {"index": c.index, "text": "", "logprobs": None, "finish_reason": None,
                      "hidden_states": last_hidden_state(c)}  # fmt: skip
            yield sse({**base, "choices": [hidden]})
    if body.include_usage:
        yield sse({**base, "choices": [], "usage": usage(states, fan.n)})
    yield DONE
