"""The `chat_template` setting (topology key, `pdserve launch --chat-template`, `pdserve tokenizer
--chat-template`): a Jinja file or the template itself, checked when the topology is built (a
bad one names the key), carried as text to the tokenizers (which render chats with it) and the
router (which reads the tool-call format from it)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.topology import Topology, chat_template_text
from pdserve.entrypoints.launch_cli import _overrides, add_launch_parser
from pdserve.tokenizer_proc.chat_template import render_chat
from pdserve.tokenizer_proc.tokenizer_process import _load_core

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_a_file_or_the_template_itself(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert chat_template_text(str(path)) == TEMPLATE
    assert chat_template_text(TEMPLATE) == TEMPLATE
    for bad in ("", "no/such/file.jinja", 5):
        with pytest.raises(ValueError, match=r"^chat_template=.* is invalid"):
            chat_template_text(bad)


def test_the_topology_checks_it_and_the_launch_flag_sets_it(tiny_llama: Path) -> None:
    topology = Topology.for_model(str(tiny_llama), mode="mixed", device="cpu")
    assert topology.chat_template is None
    with pytest.raises(ValueError, match="chat_template='missing.jinja' is invalid"):
        Topology.for_model(str(tiny_llama), mode="mixed", chat_template="missing.jinja")
    parser = argparse.ArgumentParser()
    add_launch_parser(parser.add_subparsers())
    args = parser.parse_args(["launch", "--model", str(tiny_llama), "--chat-template", TEMPLATE])
    overrides = _overrides(args)
    assert overrides["chat_template"] == TEMPLATE
    with_flag = Topology.for_model(str(tiny_llama), mode="mixed", device="cpu", **overrides)
    assert with_flag.chat_template == TEMPLATE
    assert Topology.from_dict(with_flag.to_dict(redact=False)) == with_flag


def test_the_tokenizer_renders_chats_with_it(tiny_llama: Path) -> None:
    spec = TokenizerSpec(name="t", idx=0, model_path=str(tiny_llama), inbox="ipc://unused",
                         router_inbox="ipc://unused", worker_inboxes=(), max_context_len=0,
                         chat_template=TEMPLATE)  # fmt: skip
    expected = "[system] Be brief.\n[user] Hi!\n[assistant]"
    assert render_chat(_load_core(spec).tokenizer, MESSAGES) == expected
    own = _load_core(TokenizerSpec(**{**spec.to_dict(), "chat_template": None}))
    assert render_chat(own.tokenizer, MESSAGES) != expected  # the model's own template
