"""Reasoning models' thoughts apart from their answers: with `router.reasoning_parser` set (CLI
`--reasoning-parser`), a chat answer's `<think>...</think>` part goes to the message's
`reasoning_content` (vLLM's and SGLang's field) and the rest to `content`, whole or streamed.

- `deepseek_r1`: the template opens the thinking in the prompt, so the output starts inside it
  (DeepSeek-R1, QwQ, Qwen3 "thinking" releases): everything up to `</think>` is reasoning; an
  output that never closes it is all reasoning.
- `qwen3`: the model opens `<think>` itself when it thinks (Qwen3 hybrid models; with
  `chat_template_kwargs: {"enable_thinking": false}` it does not): an output that does not start
  with `<think>` is all content.

A request sends `separate_reasoning: false` (SGLang's field) to get the text as the model wrote it.
A constrained request's grammar starts after the thinking (serving_chat sets
`grammar_after_reasoning`; the worker compiles it with grammar_check.full_grammar_text).
"""

from __future__ import annotations

from typing import Any

_OPEN = "<think>"
_CLOSE = "</think>"
# chat_template_kwargs that switch a hybrid model's thinking off in its template (Qwen3 and
# GLM-4.5: enable_thinking; DeepSeek-V3.1: thinking): its prompt closes the thinking itself.
_THINKING_SWITCHES = ("enable_thinking", "thinking")


def thinking_off(template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a request's chat_template_kwargs switch the model's thinking off: its answer is
    then read as `qwen3` reads one that does not open with <think> (all content), whatever the
    server's parser, and a grammar holds the whole output."""
    return any((template_kwargs or {}).get(key) is False for key in _THINKING_SWITCHES)


def split_reasoning(text: str, parser: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    head = text.lstrip()
    opened = head.startswith(_OPEN)
    end = text.find(_CLOSE)
    if parser == "qwen3" and not opened:
        return None, text  # an answer that did not open with <think>: a `</think>` is its text
    if end < 0:
        return _without_open(text), ""  # still thinking when it stopped
    return _without_open(text[:end]), text[end + len(_CLOSE) :].lstrip()


def _without_open(text: str) -> str:
    head = text.lstrip()
    return head[len(_OPEN) :].lstrip("\n") if head.startswith(_OPEN) else text


class ReasoningStream:
    """One streamed choice's text, told apart as it arrives: `feed` returns (reasoning delta,
    content delta), holding back a tail that could be the start of a tag."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.phase = "undecided"  # until the output shows whether it opens with <think>
        self.held = ""  # text not yet sent
        self.strip_content = False  # the blank line after </think> is not content
        self.strip_reasoning = False  # nor the newline after <think> reasoning

    def feed(self, delta: str) -> tuple[str, str]:
        self.held += delta
        reasoning = content = ""
        if self.phase == "undecided":
            head = self.held.lstrip()
            if not head or (_OPEN.startswith(head) and head != _OPEN):
                return "", ""  # could still be the tag
            if head.startswith(_OPEN):
                self.phase, self.held = "reasoning", head[len(_OPEN) :]
                self.strip_reasoning = True
            else:  # deepseek_r1's output starts inside the thinking its prompt opened
                self.phase = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self.phase == "reasoning":
            if self.strip_reasoning:
                self.held = self.held.lstrip("\n")
                self.strip_reasoning = not self.held
            end = self.held.find(_CLOSE)
            if end < 0:
                keep = partial_tag_len(self.held, _CLOSE)
                reasoning = self.held[: len(self.held) - keep]
                self.held = self.held[len(self.held) - keep :]
                return reasoning, ""
            reasoning, self.held = self.held[:end], self.held[end + len(_CLOSE) :]
            self.phase, self.strip_content = "content", True
        if self.phase == "content":
            content, self.held = self.held, ""
            if self.strip_content:
                content = content.lstrip()
                self.strip_content = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held once the output has ended, as (reasoning, content)."""
        held, self.held = self.held, ""
        if self.phase == "reasoning":
            return held, ""
        if self.phase == "undecided":  # only blanks or a part of the tag came
            return (_without_open(held), "") if self.parser == "deepseek_r1" else ("", held)
        return "", held.lstrip() if self.strip_content else held


def partial_tag_len(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag` (a streamed tail held back
    until the next delta shows whether it is the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
