"""apply_chat_template with the tiny model's ChatML template."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pdserve.tokenizer_proc.chat_template import (
    apply_chat_template,
    check_template_kwargs,
    render_chat,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo, how are you? 日本語"},
]


def test_generation_prompt_opens_an_assistant_turn(tokenizer: Any):
    ids = apply_chat_template(tokenizer, CHAT)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHéllo, how are you? 日本語<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"])
    no_prompt = apply_chat_template(tokenizer, CHAT, add_generation_prompt=False)
    assert tokenizer.decode(no_prompt).endswith("日本語<|im_end|>\n")


def test_continue_final_message_leaves_the_assistant_turn_open(tokenizer: Any):
    chat = [*CHAT, {"role": "assistant", "content": "I am fine, and the answer is"}]
    text = render_chat(tokenizer, chat, add_generation_prompt=True, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nI am fine, and the answer is")
    assert text.count("<|im_start|>assistant") == 1  # no new turn opened after it
    ids = apply_chat_template(tokenizer, chat, continue_final_message=True)
    assert tokenizer.decode(ids) == text
    assert ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_continue_final_message_needs_an_assistant_message_last(tokenizer: Any):
    with pytest.raises(ValueError, match="last message to be from the assistant"):
        apply_chat_template(tokenizer, CHAT, continue_final_message=True)


def test_content_parts_are_joined_and_images_refused(tokenizer: Any):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": parts}])
    assert "user\nfirst\nsecond<|im_end|>" in tokenizer.decode(ids)
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    with pytest.raises(ValueError, match="images are not supported"):
        apply_chat_template(tokenizer, [{"role": "user", "content": [parts[0], image]}])


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "hi"}], "no 'role'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "user", "content": [{"type": "text"}]}], "must be"),
        (["hi"], "must be an object"),
    ],
)
def test_bad_messages_are_refused(tokenizer: Any, messages: Any, error: str):
    with pytest.raises(ValueError, match=error):
        apply_chat_template(tokenizer, messages)


def test_unknown_roles_are_left_to_the_template(tokenizer: Any):
    ids = apply_chat_template(tokenizer, [{"role": "narrator", "content": "Once"}])
    assert tokenizer.decode(ids).startswith("<|im_start|>narrator\nOnce<|im_end|>")


def test_bos_written_by_the_template_is_not_doubled(tokenizer_dir: Path, tmp_path: Path):
    """A tokenizer that adds BOS and a template that writes it: the prompt has exactly one."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    model = tmp_path / "bos_model"
    shutil.copytree(tokenizer_dir, model)
    backend = Tokenizer.from_file(str(model / "tokenizer.json"))
    bos = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    backend.save(str(model / "tokenizer.json"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}" + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.encode("hi")[0] == bos  # the tokenizer does add BOS to plain text

    ids = apply_chat_template(tok, CHAT)
    assert ids[0] == bos and ids.count(bos) == 1


THINKING_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}"
)  # Qwen3's switch, reduced


def test_template_kwargs_reach_the_template_as_transformers_passes_them(tokenizer: Any):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    default = render_chat(tokenizer, CHAT)
    off = render_chat(tokenizer, CHAT, template_kwargs={"enable_thinking": False})
    assert "<think>" not in default and off.endswith("assistant<think>\n\n</think>")
    want = tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == want
    ids = apply_chat_template(tokenizer, CHAT, template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(ids) == want


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ([1], "must be an object of template variables"),
        ({"tokenize": True}, "'tokenize' cannot be set here"),
        ({"add_generation_prompt": False}, "request fields"),
        ({"not a name": 1}, "is not a template variable name"),
    ],
)
def test_template_kwargs_that_are_not_template_variables_are_refused(
    kwargs: Any, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        check_template_kwargs(kwargs)
