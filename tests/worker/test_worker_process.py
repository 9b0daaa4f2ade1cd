"""Worker process loops driven in this process over real ZeroMQ sockets: a mixed worker, and a
decode worker whose prefill peer is the test itself."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pdserve import protocol
from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.process_specs import KVTransferSpec, WorkerSpec
from pdserve.ipc import Inbox, Outbox, new_ipc_address
from pdserve.protocol import Finish
from pdserve.worker.worker_process import WorkerProcess


@pytest.fixture
def worker(tiny_llama: Path):  # type: ignore[no-untyped-def]
    engine = EngineConfig(
        model_path=str(tiny_llama),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=256, page_size=4),
    )
    tokenizer_inbox = Inbox(new_ipc_address("test-tok"))
    spec = WorkerSpec(
        name="mixed0",
        role="mixed",
        idx=0,
        engine=engine,
        inbox=new_ipc_address("test-worker"),
        tokenizer_inboxes=(tokenizer_inbox.address,),
        kv=KVTransferSpec(backend="tcp", timeout_s=30.0),
    )
    proc = WorkerProcess(spec)
    thread = threading.Thread(target=proc.run, daemon=True)
    thread.start()
    to_worker = Outbox(spec.inbox)
    yield proc, to_worker, tokenizer_inbox
    to_worker.send(protocol.Shutdown())
    thread.join(timeout=10)
    tokenizer_inbox.close()


def _collect(inbox: Inbox, rid: str) -> tuple[list[int], dict | None]:
    tokens: list[int] = []
    for _ in range(200):
        msg = inbox.recv(timeout_ms=5000)
        assert msg is not None, "no output from the worker"
        for i, r in enumerate(msg.rids):
            if r == rid:
                tokens += msg.token_ids[i]
                if msg.finish[i] is not None:
                    return tokens, msg.finish[i]
    raise AssertionError("the request never finished")


def _req(rid: str, n: int) -> protocol.TokenizedReq:
    return protocol.TokenizedReq(
        rid=rid,
        input_ids=[5, 6, 7, 8, 9],
        tokenizer_idx=0,
        sampling={"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    )


def test_a_failing_step_ends_its_requests_with_an_error_and_the_worker_keeps_serving(
    worker,  # type: ignore[no-untyped-def]
) -> None:
    proc, to_worker, tokenizer_inbox = worker
    real_forward = proc.core.runner.forward
    calls = {"n": 0}

    def flaky_forward(batch, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real_forward(batch, *args)

    proc.core.runner.forward = flaky_forward  # type: ignore[method-assign]
    to_worker.send(_req("doomed", 4))
    tokens, finish = _collect(tokenizer_inbox, "doomed")
    assert finish.kind == "abort" and "simulated device failure" in finish.message
    assert finish.status_code == 500  # the server's fault, not the client's
    to_worker.send(_req("fine", 4))
    tokens, finish = _collect(tokenizer_inbox, "fine")
    assert finish == Finish.at_length(4) and len(tokens) == 4
    sched = proc.scheduler
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.num_total


def test_a_prompt_too_large_for_the_pool_is_refused_without_killing_the_worker(
    worker,  # type: ignore[no-untyped-def]
) -> None:
    _, to_worker, tokenizer_inbox = worker
    big = protocol.TokenizedReq(
        rid="big", input_ids=[5] * 2000, tokenizer_idx=0, sampling={"max_new_tokens": 2}
    )
    to_worker.send(big)
    _, finish = _collect(tokenizer_inbox, "big")
    assert finish.kind == "abort" and "does not fit" in finish.message
    to_worker.send(_req("after", 2))
    assert _collect(tokenizer_inbox, "after")[1].kind == "length"


def test_a_message_naming_a_peer_the_worker_lacks_is_dropped_and_the_worker_keeps_serving(
    worker,  # type: ignore[no-untyped-def]
) -> None:
    _, to_worker, tokenizer_inbox = worker
    stray = protocol.TokenizedReq(
        rid="stray", input_ids=[5, 6], tokenizer_idx=7, sampling={"max_new_tokens": 2}
    )
    to_worker.send(stray)
    to_worker.send(_req("after", 2))
    tokens, finish = _collect(tokenizer_inbox, "after")
    assert finish.kind == "length" and len(tokens) == 2


@pytest.fixture
def decode_worker(tiny_llama: Path):  # type: ignore[no-untyped-def]
    """A decode worker (tcp KV, 0.5 s KV timeout); the test plays its prefill worker."""
    engine = EngineConfig(
        model_path=str(tiny_llama),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=64, page_size=4, enable_prefix_cache=False),
    )
    tokenizer_inbox = Inbox(new_ipc_address("test-tok"))
    prefill_inbox = Inbox(new_ipc_address("test-prefill"))
    spec = WorkerSpec(
        name="decode0",
        role="decode",
        idx=0,
        engine=engine,
        inbox=new_ipc_address("test-decode"),
        tokenizer_inboxes=(tokenizer_inbox.address,),
        prefill_inboxes=(prefill_inbox.address,),
        kv=KVTransferSpec(backend="tcp", timeout_s=0.5),
    )
    proc = WorkerProcess(spec)
    thread = threading.Thread(target=proc.run, daemon=True)
    thread.start()
    to_worker = Outbox(spec.inbox)
    yield proc, to_worker, tokenizer_inbox, prefill_inbox
    to_worker.send(protocol.Shutdown())
    thread.join(timeout=10)
    tokenizer_inbox.close()
    prefill_inbox.close()


def _all_pages_free(proc: WorkerProcess) -> bool:
    allocator = proc.scheduler.allocator
    return allocator.num_free == allocator.num_total


def test_a_decode_worker_reserves_pages_asks_the_prefill_and_frees_them_when_it_fails(
    decode_worker,  # type: ignore[no-untyped-def]
) -> None:
    proc, to_worker, tokenizer_inbox, prefill_inbox = decode_worker
    to_worker.send(_req("r1", 4))
    task = prefill_inbox.recv(timeout_ms=5000)
    assert isinstance(task, protocol.PrefillTask) and task.rid == "r1"
    assert len(task.dst_pages) == 2 and task.kv_handshake["backend"] == "tcp"
    assert not _all_pages_free(proc)  # reserved for the transfer
    to_worker.send(protocol.KVFailed("r1", "prompt too long for prefill", 400))
    tokens, finish = _collect(tokenizer_inbox, "r1")
    assert tokens == [] and finish == Finish.abort("prompt too long for prefill", 400)
    assert _all_pages_free(proc) and "r1" not in proc.role.handoff


def test_a_decode_worker_times_out_a_transfer_and_tells_the_prefill_to_drop_it(
    decode_worker,  # type: ignore[no-untyped-def]
) -> None:
    proc, to_worker, tokenizer_inbox, prefill_inbox = decode_worker
    to_worker.send(_req("slow", 4))
    assert isinstance(prefill_inbox.recv(timeout_ms=5000), protocol.PrefillTask)
    _, finish = _collect(tokenizer_inbox, "slow")  # no KVReady: 0.5 s later it gives up
    assert finish.is_abort and finish.status_code == 504 and "timed out" in finish.message
    assert prefill_inbox.recv(timeout_ms=5000) == protocol.Abort(rid="slow")
    assert _all_pages_free(proc)
    to_worker.send(protocol.KVReady("slow", first_token=3, cached_tokens=0))  # late: ignored
    to_worker.send(_req("next", 4))
    assert prefill_inbox.recv(timeout_ms=5000).rid == "next"


def test_an_abort_while_waiting_for_kv_frees_the_pages_without_notifying_the_client(
    decode_worker,  # type: ignore[no-untyped-def]
) -> None:
    proc, to_worker, tokenizer_inbox, prefill_inbox = decode_worker
    to_worker.send(_req("gone", 4))
    assert isinstance(prefill_inbox.recv(timeout_ms=5000), protocol.PrefillTask)
    to_worker.send(protocol.Abort(rid="gone", message="client gone"))
    to_worker.send(_req("probe", 4))  # handled after the abort, in order
    assert prefill_inbox.recv(timeout_ms=5000).rid == "probe"
    assert "gone" not in proc.role.handoff
    msg = tokenizer_inbox.recv(timeout_ms=200)
    assert msg is None or "gone" not in msg.rids  # the router ended that client itself


def test_an_abort_that_overtakes_its_request_keeps_the_request_from_taking_pages(
    decode_worker,  # type: ignore[no-untyped-def]
) -> None:
    proc, to_worker, _, prefill_inbox = decode_worker
    to_worker.send(protocol.Abort(rid="early", message="client gone"))
    to_worker.send(_req("early", 4))  # arrives after its abort (two senders, no order)
    to_worker.send(_req("probe", 4))
    assert prefill_inbox.recv(timeout_ms=5000).rid == "probe"  # no PrefillTask for "early"
    assert "early" not in proc.role.handoff and "early" not in proc.scheduler.requests
