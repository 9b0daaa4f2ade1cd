"""The tokenizer process: its core logic directly, and `serve` over real ZeroMQ ipc sockets."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from pdserve import codec
from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.ipc import AsyncInbox, AsyncOutbox, new_ipc_address
from pdserve.protocol import (
    Abort,
    Finish,
    GenerateReq,
    Heartbeat,
    Ready,
    ReqOutput,
    Shutdown,
    TokenizedReq,
    TokenizeReq,
    TokenOut,
)
from pdserve.tokenizer_proc.chat_template import apply_chat_template
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore, serve

TIMEOUT_S = 10.0
CHAT = [{"role": "user", "content": "Tell me about the lighthouse. 日本語で?"}]
ANSWER = "The keeper climbed the stairs — ça va, 東京は大きい。"


def sampling(**kw: Any) -> dict[str, Any]:
    return SamplingParams(**kw).to_dict()


def token_out(rid: str, ids: list[int], first_idx: int, finish: Any = None, **kw: Any) -> TokenOut:
    return TokenOut(rids=[rid], token_ids=[ids], first_idx=[first_idx], finish=[finish], **kw)


def eos_stop(tokenizer: Any) -> dict[str, Any]:
    return Finish.stop(tokenizer.eos_token_id)


# ---------------------------------------------------------------------- the core, no sockets


@pytest.fixture
def core(tokenizer: Any) -> TokenizerCore:
    return TokenizerCore(tokenizer, idx=3, max_context_len=256, num_workers=2)


def test_generate_is_tokenized_for_the_chosen_worker(core: TokenizerCore, tokenizer: Any):
    req = GenerateReq(rid="a", sampling=sampling(), messages=CHAT, decode_idx=1, prefill_idx=4)
    worker_idx, msg = core.on_generate(req)
    assert worker_idx == 1
    assert msg == TokenizedReq("a", apply_chat_template(tokenizer, CHAT), req.sampling, 3, 4)
    text_req = GenerateReq(rid="b", sampling=sampling(), text="Héllo")
    assert core.on_generate(text_req)[1].input_ids == tokenizer.encode("Héllo")


def test_finish_before_the_first_token_waits_for_it(core: TokenizerCore, tokenizer: Any):
    core.on_generate(GenerateReq(rid="a", sampling=sampling(), text="hi"))
    ids = tokenizer.encode(ANSWER) + [tokenizer.eos_token_id]
    assert core.on_token_out(token_out("a", ids[3:], 3, eos_stop(tokenizer))) == []
    assert core.on_token_out(token_out("a", ids[1:3], 1)) == []
    outs = core.on_token_out(token_out("a", ids[:1], 0, prompt_tokens=[1], cached_tokens=[1]))
    assert len(outs) == 1
    out = outs[0]
    assert out.output_ids == ids and out.text_delta == ANSWER
    assert out.finish == eos_stop(tokenizer) and out.completion_tokens == len(ids)
    assert (out.prompt_tokens, out.cached_tokens) == (1, 1)
    assert "a" not in core.states
    assert core.on_token_out(token_out("a", [5], len(ids))) == []  # late tokens: ignored


def test_worker_abort_ends_the_request_even_with_tokens_missing(core: TokenizerCore):
    core.on_generate(GenerateReq(rid="a", sampling=sampling(), text="hi"))
    abort = Finish.abort("prefill worker lost")
    (out,) = core.on_token_out(token_out("a", [], 1, abort))
    assert out.finish == abort and out.output_ids == [] and out.error is None
    assert "a" not in core.states


def test_resent_tokens_are_not_released_twice(core: TokenizerCore, tokenizer: Any):
    core.on_generate(GenerateReq(rid="a", sampling=sampling(), text="hi"))
    ids = tokenizer.encode("one two three")
    (first,) = core.on_token_out(token_out("a", ids[:2], 0))
    (second,) = core.on_token_out(token_out("a", ids[1:], 1, Finish.at_length(3)))
    assert first.output_ids + second.output_ids == ids
    assert first.text_delta + second.text_delta == "one two three"


def test_logprobs_and_token_texts_follow_the_tokens(core: TokenizerCore, tokenizer: Any):
    req = GenerateReq(rid="a", sampling=sampling(), text="hi", return_logprob=True,
                      top_logprobs_num=2, echo=True)  # fmt: skip
    core.on_generate(req)
    ids = tokenizer.encode("ab é")
    top = [[[i, -0.5], [i + 1, -1.5]] for i in ids]
    logprobs = [-0.1 * (k + 1) for k in range(len(ids))]
    msg = token_out("a", ids, 0, Finish.at_length(len(ids)),
                    logprobs=[logprobs], top_logprobs=[top])  # fmt: skip
    (out,) = core.on_token_out(msg)
    assert out.logprobs == logprobs and out.top_logprobs == top
    assert out.token_texts == [tokenizer.decode([i]) for i in ids]
    assert out.top_token_texts == [[tokenizer.decode([i]), tokenizer.decode([i + 1])] for i in ids]
    assert out.prompt_text == "hi"


def test_token_in_token_out_has_no_text(core: TokenizerCore):
    req = GenerateReq(rid="a", sampling=sampling(), input_ids=[5, 6, 7], return_text=False)
    assert core.on_generate(req)[1].input_ids == [5, 6, 7]
    (out,) = core.on_token_out(token_out("a", [8, 9], 0, Finish.at_length(2)))
    assert out.text_delta == "" and out.output_ids == [8, 9] and out.token_texts is None


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"text": "hi " * 300}, "maximum context length is 256 tokens"),
        (
            {"text": "hi", "sampling": sampling(max_new_tokens=300)},
            "in the prompt, 300 in the comp",
        ),
        ({"messages": CHAT, "max_context_len": 20}, "in the messages"),
        ({"text": ""}, "^prompt has no tokens: the prompt is empty"),
        ({"input_ids": [1, 99999]}, r"input_ids\[1\]=99999"),
        ({"input_ids": [1, "x"]}, r"input_ids\[1\]='x'"),
        ({"text": "a", "input_ids": [1]}, "exactly one of"),
        ({"messages": [{"content": "no role"}]}, "no 'role'"),
        ({"text": "hi", "decode_idx": 5}, "decode_idx=5"),
        ({"text": "hi", "sampling": {"temperature": -1.0}}, "temperature"),
    ],
)
def test_bad_requests_are_refused(core: TokenizerCore, fields: dict[str, Any], error: str):
    req = GenerateReq(**{"rid": "bad", "sampling": sampling(), **fields})
    with pytest.raises(ValueError, match=error):
        core.on_generate(req)
    assert "bad" not in core.states


# ---------------------------------------------------------------------- serve() over ipc


@dataclass
class Peers:
    """The fake router, workers and launcher around one running tokenizer process."""

    to_tokenizer: AsyncOutbox
    router: AsyncInbox
    workers: list[AsyncInbox]
    task: asyncio.Task[None]

    async def recv(self, inbox: AsyncInbox) -> Any:
        while True:
            msg = await asyncio.wait_for(inbox.recv(), TIMEOUT_S)
            if not isinstance(msg, Heartbeat):  # the router inbox also gets the liveness beats
                return msg

    async def outputs_until_finish(self, rid: str) -> list[ReqOutput]:
        outs: list[ReqOutput] = []
        while not outs or outs[-1].finish is None:
            out = await self.recv(self.router)
            assert out.rid == rid
            outs.append(out)
        return outs


@asynccontextmanager
async def running_tokenizer(model_dir: Path, max_context_len: int = 256) -> AsyncIterator[Peers]:
    ctx = zmq.asyncio.Context()
    addresses = {n: new_ipc_address(n) for n in ("tok", "router", "w0", "w1", "launcher")}
    router, launcher = AsyncInbox(addresses["router"], ctx), AsyncInbox(addresses["launcher"], ctx)
    workers = [AsyncInbox(addresses["w0"], ctx), AsyncInbox(addresses["w1"], ctx)]
    spec = TokenizerSpec(
        name="tokenizer0",
        idx=0,
        model_path=str(model_dir),
        inbox=addresses["tok"],
        router_inbox=addresses["router"],
        worker_inboxes=(addresses["w0"], addresses["w1"]),
        launcher_inbox=addresses["launcher"],
        max_context_len=max_context_len,
    )
    task = asyncio.create_task(serve(spec))
    ready = await asyncio.wait_for(launcher.recv(), TIMEOUT_S)
    assert ready == Ready(name="tokenizer0", info=ready.info)
    peers = Peers(AsyncOutbox(addresses["tok"], ctx), router, workers, task)
    try:
        yield peers
    finally:
        peers.to_tokenizer.send(Shutdown())
        await asyncio.wait_for(task, TIMEOUT_S)
        for sock in (peers.to_tokenizer, router, launcher, *workers):
            sock.close()
        ctx.term()


def test_serve_streams_out_of_order_tokens_in_order(tokenizer_dir: Path, tokenizer: Any):
    async def scenario() -> None:
        async with running_tokenizer(tokenizer_dir) as peers:
            req = GenerateReq(rid="r1", sampling=sampling(), messages=CHAT, decode_idx=1)
            peers.to_tokenizer.send(req)
            tokenized = await peers.recv(peers.workers[1])
            assert tokenized.rid == "r1"
            assert tokenized.input_ids == apply_chat_template(tokenizer, CHAT)

            ids = tokenizer.encode(ANSWER) + [tokenizer.eos_token_id]
            # Decode's pieces first (the last one finishing), prefill's first token last.
            peers.to_tokenizer.send(token_out("r1", ids[1:4], 1))
            peers.to_tokenizer.send(token_out("r1", ids[7:], 7, eos_stop(tokenizer)))
            peers.to_tokenizer.send(token_out("r1", ids[4:7], 4))
            await asyncio.sleep(0.05)
            peers.to_tokenizer.send(token_out("r1", ids[:1], 0))
            outs = await peers.outputs_until_finish("r1")
            assert [t for out in outs for t in out.output_ids] == ids
            assert "".join(out.text_delta for out in outs) == ANSWER
            assert [out.finish is not None for out in outs].count(True) == 1
            assert outs[-1].completion_tokens == len(ids)
            assert outs[-1].prompt_tokens == len(tokenized.input_ids)

    asyncio.run(scenario())


def test_serve_trims_the_matched_stop_string(tokenizer_dir: Path, tokenizer: Any):
    async def scenario() -> None:
        async with running_tokenizer(tokenizer_dir) as peers:
            params = sampling(stop=["climbed"])
            peers.to_tokenizer.send(GenerateReq(rid="s", sampling=params, text="Once"))
            await peers.recv(peers.workers[0])
            ids = tokenizer.encode("The keeper climbed")
            for k, tid in enumerate(ids):
                finish = Finish.stop("climbed") if k == len(ids) - 1 else None
                peers.to_tokenizer.send(token_out("s", [tid], k, finish))
            outs = await peers.outputs_until_finish("s")
            assert all("clim" not in out.text_delta for out in outs)
            assert "".join(out.text_delta for out in outs) == "The keeper "

    asyncio.run(scenario())


def test_serve_answers_bad_requests_and_keeps_serving(tokenizer_dir: Path, tokenizer: Any):
    async def scenario() -> None:
        async with running_tokenizer(tokenizer_dir, max_context_len=64) as peers:
            peers.to_tokenizer.send(GenerateReq(rid="long", sampling=sampling(), text="hi " * 80))
            too_long = await peers.recv(peers.router)
            assert too_long.rid == "long" and "maximum context length is 64" in too_long.error
            assert too_long.finish.kind == "abort"

            bad_ids = GenerateReq(rid="ids", sampling=sampling(), input_ids=[3, 10**6])
            peers.to_tokenizer.send(bad_ids)
            refused = await peers.recv(peers.router)
            assert refused.rid == "ids" and "input_ids[1]=1000000" in refused.error

            # Tokens of an unknown rid, and of one the router aborted: dropped silently.
            short = sampling(max_new_tokens=8)
            peers.to_tokenizer.send(GenerateReq(rid="gone", sampling=short, text="x"))
            await peers.recv(peers.workers[0])
            peers.to_tokenizer.send(Abort(rid="gone"))
            peers.to_tokenizer.send(token_out("gone", [5], 0, Finish.at_length(1)))
            peers.to_tokenizer.send(token_out("nobody", [5], 0))

            peers.to_tokenizer.send(GenerateReq(rid="ok", sampling=short, input_ids=[5, 6]))
            assert (await peers.recv(peers.workers[0])).input_ids == [5, 6]
            ids = tokenizer.encode("still alive")
            peers.to_tokenizer.send(token_out("ok", ids, 0, Finish.at_length(2)))
            (out,) = await peers.outputs_until_finish("ok")
            assert out.text_delta == "still alive" and out.error is None

    asyncio.run(scenario())


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


def test_chat_template_kwargs_travel_and_reach_the_template(tokenizer: Any) -> None:
    """Through the codec (as the router sends them) into the tokenizer's render, for generation
    and for /tokenize; transformers' own apply_chat_template with the same variable is the
    reference."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    core = TokenizerCore(tokenizer, idx=0, max_context_len=256, num_workers=1)
    kwargs = {"enable_thinking": False}
    want_text = tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert "<think></think>" in want_text
    want = tokenizer.encode(want_text, add_special_tokens=False)
    req = codec.decode(codec.encode(GenerateReq(
        rid="k", sampling=sampling(), messages=CHAT, chat_template_kwargs=kwargs
    )))  # fmt: skip
    assert req.chat_template_kwargs == kwargs
    assert core.on_generate(req)[1].input_ids == want
    plain = core.on_generate(GenerateReq(rid="p", sampling=sampling(), messages=CHAT))[1]
    assert plain.input_ids != want
    tok = TokenizeReq(rid="t", messages=CHAT, add_special_tokens=False, chat_template_kwargs=kwargs)
    assert core.on_tokenize(codec.decode(codec.encode(tok))).token_ids == [want]


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)  # a Hermes-style template, reduced


def test_tools_and_calls_reach_the_template_as_transformers_passes_them(tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    core = TokenizerCore(tokenizer, idx=0, max_context_len=512, num_workers=1)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}  # fmt: skip
    messages = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [call]}]
    want_text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"get_time"' in want_text and '{"zone": "UTC"}' in want_text
    req = codec.decode(codec.encode(
        GenerateReq(rid="t", sampling=sampling(), messages=messages, tools=tools)
    ))  # fmt: skip
    assert core.on_generate(req)[1].input_ids == tokenizer.encode(
        want_text, add_special_tokens=False
    )
