"""Which top-level body fields each generation route accepts, ignores or refuses: the one table.

A field the route's pydantic model declares is served. A field OpenAI's clients send routinely and
that cannot change the output (`user`, `metadata`, `store`, ...) is accepted and ignored on the
OpenAI routes. A field of OpenAI's or SGLang's API that pdserve does not implement is refused with
a 400 naming it, unless its value asks for nothing (`tools: []`, `tool_choice: "none"`), so a
client asking for something pdserve cannot do never silently gets a plain answer. Any other field
is refused as unknown. When a capability lands, its field leaves `REFUSED` and joins
the route's model (or `SERVED_EXTRAS`, for an SGLang extra the OpenAI models do not declare).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from pdserve.router.errors import bad_request

Route = Literal["chat", "completions", "generate", "responses"]
OPENAI: frozenset[Route] = frozenset({"chat", "completions"})
RESPONSES: frozenset[Route] = frozenset({"responses"})
EVERY: frozenset[Route] = frozenset({"chat", "completions", "generate"})
CHAT: frozenset[Route] = frozenset({"chat"})
GENERATE: frozenset[Route] = frozenset({"generate"})

# Sent by OpenAI's SDKs and frameworks built on them; none changes what the model generates.
IGNORED_ON_OPENAI_ROUTES = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prediction",  # predicted outputs only make generation faster
        "safety_identifier",
        "prompt_cache_key",
    }
)


def _is_unset(value: Any) -> bool:
    return value is None


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _is_off(value: Any) -> bool:
    return value in (None, False, [], {})


def _is_no_truncation(value: Any) -> bool:
    return value in (None, "disabled")


def _asks_no_tool(value: Any) -> bool:
    return value in (None, "none", "auto")


def _is_text_modality(value: Any) -> bool:
    return value is None or value == ["text"]


def _is_empty_text(value: Any) -> bool:
    return value is None or value == ""


@dataclass(frozen=True)
class Refusal:
    reason: str
    routes: frozenset[Route]
    asks_nothing: Callable[[Any], bool] = _is_unset  # True: a value that is accepted


_STRUCTURAL_TAG = (
    "send it as response_format {'type': 'structural_tag', ...} (on /generate: inside "
    "sampling_params)"
)
_IN_SAMPLING_PARAMS = "on /generate it goes inside sampling_params"
_LEGACY_FUNCTIONS = "the legacy function calling is not supported: use tools and tool_choice"
_TEXT_ONLY = "is not supported: the model takes text only"
_IMAGE_DATA = "is a /generate field (on chat, send image_url content parts)"

REFUSED: dict[str, Refusal] = {
    "regex": Refusal(_IN_SAMPLING_PARAMS, GENERATE),  # served on the OpenAI routes
    "json_schema": Refusal(_IN_SAMPLING_PARAMS, GENERATE),
    "ebnf": Refusal(_IN_SAMPLING_PARAMS, GENERATE),
    "structural_tag": Refusal(_STRUCTURAL_TAG, EVERY),
    "functions": Refusal(_LEGACY_FUNCTIONS, CHAT, _is_empty),
    "function_call": Refusal(_LEGACY_FUNCTIONS, CHAT, _asks_no_tool),
    "image_data": Refusal(_IMAGE_DATA, OPENAI),
    "video_data": Refusal("is a /generate field (on chat, send video_url content parts)", OPENAI),
    "audio_data": Refusal(f"audio_data {_TEXT_ONLY}", EVERY),
    "audio": Refusal(f"audio output {_TEXT_ONLY}", CHAT),
    "modalities": Refusal("only modalities ['text'] is supported", CHAT, _is_text_modality),
    "web_search_options": Refusal("web search is not supported", CHAT),
    "suffix": Refusal("suffix is not supported", frozenset({"completions"}), _is_empty_text),
    # /v1/responses is stateless, with function tools only
    **{
        name: Refusal("is not supported by /v1/responses", RESPONSES, _is_off)
        for name in (
            "previous_response_id",
            "reasoning",
            "background",
            "conversation",
            "include",
            "prompt",
            "max_tool_calls",
            "top_logprobs",
            "prompt_cache_key",
        )
    },  # fmt: skip
    "truncation": Refusal("is not supported by /v1/responses", RESPONSES, _is_no_truncation),
}
# Sent by OpenAI's SDKs with the Responses API; none changes what the model generates.
IGNORED_ON_RESPONSES = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "stream_options"}
)


# SGLang's extras that a route serves though its pydantic model does not declare them (clients send
# them through `extra_body`); the route reads each with `extra_flag`, which checks its type.
SERVED_EXTRAS: dict[str, frozenset[Route]] = {
    "return_hidden_states": OPENAI,  # the last token's final-layer state on each choice
    "separate_reasoning": CHAT,  # false: the answer as written (reasoning.py)
}


def extra_flag(body: BaseModel, name: str, default: bool = False) -> bool:
    """A boolean field of `body`, declared or sent as an extra; absent or null is `default`."""
    if name in type(body).model_fields:
        value = getattr(body, name)
    else:
        value = (body.model_extra or {}).get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name}: expected true or false, got {value!r}", name)
    return value


def check_fields(body: BaseModel, route: Route) -> None:
    """400 naming the first field of `body` that `route` refuses or does not know."""
    declared = type(body).model_fields
    given = {name: getattr(body, name) for name in body.model_fields_set if name in declared}
    given.update(body.model_extra or {})
    for name, value in given.items():
        refusal = REFUSED.get(name)
        if refusal is not None and route in refusal.routes:
            if not refusal.asks_nothing(value):
                raise bad_request(f"{name}: {refusal.reason}", name)
            continue
        if name in declared or route in SERVED_EXTRAS.get(name, ()):
            continue
        if route in OPENAI and name in IGNORED_ON_OPENAI_ROUTES:
            continue
        if route in RESPONSES and name in IGNORED_ON_RESPONSES:
            continue
        raise bad_request(f"{name}: unknown field (not supported by this route)", name)
