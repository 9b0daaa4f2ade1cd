"""`/tokenize` and `/detokenize` over the real routes and codec, answered by a real TokenizerCore
in place of the tokenizer process: vLLM's and SGLang's shapes, refusals, and a tokenizer that
never answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from pdserve import protocol
from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.router import serving_tokenize
from pdserve.router.errors import install_error_handlers
from pdserve.router.pending_replies import PendingReplies
from pdserve.tokenizer_proc.chat_template import apply_chat_template
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore

MODEL = "tiny-llama"


class AnsweringInbox:
    """A tokenizer's inbox whose messages cross the codec and are answered at once by `core`;
    with no core, nothing ever answers (a lost tokenizer)."""

    def __init__(self, replies: PendingReplies, core: TokenizerCore | None) -> None:
        self.replies, self.core = replies, core

    def send(self, msg: Any) -> None:
        received = protocol.decode(protocol.encode(msg))
        if self.core is not None:
            answer = protocol.decode(protocol.encode(self.core.on_tokenize(received)))
            self.replies.deliver(answer)


def fake_router(core: TokenizerCore | None, max_context_len: int = 0) -> Any:
    spec = RouterSpec(
        model_name=MODEL,
        inbox="ipc:///unused",
        tokenizer_inboxes=("ipc:///unused-t",),
        workers=(WorkerEntry("mixed0", "mixed", 0, "ipc:///unused-w"),),
        max_context_len=max_context_len,
        limits={"max_prompts": 3, "max_prompt_chars": 50},
    )
    replies = PendingReplies()
    tokenizer = SimpleNamespace(name="tokenizer0", idx=0)
    return SimpleNamespace(
        spec=spec,
        replies=replies,
        is_started=True,
        to_tokenizers=[AnsweringInbox(replies, core)],
        workers=SimpleNamespace(healthy_tokenizers=lambda: [tokenizer]),
    )


def client_of(router: Any) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    serving_tokenize.add_tokenize_routes(app, router)
    return TestClient(app)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def client(tokenizer: Any) -> Iterator[TestClient]:
    core = TokenizerCore(tokenizer, idx=0, max_context_len=2048, num_workers=1)
    with client_of(fake_router(core, max_context_len=1024)) as c:
        yield c


def test_vllm_tokenize_shape_for_a_prompt_and_for_messages(client: TestClient, tokenizer: Any):
    res = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert res.status_code == 200
    ids = tokenizer.encode("Hello world")
    assert res.json() == {"tokens": ids, "count": len(ids), "max_model_len": 1024}
    chat = [{"role": "user", "content": "Hi"}]
    res = client.post("/v1/tokenize", json={"messages": chat, "return_token_strs": True}).json()
    ids = apply_chat_template(tokenizer, chat)  # what a chat completion is given
    assert res["tokens"] == ids and res["count"] == len(ids)
    assert res["token_strs"] == tokenizer.convert_ids_to_tokens(ids)


def test_sglang_batch_tokenize_shape(client: TestClient, tokenizer: Any) -> None:
    body = {"prompt": ["a b", "東京"], "add_special_tokens": False}
    res = client.post("/v1/tokenize", json=body).json()
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in body["prompt"]]
    assert res == {"tokens": ids, "count": [len(x) for x in ids], "max_model_len": 1024}


def test_detokenize_answers_in_both_shapes(client: TestClient, tokenizer: Any) -> None:
    ids = tokenizer.encode("ça va, 東京", add_special_tokens=False)
    res = client.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert res == {"text": "ça va, 東京", "prompt": "ça va, 東京"}  # SGLang's and vLLM's key
    eos = tokenizer.eos_token_id
    body = {"tokens": [ids, [eos]], "skip_special_tokens": False}
    res = client.post("/v1/detokenize", json=body).json()
    assert res["text"] == ["ça va, 東京", tokenizer.eos_token] == res["prompt"]


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt",
         "exactly one of prompt or messages"),
        ("/tokenize", {}, "prompt", "exactly one of prompt or messages"),
        ("/tokenize", {"model": "other", "prompt": "x"}, "model", "does not exist"),
        ("/tokenize", {"prompt": ["a", "b", "c", "d"]}, "prompt", "expected at most 3"),
        ("/tokenize", {"prompt": "x" * 51}, "prompt", "expected at most 50"),
        ("/detokenize", {"tokens": [3, 99999]}, "tokens", "tokens=[99999] is invalid"),
        ("/detokenize", {"tokens": [[1]] * 4}, "tokens", "expected at most 3"),
        ("/tokenize", {"prompt": "x", "truncation": True}, "truncation", "Extra inputs"),
        ("/detokenize", {"tokens": [1], "skip": 1}, "skip", "Extra inputs"),
    ],
)  # fmt: skip
def test_bad_requests_get_openais_error_body(
    client: TestClient, path: str, body: dict, param: str | None, message: str
) -> None:
    res = client.post(path, json=body)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert message in err["message"] and err["param"] == param


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", b'{"prompt": ["ok", "a \\udfff"]}', "prompt"),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ],
)
def test_text_that_is_not_unicode_is_refused_naming_its_field(
    client: TestClient, path: str, raw: bytes, param: str
) -> None:
    # legal JSON, a lone surrogate: no codec can carry it
    res = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"], err


def test_a_tokenizer_that_never_answers_gives_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_tokenize, "ANSWER_TIMEOUT_S", 0.2)
    router = fake_router(core=None)
    with client_of(router) as c:
        res = c.post("/tokenize", json={"prompt": "x"})
    assert res.status_code == 503 and "tokenizer0 did not answer" in res.json()["error"]["message"]
    assert len(router.replies) == 0  # the wait is forgotten
    router.workers.healthy_tokenizers = lambda: []
    with client_of(router) as c:
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 503


def test_a_late_answer_is_dropped_and_a_rid_waits_once() -> None:
    async def scenario() -> None:
        replies = PendingReplies()
        with pytest.raises(TimeoutError):
            await replies.ask("r", lambda: None, timeout_s=0.01)
        replies.deliver(protocol.TokenizeOut(rid="r"))  # nobody waits: dropped
        waiting = asyncio.ensure_future(replies.ask("s", lambda: None, timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already waiting"):
            await replies.ask("s", lambda: None, timeout_s=5)
        replies.deliver(protocol.TokenizeOut(rid="s", texts=["ok"]))
        assert (await waiting).texts == ["ok"] and len(replies) == 0

    asyncio.run(scenario())
