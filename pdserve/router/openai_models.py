"""Request bodies of the HTTP API (OpenAI and native), as pydantic models.

The fields pdserve understands are typed and range-checked here, and the sampling values are
checked again by `SamplingParams` when the route builds them. The route bodies keep the fields they
do not declare (`extra="allow"`, as clients send extras through `extra_body`) for
`request_fields.check_fields`, which ignores the harmless ones OpenAI clients send and refuses the
rest with a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdserve.config.sampling_params import has_surrogates

TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # the tokenizer checks the model's vocabulary
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestBody(_Body):
    """A request body: no field may hold text that is not valid Unicode (a lone surrogate such
    as "\\ud800" is legal JSON but cannot be encoded, tokenized or sent on)."""

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _holds_surrogate(value):
            raise ValueError("holds a lone UTF-16 surrogate: expected valid Unicode text")
        return value


def _holds_surrogate(value: Any) -> bool:
    """Whether any string in a JSON value (keys included) is not valid Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_surrogates(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class StreamOptions(_Body):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's stream padding: accepted, never added
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage on every chunk


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(..., min_length=1)  # data:, file://, http(s)://, a path, or base64
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Body):
    # A video file (data:, file://, http(s)://, a path, base64) or vLLM's frames form,
    # data:video/jpeg;base64,<frame>,<frame>,...
    url: str = Field(..., min_length=1)


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    # An assistant message's calls, as the API returned them (the template renders them).
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image_url", "video_url") and isinstance(kind, str):
                raise ValueError(
                    f"content parts of type {kind!r} are not supported (text, image_url and "
                    "video_url only)"
                )
        return value

    @field_validator("function_call", "audio")
    @classmethod
    def _nothing_unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported (legacy function calls and audio)")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _calls_of_functions(cls, value: Any) -> Any:
        for call in value or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError("each tool call needs {'function': {'name', 'arguments'}}")
        return value

    def to_template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: content a string, or with images a list
        of `{"type": "text", "text": ...}` and `{"type": "image"}` parts (`image_urls` in order)."""
        content: str | list[dict[str, Any]]
        if isinstance(self.content, list) and self.media_urls():  # the template places them
            kinds = {ImagePart: "image", VideoPart: "video"}
            content = [
                {"type": "text", "text": p.text}
                if isinstance(p, TextPart)
                else {"type": kinds[type(p)]}
                for p in self.content
            ]
        elif isinstance(self.content, list):
            content = "\n".join(part.text for part in self.content if isinstance(part, TextPart))
        else:
            content = self.content or ""
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [_template_call(call) for call in self.tool_calls]
        return out

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        parts = self.content if isinstance(self.content, list) else []
        return [p.image_url.url for p in parts if isinstance(p, ImagePart)]

    def video_urls(self) -> list[str]:
        """The URLs of the message's video parts, in order."""
        parts = self.content if isinstance(self.content, list) else []
        return [p.video_url.url for p in parts if isinstance(p, VideoPart)]

    def media_urls(self) -> list[str]:
        return self.image_urls() + self.video_urls()


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as chat templates read it: OpenAI's `arguments` JSON text as an object (the
    templates write it with `tojson`; vLLM passes it so too); text that is not JSON stays."""
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "type": call.get("type", "function"), "function": function}


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`. The schema is always enforced (`strict` is
    accepted either way, as SGLang and vLLM do)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema")
    strict: bool | None = None


class StructureItem(_Body):
    """One tag of SGLang's structural_tag: `begin`, JSON matching `schema`, `end`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    begin: str = Field(..., min_length=1)
    schema_: dict[str, Any] = Field(..., alias="schema")
    end: str = Field(..., min_length=1)


class ResponseFormat(_Body):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema; or
    a structural tag (SGLang's and vLLM's `structures` + `triggers`, or xgrammar's `format`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[StructureItem] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None

    def structural_tag(self) -> dict[str, Any]:
        """The structural tag as SamplingParams takes it (checked by grammar_check)."""
        if self.format is not None:
            return {"type": "structural_tag", "format": self.format}
        structures = [item.model_dump(by_alias=True) for item in self.structures or ()]
        return {"type": "structural_tag", "structures": structures, "triggers": self.triggers}


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (its newer name for the guided_* fields): one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


class SamplingFields(RequestBody):
    """Fields shared by chat and completions; OpenAI's names plus vLLM/SGLang extras."""

    model_config = ConfigDict(extra="allow")  # for request_fields.check_fields

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    include_stop_str_in_output: bool | None = None  # vLLM's name for no_stop_trim
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep the last N tokens
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:N"
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # SGLang's constraints on its OpenAI routes (sent through `extra_body`); at most one in all.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # vLLM's constraints (sent through `extra_body`); at most one in all, with the above.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats (with include_usage): the usage so far on every chunk."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)  # type: ignore[union-attr]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (enable_thinking)
    tools: list[Any] | None = None  # checked by router/tool_calls.py
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # false: at most one call


PromptType = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


class GenerateRequest(RequestBody):
    """Native `/generate`, in SGLang's shapes."""

    model_config = ConfigDict(extra="allow")  # for request_fields.check_fields

    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1, lt=2**31)
    top_logprobs_num: int = Field(0, ge=0, le=20)
    return_text_in_logprobs: bool = True
    return_hidden_states: bool = False
    lora_path: str | list[str | None] | None = None
    image_data: Any = None
    video_data: Any = None  # SGLang's: per prompt a video (file or list of frames) or a list
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)  # higher first; None: online (0)


class AbortRequest(RequestBody):
    rid: str = ""
    abort_all: bool = False


class EmbeddingRequest(RequestBody):
    """OpenAI's `/v1/embeddings`: text(s) or token ids in, one vector per input out; or, for a
    multimodal embedding model, items {"text": ..., "image": ...} (`embedding_inputs.py`)."""

    model: str | None = None
    input: PromptType | list[dict[str, Any]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep the last N tokens


class EncodeRequest(RequestBody):
    """SGLang's `/encode` and `/classify`: `text` or `input_ids`, one or a batch."""

    model: str | None = None
    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
