"""A cluster launched with its own chat template (`chat_template` in the topology, as `pdserve
launch --chat-template` sets it): the tokenizer renders chats with it (the ids /tokenize gives
for messages are those of the template's text) and the router reads the tool-call format from
it (tool_choice "auto" is served: the tiny model's own template writes no format, so it is
refused there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_clusters import start_cluster
from transformers import AutoTokenizer

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if tools %}Call tools as <tool_call>{...}</tool_call>\n{% endif %}[assistant]"
)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def templated(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    cluster = start_cluster(tiny_llama, "mixed", chat_template=str(path))
    yield cluster
    cluster.stop(grace_s=1)


def test_chats_are_rendered_with_the_clusters_template(templated: Cluster, tiny_llama: Path):
    resp = httpx.post(f"{templated.url}/tokenize", json={"messages": MESSAGES}, timeout=30)
    assert resp.status_code == 200, resp.text
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    text = "[user] What is the weather in Paris?\n[assistant]"
    assert resp.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)


def test_the_tool_call_format_is_read_from_it(templated: Cluster) -> None:
    body = {"model": "llama", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4}
    resp = httpx.post(f"{templated.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"
