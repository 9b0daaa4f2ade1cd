"""A tokenizer that joins a running router (tokenizer_proc/joining.py) over real sockets, with a
fake router and decode worker: it registers with its bound address, takes the idx the welcome
gives it (the tokenizer_idx its requests carry), ignores a refusal, and on a signal leaves by
draining: Leave, the request it holds finishes, and the router's Shutdown ends it."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from pdserve import curve_auth
from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.ipc import AsyncInbox, AsyncOutbox, new_ipc_address
from pdserve.membership import JoinOptions
from pdserve.protocol import (
    Finish,
    GenerateReq,
    Heartbeat,
    Leave,
    PeerTable,
    PeerTableAck,
    Register,
    ReqOutput,
    Shutdown,
    TokenizedReq,
    TokenOut,
)
from pdserve.tokenizer_proc.joining import JoinedTokenizer

TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0  # the first Register comes once the tokenizer loaded (transformers)


@pytest.fixture(autouse=True)
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    curve_auth.set_cluster_secret(None)


async def _next(
    inbox: AsyncInbox,
    skip: tuple[type, ...] = (Heartbeat, Register),
    timeout_s: float = TIMEOUT_S,
) -> Any:
    """The next message that is not one of `skip` (liveness beats, repeated Registers)."""
    while True:
        msg = await asyncio.wait_for(inbox.recv(), timeout_s)
        if not isinstance(msg, skip):
            return msg


def _member(model_dir: Path, router_inbox: str) -> JoinedTokenizer:
    spec = TokenizerSpec(
        name="tok-b",
        idx=0,
        model_path=str(model_dir),
        inbox="tcp://127.0.0.1:*",
        router_inbox=router_inbox,
        worker_inboxes=(),
        max_context_len=256,
    )
    options = JoinOptions(router_inbox, "127.0.0.1", drain_timeout_s=30.0, register_interval_s=0.1)
    return JoinedTokenizer(spec, options)


def test_a_joined_tokenizer_takes_its_idx_and_drains_before_it_leaves(tokenizer_dir: Path):
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        router_address, worker_address = new_ipc_address("router"), new_ipc_address("w0")
        router, worker = AsyncInbox(router_address, ctx), AsyncInbox(worker_address, ctx)
        member = _member(tokenizer_dir, router_address)
        running = asyncio.create_task(member.run())
        register = await _next(router, (Heartbeat,), START_TIMEOUT_S)
        assert (register.name, register.role, register.pid) == ("tok-b", "tokenizer", os.getpid())
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", register.inbox)  # the port it bound
        to_tok = AsyncOutbox(register.inbox, ctx)

        error = "a tokenizer named 'tok-b' (pid 1) is in the cluster already"
        to_tok.send(PeerTable(0, [], [], [], for_name="tok-b", error=error))
        welcome = PeerTable(4, [worker_address], [], ["", register.inbox], for_name="tok-b", idx=1)
        to_tok.send(welcome)
        assert await _next(router) == PeerTableAck("tok-b", 4)  # the refusal was not acked
        assert member.idx == 1 and member.refusal == ""

        sampling = SamplingParams(max_new_tokens=4).to_dict()
        to_tok.send(GenerateReq(rid="held", sampling=sampling, text="hello", decode_idx=0))
        tokenized = await _next(worker)
        assert isinstance(tokenized, TokenizedReq) and tokenized.tokenizer_idx == 1

        member._on_signal()  # SIGTERM
        assert await _next(router) == Leave("tok-b", os.getpid())
        to_tok.send(TokenOut(rids=["held"], token_ids=[[5]], first_idx=[0],
                             finish=[Finish.at_length(1)]))  # fmt: skip
        out = await _next(router)
        assert isinstance(out, ReqOutput) and out.rid == "held" and out.finish.kind == "length"
        assert not running.done()  # until the router lets it go
        to_tok.send(Shutdown())
        assert await asyncio.wait_for(running, TIMEOUT_S) == 0
        for sock in (to_tok, router, worker):
            sock.close()
        ctx.term()

    asyncio.run(scenario())


def test_a_signal_before_the_welcome_or_a_second_one_stops_at_once(tokenizer_dir: Path):
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        router_address = new_ipc_address("router")
        router = AsyncInbox(router_address, ctx)
        member = _member(tokenizer_dir, router_address)
        running = asyncio.create_task(member.run())
        await _next(router, (Heartbeat,), START_TIMEOUT_S)  # its Register; no answer comes
        member._on_signal()
        assert await asyncio.wait_for(running, TIMEOUT_S) == 0  # nothing to drain

        member = _member(tokenizer_dir, router_address)
        running = asyncio.create_task(member.run())
        register = await _next(router, (Heartbeat,), START_TIMEOUT_S)
        to_tok = AsyncOutbox(register.inbox, ctx)
        to_tok.send(PeerTable(1, [], [], [register.inbox], for_name="tok-b", idx=0))
        assert await _next(router) == PeerTableAck("tok-b", 1)
        member._on_signal()
        assert await _next(router) == Leave("tok-b", os.getpid())
        member._on_signal()  # a second signal: no waiting for the router
        assert await asyncio.wait_for(running, TIMEOUT_S) == 0
        for sock in (to_tok, router):
            sock.close()
        ctx.term()

    asyncio.run(scenario())
