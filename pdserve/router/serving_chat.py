"""`/v1/chat/completions`: OpenAI's chat shapes, streamed or whole."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from pdserve.config.router_spec import RouterSpec
from pdserve.config.sampling_params import GRAMMAR_KEYS
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
from pdserve.router.openai_models import ChatCompletionRequest
from pdserve.router.openai_serving import (
    Fanout,
    Prompt,
    chat_logprobs,
    fan_out,
    finish_reason,
    last_hidden_state,
    sampling_dicts,
    template_kwargs,
    truncation,
    usage,
    usage_so_far,
)
from pdserve.router.reasoning import ReasoningStream, split_reasoning, thinking_off
from pdserve.router.request_fields import check_fields, extra_flag
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router
from pdserve.router.sse import DONE, SSEResponse, sse, sse_error
from pdserve.router.tool_calls import ToolCallStream, ToolPlan, chat_template_of, plan_tools


def build_chat(spec: RouterSpec, body: ChatCompletionRequest) -> Fanout:
    check_fields(body, "chat")  # the model (or adapter) name: create_chat_completion
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    add_generation_prompt = body.add_generation_prompt
    if body.continue_final_message:
        if add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true",
                "add_generation_prompt",
            )
        if body.messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message needs an assistant message last", "continue_final_message"
            )
        add_generation_prompt = False
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    samplings = sampling_dicts(body, max_tokens, spec.default_max_tokens)
    plan = _tool_plan(spec, body)
    kwargs = template_kwargs(body.chat_template_kwargs)
    thinks = bool(spec.reasoning_parser) and not thinking_off(kwargs)
    _constrain(samplings, plan, spec.reasoning_parser if thinks else None)
    messages = [m.to_template_dict() for m in body.messages]
    images = [url for m in body.messages for url in m.image_urls()]
    fan = fan_out(
        [Prompt(messages=messages)],
        samplings,
        continue_final_message=body.continue_final_message,
        add_generation_prompt=add_generation_prompt is not False,
        chat_template_kwargs=kwargs,
        tools=plan.template_tools if plan is not None else None,
        return_logprob=body.logprobs,
        top_logprobs_num=body.top_logprobs or 0,
        return_hidden_states=extra_flag(body, "return_hidden_states"),
        truncate_prompt_tokens=truncation(body.truncate_prompt_tokens),
    )
    videos = [url for m in body.messages for url in m.video_urls()]
    for req in fan.reqs:  # the tokenizer process fetches and preprocesses them
        req.image_data = images or None
        req.video_data = videos or None
    fan.tool_plan = plan
    # SGLang's separate_reasoning, true by default: false gets the text as the model wrote it
    if spec.reasoning_parser and extra_flag(body, "separate_reasoning", True):
        fan.reasoning_parser = spec.reasoning_parser if thinks else "qwen3"
    return fan


def _tool_plan(spec: RouterSpec, body: ChatCompletionRequest) -> ToolPlan | None:
    template = None
    if body.tools:  # the template tells the tool-call format
        template = spec.chat_template or chat_template_of(spec.tokenizer_path_or_model)
    return plan_tools(body.tools, body.tool_choice, template, body.parallel_tool_calls)


def _constrain(samplings: list[dict], plan: ToolPlan | None, thinking: str | None) -> None:
    """Each choice's grammar: the tool plan's calls as structured output (a 400 beside another
    constraint), started after the thinking of a reasoning model (`thinking`: its parser)."""
    schema = plan.json_schema() if plan is not None else None
    tag = plan.structural_tag() if plan is not None else None
    constrained = any(d.get(key) for d in samplings for key in GRAMMAR_KEYS)
    if schema is not None or tag is not None:  # the calls are structured output
        if constrained:
            raise bad_request(
                "tool_choice 'required', a named function or a strict function cannot be "
                "combined with response_format or another constraint",
                "tool_choice",
            )
        for d in samplings:
            if schema is not None:
                d["json_schema"] = json.dumps(schema)
            else:
                d["structural_tag"] = json.dumps(tag)
        constrained = True
    if constrained and thinking:  # a reasoning model thinks, then the grammar holds
        for d in samplings:
            d["grammar_after_reasoning"] = thinking


async def create_chat_completion(
    router: Router, request: Request, body: ChatCompletionRequest
) -> Response:
    lora = openai_lora(router.lora, body)
    fan = build_checked(lambda: build_chat(router.spec, body))
    set_lora(fan.reqs, [lora] * len(fan.reqs))
    admit(router, fan, "messages")
    group = router.submit(fan.group_id, fan.reqs, fan.route_keys)
    if body.stream:
        buffered = await open_stream(router, request, group)
        return SSEResponse(
            guarded(router, group, lambda: _chat_events(router, body, fan, group, buffered))
        )
    choices = await run_to_end(router, request, group)
    return JSONResponse(_chat_response(router.spec, body, fan, choices))


def _chat_response(
    spec: RouterSpec, body: ChatCompletionRequest, fan: Fanout, choices: list[ChoiceState]
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{fan.group_id}",
        "object": "chat.completion",
        "created": fan.created,
        "model": spec.model_name,
        "choices": [_chat_choice(c, body, fan) for c in choices],
        "usage": usage(choices, fan.n),
        "system_fingerprint": None,
    }


def _chat_choice(c: ChoiceState, body: ChatCompletionRequest, fan: Fanout) -> dict[str, Any]:
    text, plan = c.text, fan.tool_plan
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if fan.reasoning_parser is not None:
        reasoning, text = split_reasoning(text, fan.reasoning_parser)
        message = {"role": "assistant", "content": text, "reasoning_content": reasoning}
    reason = finish_reason(c.finish)
    if plan is not None:
        content, calls = plan.calls_of(text)
        if calls:
            message = {**message, "content": content, "tool_calls": calls}
            reason = _calls_reason(plan, reason)
    choice = {
        "index": c.index,
        "message": message,
        "logprobs": (
            chat_logprobs(c, body.top_logprobs or 0, bool(body.return_tokens_as_token_ids))
            if body.logprobs
            else None
        ),
        "finish_reason": reason,
    }
    if extra_flag(body, "return_hidden_states"):
        choice["hidden_states"] = last_hidden_state(c)
    return choice


async def _chat_events(
    router: Router,
    body: ChatCompletionRequest,
    fan: Fanout,
    group: RequestGroup,
    buffered: list[tuple[int, ReqOutput]],
) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": f"chatcmpl-{fan.group_id}",
        "object": "chat.completion.chunk",
        "created": fan.created,
        "model": router.spec.model_name,
    }
    if body.include_usage:
        base["usage"] = None
    states = [ChoiceState(i, rid) for i, rid in enumerate(group.rids)]
    plan = fan.tool_plan
    tool_streams = [ToolCallStream(plan) if plan else None for _ in group.rids]
    parser = fan.reasoning_parser
    thoughts = [ReasoningStream(parser) if parser else None for _ in group.rids]
    # The role chunks carry the prompt's counts (continuous_usage_stats): the first outputs,
    # read before the response began, hold them.
    primed = [ChoiceState(i, rid) for i, rid in enumerate(group.rids)]
    for index, out in buffered:
        primed[index].prompt_tokens = max(primed[index].prompt_tokens, out.prompt_tokens)
        primed[index].cached_tokens = max(primed[index].cached_tokens, out.cached_tokens)
    for i in range(group.num_choices):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}  # fmt: skip
        yield sse({**base, "choices": [role], **usage_so_far(body, primed, fan.n)})
    async for index, out in iter_outputs(buffered, group):
        states[index].add(out)
        err = failure_of(out)
        if err is not None:
            yield sse_error(err.message, err.status)
            yield DONE
            return
        choice = _chat_delta(index, out, body, tool_streams[index], thoughts[index])
        if choice is not None:
            yield sse({**base, "choices": [choice], **usage_so_far(body, states, fan.n)})
    if extra_flag(body, "return_hidden_states"):  # as SGLang: one chunk per choice, at the end
        for c in states:
            delta = {"hidden_states": last_hidden_state(c)}
            hidden = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield sse({**base, "choices": [hidden]})
    if body.include_usage:
        yield sse({**base, "choices": [], "usage": usage(states, fan.n)})
    yield DONE


def _chat_delta(
    index: int,
    out: ReqOutput,
    body: ChatCompletionRequest,
    tools: ToolCallStream | None,
    thoughts: ReasoningStream | None,
) -> dict[str, Any] | None:
    logprobs = None
    if body.logprobs and out.logprobs:
        logprobs = chat_logprobs(out, body.top_logprobs or 0, bool(body.return_tokens_as_token_ids))
    reason = finish_reason(out.finish)
    text, reasoning = out.text_delta, ""
    if thoughts is not None:
        reasoning, text = thoughts.feed(text)
        if reason is not None:
            held_reasoning, held_text = thoughts.finish()
            reasoning, text = reasoning + held_reasoning, text + held_text
    text = text if tools is None else tools.feed(text)
    delta: dict[str, Any] = {"reasoning_content": reasoning} if reasoning else {}
    if tools is not None and reason is not None:  # the end: the held text, read as calls
        rest, calls = tools.finish()
        text += rest
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
            reason = _calls_reason(tools.plan, reason)
    if not text and not delta and reason is None and logprobs is None:
        return None
    if text:
        delta = {"content": text, **delta}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def _calls_reason(plan: ToolPlan, reason: str | None) -> str | None:
    """finish_reason of a choice that made calls: "tool_calls", except for a named function
    (OpenAI's and vLLM's "stop": the call was asked for, not chosen)."""
    return reason if plan.choice == "named" else "tool_calls"
