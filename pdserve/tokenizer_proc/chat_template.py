"""Chat messages -> prompt token ids through the model's own chat template.

The template is rendered to text and then encoded without adding special tokens: templates
write their own BOS, and letting the tokenizer add one more would double it.
"""

from __future__ import annotations

from typing import Any

# apply_chat_template's own arguments, which chat_template_kwargs may not set: the request's
# fields (add_generation_prompt, continue_final_message) set some, and the rest would change what
# the call returns rather than what the template renders.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})  # fmt: skip


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """`chat_template_kwargs` (variables for the template, e.g. Qwen3's `enable_thinking`) as a
    dict; ValueError naming what is wrong."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"chat_template_kwargs must be an object of template variables, got {kwargs!r:.80}"
        )
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat_template_kwargs: {key!r:.80} is not a template variable name")
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(
                f"chat_template_kwargs: {key!r} cannot be set here (an argument of the template "
                "call itself; add_generation_prompt and continue_final_message are request fields)"
            )
    return kwargs


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and turn content-part lists into plain strings.

    Any role is let through (the template decides what it accepts); content may be a string,
    a list of `{"type": "text", "text": ...}` parts (joined with newlines, as vLLM does), or
    missing/None on an assistant message that carries `tool_calls`.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no 'role' (expected a non-empty string)")
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
        else:
            content = _content_text(content, f"messages[{i}].content")
        out.append({**message, "content": content})
    return out


def _content_text(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    texts, parts = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "video"):  # the router's stand-ins for image_url / video_url parts
            parts.append({"type": kind})  # (image_data / video_data hold them)
        elif kind in ("image_url", "input_image", "video_url", "input_audio"):
            raise ValueError(f"{where}[{j}]: images are not supported (content type {kind!r})")
        else:
            raise ValueError(f"{where}[{j}] must be {{'type': 'text', 'text': str}}, got {part!r}")
    # With images the template renders the parts (one placeholder per image); else plain text.
    return parts if len(parts) > len(texts) else "\n".join(texts)


def render_chat(
    tokenizer: Any,
    messages: Any,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text the template makes of `messages`; `template_kwargs` are extra variables
    for the template (a request's `chat_template_kwargs`), `tools` the request's OpenAI tools.

    continue_final_message: the last message must be the assistant's; its turn is left open
    (no end-of-turn token after it), so the model continues that text. It overrides
    add_generation_prompt, which would open a new turn.
    """
    messages = normalize_messages(messages)
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError(
            "continue_final_message needs the last message to be from the assistant, "
            f"got role {messages[-1]['role']!r}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **check_template_kwargs(template_kwargs),
        )
    except ValueError:
        raise
    except Exception as e:  # jinja errors, raise_exception() inside templates
        raise ValueError(f"the chat template failed on these messages: {e}") from e


def apply_chat_template(
    tokenizer: Any,
    messages: Any,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of the templated chat (see `render_chat`); no special token added twice."""
    prompt = render_chat(
        tokenizer, messages, add_generation_prompt, continue_final_message, template_kwargs
    )
    return list(tokenizer.encode(prompt, add_special_tokens=False))
