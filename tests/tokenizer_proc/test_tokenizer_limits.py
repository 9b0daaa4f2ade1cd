"""The tokenizer's edge checks: token ids within the vocabulary, the prompt-token limit checked
from a prefix before a huge prompt is tokenized whole, and long prompts tokenized off the event
loop while other requests keep streaming."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Abort, Finish, GenerateReq, ReqOutput, TokenizedReq, TokenOut
from pdserve.tokenizer_proc import tokenizer_process
from pdserve.tokenizer_proc.message_dispatch import dispatch
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore

CHAT = [{"role": "user", "content": "Tell me about the lighthouse."}]


def sampling(**kw: Any) -> dict[str, Any]:
    return SamplingParams(**kw).to_dict()


class RecordingTokenizer:
    """The real tokenizer, recording the length of every text it encodes; `delay_s` makes
    encoding a long text slow (sleeping releases the GIL, as the Rust tokenizer does)."""

    def __init__(self, tokenizer: Any, delay_s: float = 0.0) -> None:
        self._tokenizer = tokenizer
        self.delay_s = delay_s
        self.encoded_lengths: list[int] = []

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def encode(self, text: str, **kw: Any) -> list[int]:
        self.encoded_lengths.append(len(text))
        if self.delay_s and len(text) > 1000:
            time.sleep(self.delay_s)
        return self._tokenizer.encode(text, **kw)


class Outbox:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


@pytest.fixture
def core(tokenizer: Any) -> TokenizerCore:
    return TokenizerCore(tokenizer, idx=0, max_context_len=256, num_workers=1)


# ---------------------------------------------------------------------- the vocabulary


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"logit_bias": {100000: 5.0}}, "logit_bias"),
        ({"logit_bias": {3: 1.0, 512: -1.0}}, "logit_bias"),
        ({"stop_token_ids": [7, 512], "min_new_tokens": 2}, "stop_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_parameter(
    core: TokenizerCore, params: dict[str, Any], key: str
) -> None:
    assert core.vocab_size == 512
    req = GenerateReq(rid="p", sampling=sampling(**params), text="hi")
    with pytest.raises(ValueError, match=rf"^{key}=\[\d+\] is invalid: .*\[0, 512\)"):
        core.on_generate(req)
    assert "p" not in core.states


def test_ids_at_the_vocabulary_edge_are_accepted(core: TokenizerCore) -> None:
    params = sampling(logit_bias={511: 2.0, 0: -1.0}, stop_token_ids=[511])
    _, msg = core.on_generate(GenerateReq(rid="edge", sampling=params, text="hi"))
    assert msg.sampling["logit_bias"] == {"511": 2.0, "0": -1.0}


# ---------------------------------------------------------------------- prompt tokens


@pytest.mark.parametrize(
    "prompt",
    [
        {"text": "hi " * 40},
        {"messages": [{"role": "user", "content": "hi " * 40}]},
        {"input_ids": list(range(1, 41))},
    ],  # fmt: skip
    ids=["text", "messages", "input_ids"],
)
def test_max_prompt_tokens_refuses_longer_prompts(core: TokenizerCore, prompt: dict) -> None:
    req = GenerateReq(rid="p", sampling=sampling(max_new_tokens=1), max_prompt_tokens=30, **prompt)
    with pytest.raises(ValueError, match=r"^prompt has \d+ tokens: expected at most 30"):
        core.on_generate(req)
    ok = GenerateReq(rid="p", sampling=sampling(max_new_tokens=1), max_prompt_tokens=200, **prompt)
    assert len(core.on_generate(ok)[1].input_ids) >= 40


def test_a_huge_prompt_is_refused_after_tokenizing_only_a_prefix(tokenizer: Any) -> None:
    recording = RecordingTokenizer(tokenizer)
    core = TokenizerCore(recording, idx=0, max_context_len=256, num_workers=1)
    text = "the keeper climbed the stairs of the lighthouse. " * 100_000  # 5 MB
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^prompt has at least \d+ tokens: expected at most 256"):
        core.on_generate(GenerateReq(rid="huge", sampling=sampling(), text=text))
    assert time.perf_counter() - start < 1.0
    assert recording.encoded_lengths == [8 * 256]  # the probe only, never the 5 MB


def test_an_inconclusive_prefix_lets_the_whole_prompt_be_counted(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This tokenizer never reaches 8 characters a token: probe at 2 to see the other branch.
    monkeypatch.setattr(tokenizer_process, "_PROBE_CHARS_PER_TOKEN", 2)
    recording = RecordingTokenizer(tokenizer)
    core = TokenizerCore(recording, idx=0, max_context_len=64, num_workers=1)
    text = "the " * 50  # 200 characters, about 50 tokens
    req = GenerateReq(rid="a", sampling=sampling(max_new_tokens=1), text=text)
    assert core.on_generate(req)[1].input_ids == tokenizer.encode(text)
    assert recording.encoded_lengths == [128, 200]  # the probe, then the whole prompt


# ---------------------------------------------------------------------- off the event loop


def test_other_requests_stream_while_a_long_prompt_is_tokenized(tokenizer: Any) -> None:
    slow = RecordingTokenizer(tokenizer, delay_s=0.5)
    core = TokenizerCore(slow, idx=0, max_context_len=0, num_workers=1)
    to_router, to_worker = Outbox(), Outbox()
    encoder = ThreadPoolExecutor(1)

    async def scenario() -> None:
        dispatch(core, GenerateReq(rid="short", sampling=sampling(), text="hi"), to_router,
                  [to_worker], encoder)  # fmt: skip
        assert [m.rid for m in to_worker.sent] == ["short"]  # short prompts: inline
        long_text = "one two three " * 1000  # over the inline limit: to the thread
        dispatch(core, GenerateReq(rid="long", sampling=sampling(), text=long_text), to_router,
                  [to_worker], encoder)  # fmt: skip
        ids = tokenizer.encode("still streaming")
        tokens = TokenOut(["short"], [ids], [0], [Finish.at_length(len(ids))])
        dispatch(core, tokens, to_router, [to_worker], encoder)
        # The short request's text went out while the long prompt is still being tokenized.
        assert "long" in core.tokenizing
        (out,) = to_router.sent
        assert isinstance(out, ReqOutput) and out.text_delta == "still streaming"
        for _ in range(200):
            if len(to_worker.sent) == 2:
                break
            await asyncio.sleep(0.01)
        long_req = to_worker.sent[1]
        assert isinstance(long_req, TokenizedReq) and long_req.rid == "long"
        assert long_req.input_ids == tokenizer.encode(long_text)
        assert "long" in core.states and not core.tokenizing

    try:
        asyncio.run(scenario())
    finally:
        encoder.shutdown()


def test_a_request_aborted_while_tokenized_is_dropped(tokenizer: Any) -> None:
    slow = RecordingTokenizer(tokenizer, delay_s=0.2)
    core = TokenizerCore(slow, idx=0, max_context_len=0, num_workers=1)
    to_router, to_worker = Outbox(), Outbox()
    encoder = ThreadPoolExecutor(1)

    async def scenario() -> None:
        req = GenerateReq(rid="gone", sampling=sampling(), text="x y " * 5000)
        dispatch(core, req, to_router, [to_worker], encoder)
        dispatch(core, req, to_router, [to_worker], encoder)  # the same rid again: refused
        (dup,) = to_router.sent
        assert dup.rid == "gone" and "already in flight" in dup.error
        dispatch(core, Abort(rid="gone"), to_router, [to_worker], encoder)
        await asyncio.sleep(0.5)
        assert to_worker.sent == [] and len(to_router.sent) == 1
        assert "gone" not in core.states and not core.tokenizing

    try:
        asyncio.run(scenario())
    finally:
        encoder.shutdown()
