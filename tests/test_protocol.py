"""Every message survives the msgpack codec unchanged; nothing else can be decoded."""

from __future__ import annotations

import msgpack
import pytest

from pdserve import protocol as p
from pdserve.protocol import Finish

SAMPLES = [
    p.GenerateReq(
        rid="r1",
        sampling={"temperature": 0.5, "stop": ["x"]},
        text="héllo 東京",
        messages=[{"role": "user", "content": "hi"}],
        input_ids=[1, 2],
        continue_final_message=True,
        return_logprob=True,
        top_logprobs_num=3,
        decode_idx=1,
        prefill_idx=2,
        max_context_len=77,
        echo=True,
    ),
    p.TokenOut(
        rids=["a", "b"],
        token_ids=[[1, 2], []],
        first_idx=[0, 5],
        finish=[None, Finish.stop(2)],
        logprobs=[[-0.5, -1.0], []],
        top_logprobs=[[[[1, -0.5]], [[2, -1.0]]], []],
        prompt_tokens=[3, 4],
        cached_tokens=[0, 2],
    ),
    p.ReqOutput(
        rid="r",
        text_delta="dé",
        output_ids=[7],
        finish=Finish.at_length(1),
        prompt_tokens=3,
        completion_tokens=1,
        cached_tokens=0,
        logprobs=[-0.1],
        top_logprobs=[[[7, -0.1]]],
        token_texts=["d"],
        error=None,
        prompt_text="p",
        top_token_texts=[["d"]],
    ),
    p.LoadReport(
        worker="decode0",
        role="decode",
        num_running=2,
        num_queued=1,
        num_free_pages=9,
        num_total_pages=10,
        num_cached_pages=1,
        cache_hit_rate=0.5,
        step_time_ms=1.5,
        kv_transfer_bytes=100,
        kv_transfer_seconds=0.25,
        num_kv_transfers=3,
        num_preemptions=4,
    ),
    p.WorkerDied(name="decode0", exit_code=-9),
    p.Ready(name="router", info={"kv_handshake": {"fields": [b"\x00\x01", 3, True]}}),
    p.TokenizedReq(
        rid="r",
        input_ids=[1],
        sampling={},
        tokenizer_idx=1,
        prefill_idx=0,
        return_logprob=True,
        top_logprobs_num=2,
    ),
    p.PrefillTask(
        rid="r",
        input_ids=[1, 2, 3],
        sampling={"seed": 4},
        tokenizer_idx=0,
        decode_idx=1,
        dst_pages=[5, 9],
        return_logprob=False,
        top_logprobs_num=0,
        kv_handshake={"backend": "tcp", "address": "ipc:///x", "shape": [1, 2]},
    ),
    p.KVReady(
        rid="r",
        first_token=42,
        cached_tokens=16,
        ok=False,
        error="boom",
        logprob=-0.2,
        top_logprobs=[[42, -0.2]],
    ),
    p.Abort(rid="r", abort_all=True, message="client gone"),
    p.FlushCache(),
    p.Shutdown(grace_s=2.5),
    p.KVChunk(
        rid="r",
        dst_pages=[1],
        dtype="bfloat16",
        shape=[1, 2, 1, 4, 2, 8],
        data=bytes(range(256)),
        is_last=False,
    ),
    p.Finish.abort("worker lost", 500),
]


def test_samples_cover_every_registered_message() -> None:
    assert {type(m) for m in SAMPLES} == set(p.message_types())


@pytest.mark.parametrize("msg", SAMPLES, ids=[type(m).__name__ for m in SAMPLES])
def test_round_trip_is_exact(msg: object) -> None:
    decoded = p.decode(p.encode(msg))
    assert type(decoded) is type(msg)
    assert decoded == msg


def test_unknown_tag_and_unregistered_types_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown message tag"):
        p.decode(msgpack.packb([999, []]))
    with pytest.raises(TypeError, match="not a registered message"):
        p.encode({"rid": "x"})


def test_a_nested_finish_comes_back_as_a_finish_and_speaks_sglangs_shape() -> None:
    out = p.decode(p.encode(p.ReqOutput("r", "", [], p.Finish.stop("END"))))
    assert isinstance(out.finish, p.Finish) and out.finish.to_api() == {
        "type": "stop",
        "matched": "END",
    }
    assert p.Finish.at_length(3).to_api() == {"type": "length", "length": 3}
    assert p.Finish.abort("gone", 500).to_api() == {"type": "abort", "message": "gone"}
    assert p.Finish.abort("gone", 500).is_error and not p.Finish.abort("client").is_error


@pytest.mark.parametrize(
    "frame", [b"", b"\x01\x02", msgpack.packb([1]), msgpack.packb(["x", []]), msgpack.packb([1, 5])]
)
def test_garbage_frames_raise_value_or_msgpack_errors_only(frame: bytes) -> None:
    with pytest.raises((ValueError, msgpack.UnpackException, TypeError)):
        p.decode(frame)
