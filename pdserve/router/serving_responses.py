"""`/v1/responses`: OpenAI's Responses API over the chat path, for the official client's
`client.responses.create(...)`: `input` text or messages (text and image parts, and the
`function_call` / `function_call_output` items of a conversation with tools), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, `text.format` (text, JSON object, JSON schema),
function `tools` with `tool_choice` and `parallel_tool_calls` (the chat route's tool calling: the
calls come back as `function_call` output items), streamed (OpenAI's typed events) or whole.
Stateless: nothing is stored, so `previous_response_id` is refused, as are the other fields it
does not serve (a 400 naming each). With a reasoning parser the thinking comes as a `reasoning`
output item after the message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

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
from pdserve.router.openai_models import ChatCompletionRequest, RequestBody, _Body
from pdserve.router.openai_serving import Fanout
from pdserve.router.reasoning import ReasoningStream, split_reasoning
from pdserve.router.request_fields import check_fields
from pdserve.router.router import Router
from pdserve.router.serving_chat import build_chat
from pdserve.router.sse import SSEResponse, sse_error
from pdserve.router.tool_calls import ToolCallStream


class InputPart(_Body):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text", "input_image"]
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    annotations: list[Any] | None = None


class _InputItem(_Body):
    """What every input item may carry back from an earlier response: its id and status."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    status: str | None = None


class InputMessage(_InputItem):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class FunctionCall(_InputItem):
    """A call the model made earlier in the conversation (an output item sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutput(_InputItem):
    """What a call returned."""

    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(_Body):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(RequestBody):
    model_config = ConfigDict(extra="allow")  # checked by request_fields.check_fields

    model: str | None = None
    input: str | list[InputMessage | FunctionCall | FunctionCallOutput]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "name": ...}
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: TextConfig | None = None


def _messages(items: list[InputMessage | FunctionCall | FunctionCallOutput]) -> list[dict]:
    """The chat messages of the input items: calls the model made join one assistant message
    (its tool_calls), each call's output a tool message."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, FunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            out.append(_message(item))
    return out


def _message(item: InputMessage) -> dict[str, Any]:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return {"role": role, "content": item.content}
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if part.type == "input_image":
            if not part.image_url:
                raise bad_request("input_image parts need image_url", "input")
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        else:
            parts.append({"type": "text", "text": part.text or ""})
    return {"role": role, "content": parts}


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion the request asks for."""
    check_fields(body, "responses")  # the stateless Responses API's, request_fields.py
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages.extend(_messages(body.input))
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream,
                            "max_tokens": body.max_output_tokens, "temperature": body.temperature,
                            "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls}  # fmt: skip
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise bad_request("text.format of type 'json_schema' needs schema", "text")
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    try:
        return ChatCompletionRequest.model_validate(
            {k: v for k, v in chat.items() if v is not None}
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise bad_request(f"input: {first.get('msg', 'invalid')}", "input") from None


async def create_response(router: Router, request: Request, body: ResponsesRequest) -> Response:
    chat = chat_request(body)
    lora = openai_lora(router.lora, chat)
    fan = build_checked(lambda: build_chat(router.spec, chat))
    set_lora(fan.reqs, [lora] * len(fan.reqs))
    admit(router, fan, "input")
    group = router.submit(fan.group_id, fan.reqs, fan.route_keys)
    shape = _Shape(router.spec.model_name, body, fan)
    if body.stream:
        buffered = await open_stream(router, request, group)
        return SSEResponse(guarded(router, group, lambda: shape.events(group, buffered)))
    [choice] = await run_to_end(router, request, group)
    reasoning, text = _split(choice.text, fan)
    calls: list[dict[str, Any]] = []
    if fan.tool_plan is not None:
        content, calls = fan.tool_plan.calls_of(text)
        text = content or ""
    return JSONResponse(shape.response(choice, text, reasoning, calls))


def _split(text: str, fan: Fanout) -> tuple[str | None, str]:
    if fan.reasoning_parser is None:
        return None, text
    return split_reasoning(text, fan.reasoning_parser)


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A chat tool call as a Responses `function_call` output item."""
    function = call["function"]
    return {"type": "function_call", "id": f"fc_{call['id'].removeprefix('call_')}",
            "call_id": call["id"], "name": function["name"],
            "arguments": function["arguments"] if status == "completed" else "",
            "status": status}  # fmt: skip


class _Shape:
    """One response's ids and the shapes of it and its events."""

    def __init__(self, model: str, body: ResponsesRequest, fan: Fanout) -> None:
        self.model, self.body, self.fan = model, body, fan
        self.id = f"resp_{fan.group_id}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def response(
        self,
        c: ChoiceState | None,
        text: str,
        reasoning: str | None,
        calls: list[dict[str, Any]] | None = None,
        status: str = "completed",
    ) -> dict[str, Any]:
        body = self.body
        output: list[dict[str, Any]] = []
        incomplete = None
        if c is not None:
            if c.finish is not None and c.finish.kind == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            output.append(self.message(text, "completed"))
            output.extend(_call_item(call) for call in calls or ())
            if reasoning:
                output.append({"type": "reasoning", "id": f"rs_{self.fan.group_id}", "summary": [],
                               "content": [{"type": "reasoning_text", "text": reasoning}]})  # fmt: skip
        fmt = body.text.format if body.text is not None and body.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "error": None,
            "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "metadata": {},
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
            "truncation": "disabled",
            "text": {"format": fmt.model_dump(by_alias=True) if fmt else {"type": "text"}},
            "usage": _usage(c) if c is not None else None,
        }  # fmt: skip

    def message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content if status == "completed" else []}  # fmt: skip

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, group: Any, buffered: list) -> AsyncIterator[str]:
        starting = self.response(None, "", None, status="in_progress")
        yield self.event("response.created", response=starting)
        yield self.event("response.in_progress", response=starting)
        ids = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.output_item.added", output_index=0,
                         item=self.message("", "in_progress"))  # fmt: skip
        empty = {"type": "output_text", "text": "", "annotations": []}
        yield self.event("response.content_part.added", **ids, part=empty)
        state = ChoiceState(0, group.rids[0])
        parser = self.fan.reasoning_parser
        thoughts = ReasoningStream(parser) if parser else None
        plan = self.fan.tool_plan
        tools = ToolCallStream(plan) if plan is not None else None
        text = reasoning = ""
        calls: list[dict[str, Any]] = []
        async for _, out in iter_outputs(buffered, group):
            state.add(out)
            err = failure_of(out)
            if err is not None:
                yield sse_error(err.message, err.status)
                return
            delta, thought = out.text_delta, ""
            if thoughts is not None:
                thought, delta = thoughts.feed(delta)
                if out.finish is not None:
                    held_thought, held = thoughts.finish()
                    thought, delta = thought + held_thought, delta + held
            reasoning += thought
            if tools is not None:
                delta = tools.feed(delta)
                if out.finish is not None:
                    rest, calls = tools.finish()
                    delta += rest
            text += delta
            if delta:
                yield self.event("response.output_text.delta", **ids, delta=delta, logprobs=[])
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        yield self.event("response.output_text.done", **ids, text=text, logprobs=[])
        yield self.event("response.content_part.done", **ids, part=part)
        yield self.event("response.output_item.done", output_index=0,
                         item=self.message(text, "completed"))  # fmt: skip
        for k, call in enumerate(calls, start=1):
            item = _call_item(call)
            yield self.event("response.output_item.added", output_index=k,
                             item=_call_item(call, "in_progress"))  # fmt: skip
            args = {"item_id": item["id"], "output_index": k}
            yield self.event("response.function_call_arguments.delta", **args,
                             delta=item["arguments"])  # fmt: skip
            yield self.event("response.function_call_arguments.done", **args,
                             arguments=item["arguments"])  # fmt: skip
            yield self.event("response.output_item.done", output_index=k, item=item)
        final = self.response(state, text, reasoning or None, calls)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield self.event(kind, response=final)


def _usage(c: ChoiceState) -> dict[str, Any]:
    return {
        "input_tokens": c.prompt_tokens,
        "input_tokens_details": {"cached_tokens": c.cached_tokens},
        "output_tokens": c.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }
