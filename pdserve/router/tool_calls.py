"""OpenAI tool calling on chat completions: `tools` go into the chat template, `tool_choice`
decides whether and how the model calls them, and the calls come back out of its text.

- `"required"` and a named function are enforced by a JSON schema (structured output): the model
  writes a list of `{"name", "parameters"}` objects, or the named function's arguments, so the
  calls always parse and their arguments validate, whatever the model.
- `"auto"` lets the model write text or calls in its own format, which a parser reads: `hermes`
  (`<tool_call>{"name", "arguments"}</tool_call>`: Qwen2.5, Qwen3, Hermes), `llama3_json` (a
  JSON object `{"name", "parameters"}`, after `<|python_tag|>` or alone: Llama 3.1+) or
  `mistral` (`[TOOL_CALLS] [{"name", "arguments"}]`), picked from what the chat template writes.
  Text that does not parse as calls of the declared tools stays the message's content. When a
  function is declared `strict: true` (OpenAI's flag), `auto`'s calls are held by a structural
  tag (as SGLang does): the text stays free, but once the model opens a call in its format the
  call must name a declared tool and its arguments match that tool's schema (a tool not strict:
  any JSON object). `hermes` and `llama3_json` formats; `mistral`'s list of calls is refused.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pdserve.router.errors import bad_request
from pdserve.router.reasoning import partial_tag_len

Parser = Literal["hermes", "llama3_json", "mistral"]
PARSERS: tuple[str, ...] = ("hermes", "llama3_json", "mistral")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_OPEN = "<tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolPlan:
    """One request's tools and what `tool_choice` asks of them."""

    names: tuple[str, ...]
    parameters: tuple[dict[str, Any], ...]  # each tool's JSON schema, by position
    template_tools: list[dict[str, Any]]  # as the client sent them, for the chat template
    choice: Literal["none", "auto", "required", "named"]
    named: str | None = None
    parser: str | None = None  # auto only
    parallel: bool = True  # false (parallel_tool_calls): at most one call
    strict: tuple[bool, ...] = ()  # each tool's `strict`, by position

    def structural_tag(self) -> dict[str, Any] | None:
        """What holds `auto`'s calls when a tool is strict (None otherwise): free text, and each
        call opened in the parser's format is one of the tools, its arguments matching the
        tool's schema (a tool not strict: any object)."""
        if self.choice != "auto" or not any(self.strict):
            return None
        if self.parser == "hermes":
            trigger, begin, end = (
                _HERMES_OPEN,
                '<tool_call>\n{"name": "%s", "arguments": ',
                "}\n</tool_call>",
            )
        else:  # llama3_json (plan_tools refuses the others)
            trigger, begin, end = '{"name": ', '{"name": "%s", "parameters": ', "}"
        tags = [
            {"type": "tag", "begin": begin % name, "end": end, "content": {
                "type": "json_schema", "json_schema": params if strict else {"type": "object"}}}
            for name, params, strict in zip(self.names, self.parameters, self.strict)
        ]  # fmt: skip
        fmt = {"type": "triggered_tags", "triggers": [trigger], "tags": tags,
               "stop_after_first": not self.parallel}  # fmt: skip
        return {"type": "structural_tag", "format": fmt}

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output is held to: the named function's arguments, or a non-empty
        list of calls of the declared tools (`required`); None for `auto` and `none`."""
        if self.choice == "named":
            return self.parameters[self.names.index(self.named or "")]
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": params},
                "required": ["name", "parameters"],
            }
            for name, params in zip(self.names, self.parameters)
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def calls_of(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a finished output."""
        if self.choice == "named":
            if not _is_json_object(text):
                return text, []
            return None, [new_call(self.named or "", text)]
        if self.choice == "required":
            items = _loads(text)
            if not isinstance(items, list):  # cut short (the length limit): text
                return text, []
            calls = [_call_from(item, "parameters", self.names) for item in items]
            if not calls or any(c is None for c in calls):
                return text, []
            return None, [c for c in calls if c is not None]
        if self.choice == "auto" and self.parser is not None:
            content, calls = parse_tool_calls(text, self.parser, self.names)
            return content, calls if self.parallel else calls[:1]
        return text, []


def plan_tools(
    tools: Any, tool_choice: Any, template: str | None, parallel: bool | None = None
) -> ToolPlan | None:
    """The request's ToolPlan (None without tools, or with tool_choice "none"); a 400 naming
    `tools` or `tool_choice` for what is malformed. `template`: the model's chat template text,
    from which `auto` picks its parser; `parallel`: parallel_tool_calls (None: true)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {type: function, function: {...}}", "tools")
    names, parameters, strict = [], [], []
    for i, tool in enumerate(tools):
        name, params = _checked_tool(tool, f"tools[{i}]")
        if name in names:
            raise bad_request(f"tools[{i}]: the function {name!r} is declared twice", "tools")
        names.append(name)
        parameters.append(params)
        strict.append(tool["function"].get("strict") is True)
    choice, named = _checked_choice(tool_choice, names)
    if choice == "none":
        return None
    parser = detect_parser(template) if choice == "auto" else None
    if choice == "auto" and parser is None:
        raise bad_request(
            "tool_choice 'auto' needs a tool-call format, and this model's chat template writes "
            "none pdserve knows (hermes <tool_call>, llama3_json, mistral [TOOL_CALLS]): use "
            "tool_choice 'required' or name a function",
            "tool_choice",
        )
    if choice == "auto" and any(strict) and parser == "mistral":
        raise bad_request(
            "strict functions with tool_choice 'auto' are not supported for this model's "
            "tool-call format (mistral): use tool_choice 'required' or name a function (their "
            "arguments always match the schema)",
            "tools",
        )
    return ToolPlan(
        tuple(names), tuple(parameters), tools, choice, named, parser, parallel is not False,
        tuple(strict),
    )  # fmt: skip


def _checked_tool(tool: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"{where}: expected {{'type': 'function', 'function': {{...}}}}", "tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise bad_request(f"{where}.function: expected an object with a name", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(
            f"{where}.function.name={name!r:.80}: expected 1 to 64 letters, digits, _ or -",
            "tools",
        )
    if function.get("strict") not in (None, True, False):
        raise bad_request(f"{where}.function.strict: expected true or false", "tools")
    params = function.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"{where}.function.parameters: expected a JSON schema object", "tools")
    return name, params


def _checked_choice(choice: Any, names: list[str]) -> tuple[Any, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("none", "auto", "required"):
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise bad_request(
            f"tool_choice={choice!r:.100}: expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in names:
        raise bad_request(f"tool_choice names {name!r:.80}, which is not in tools", "tool_choice")
    return "named", name


def detect_parser(template: str | None) -> str | None:
    """The tool-call format a chat template writes, or None."""
    if not template:
        return None
    if _HERMES_OPEN in template:
        return "hermes"
    if _MISTRAL_OPEN in template:
        return "mistral"
    if _PYTHON_TAG in template or '"parameters": ' in template:
        return "llama3_json"
    return None


@lru_cache(maxsize=8)
def chat_template_of(model_dir: str) -> str | None:
    """The chat template a Hugging Face directory ships (chat_template.jinja, or
    tokenizer_config.json's `chat_template`, every named one joined), or None."""
    path = Path(model_dir)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except ValueError:
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else None


def new_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_tool_calls(
    text: str, parser: str, names: tuple[str, ...]
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of text in `parser`'s format: calls only when every one parses and
    names a declared tool (else all of the text is content)."""
    if parser == "hermes":
        start = text.find(_HERMES_OPEN)
        if start < 0:
            return text, []
        items = [_loads(m) for m in _HERMES_CALL.findall(text[start:])]
        key = "arguments"
        content = text[:start]
    elif parser == "mistral":
        start = text.find(_MISTRAL_OPEN)
        if start < 0:
            return text, []
        loaded = _loads(text[start + len(_MISTRAL_OPEN) :].strip())
        items = loaded if isinstance(loaded, list) else [loaded]
        key = "arguments"
        content = text[:start]
    else:  # llama3_json: the whole output is the call(s), `;`-separated
        body = text.strip().removeprefix(_PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        items = [_loads(part) for part in body.split(";") if part.strip()]
        key = "parameters"
        content = ""
    calls = [_call_from(item, key, names) for item in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return (content.strip() or None), [c for c in calls if c is not None]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_from(item: Any, key: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """A call from `{"name", key: {...}}` (`arguments` also read for `parameters` and back)."""
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    args = item.get(key, item.get("arguments" if key == "parameters" else "parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return new_call(item["name"], json.dumps(args, ensure_ascii=False))


def _is_json_object(text: str) -> bool:
    return isinstance(_loads(text), dict)


class ToolCallStream:
    """One streamed choice's text under a ToolPlan: what may go out as content now, and the
    calls at the end. Constrained plans (required, named) send no content; `auto` sends text
    until its parser's opening marker could be starting, and holds the rest."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of `text` sent as content
        self.holding = plan.choice in ("required", "named")

    def feed(self, delta: str) -> str:
        """Content to send now for `delta`."""
        self.text += delta
        if self.holding:
            return ""
        marker = self._marker()
        if marker is None:  # llama3_json: the calls are the whole output
            if self.sent == 0:
                head = self.text.lstrip()
                if not head or _PYTHON_TAG.startswith(head):
                    return ""  # may still become a call: wait
                if head.startswith(("{", _PYTHON_TAG)):
                    self.holding = True
                    return ""
            return self._send_to(len(self.text))
        start = self.text.find(marker)
        if start >= 0:
            self.holding = True
            return self._send_to(start)
        # hold back a tail that could open the marker
        return self._send_to(len(self.text) - partial_tag_len(self.text, marker))

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet sent, calls) once the output has ended."""
        _, calls = self.plan.calls_of(self.text)
        if not calls:
            return self.text[self.sent :], []
        marker = self._marker()
        end = self.text.find(marker) if marker is not None else 0  # where the calls begin
        return self.text[self.sent : max(end, self.sent)], calls

    def _marker(self) -> str | None:
        if self.plan.choice != "auto":
            return None
        return {"hermes": _HERMES_OPEN, "mistral": _MISTRAL_OPEN}.get(self.plan.parser or "")

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
