"""Every message survives the msgpack codec unchanged; nothing else can be decoded: not garbage,
and not a message whose fields hold values of the wrong types."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from pdserve import codec
from pdserve import protocol as p
from pdserve.protocol import Finish

SAMPLES = [
    p.GenerateReq(
        rid="r1",
        lora_name="adapter-1",
        image_data=["data:image/png;base64,AAAA", "/tmp/cat.png"],
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
        priority=-1,
        return_hidden_states=True,
        logprob_start_len=2,
        embed=True,
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
        hidden_states=[[[0.5, -1.0], [2.0, 0.25]], []],
        input_token_logprobs=[[[5, None], [6, -1.5]], []],
        input_top_logprobs=[[[], [[6, -1.5], [9, -2.0]]], []],
        embeddings=[[], [0.6, 0.8]],
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
        hidden_states=[[0.5, -1.0]],
        input_token_logprobs=[[None, 5, "a"], [-1.5, 6, "b"]],
        input_top_logprobs=[None, [[-1.5, 6, "b"]]],
        embedding=[0.6, 0.8],
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
        num_loaded_adapters=2,
        num_adapter_slots_used=1,
    ),
    p.WorkerDied(name="decode0", exit_code=-9),
    p.Heartbeat(name="tokenizer1", pid=4242),
    p.ProcessExited(name="prefill0", pid=4243, exit_code=-9, restarting=True),
    p.Ready(name="router", info={"kv_handshake": {"fields": [b"\x00\x01", 3, True]}}),
    p.TokenizedReq(
        rid="r",
        lora_name="adapter-1",
        input_ids=[1],
        sampling={},
        tokenizer_idx=1,
        prefill_idx=0,
        return_logprob=True,
        top_logprobs_num=2,
        priority=-1,
        return_hidden_states=True,
        logprob_start_len=0,
        embed=True,
        mm=p.MultimodalInputs(b"\x00\x01\x02\x03", [1, 1], "float32", [[1, 2, 2]], [7], [1], 9),
    ),
    p.PrefillTask(
        rid="r",
        lora_name="adapter-1",
        input_ids=[1, 2, 3],
        sampling={"seed": 4},
        tokenizer_idx=0,
        decode_idx=1,
        dst_pages=[5, 9],
        return_logprob=False,
        top_logprobs_num=0,
        kv_handshake={"backend": "tcp", "address": "ipc:///x", "shape": [1, 2]},
        priority=-1,
        return_hidden_states=True,
        logprob_start_len=1,
        embed=True,
    ),
    p.KVReady(
        rid="r",
        first_token=42,
        cached_tokens=16,
        logprob=-0.2,
        top_logprobs=[[42, -0.2]],
    ),
    p.KVFailed(rid="r", error="KV transfer failed: boom", status_code=504),
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
    p.TokenizeReq(
        rid="tok-1",
        texts=["héllo", "東京"],
        messages=[{"role": "user", "content": "hi"}],
        add_special_tokens=False,
        add_generation_prompt=False,
        continue_final_message=True,
        return_token_strs=True,
    ),
    p.DetokenizeReq(rid="detok-1", token_ids=[[1, 2], []], skip_special_tokens=False),
    p.TokenizeOut(
        rid="tok-1",
        token_ids=[[1, 2], [3]],
        token_strs=[["h", "é"], ["東"]],
        texts=["hé", ""],
        max_context_len=4096,
        error="messages[0] has no 'role'",
    ),
    p.LoraUpdate(op_id="op-1", action="load", lora_name="sql", lora_path="/adapters/sql"),
    p.LoraUpdateDone(op_id="op-1", worker="decode0", success=False, error="rank 64", loaded=["a"]),
    p.Register(
        name="decode-a",
        role="decode",
        pid=42,
        inbox="tcp://10.0.0.2:9000",
        kv_handshake={"backend": "tcp", "address": "tcp://10.0.0.2:9001", "shape": [1, 2]},
        num_pages=128,
    ),
    p.PeerTable(
        version=3,
        decode_inboxes=["tcp://10.0.0.2:9000", ""],
        prefill_inboxes=["tcp://10.0.0.3:9000"],
        tokenizer_inboxes=["tcp://10.0.0.1:8002"],
        decode_kv_handshakes=[{"backend": "tcp", "address": "tcp://10.0.0.2:9001"}, None],
        for_name="decode-a",
        idx=0,
        error="",
    ),
    p.PeerTableAck(name="prefill-b", version=3),
    p.Leave(name="decode-a", pid=42),
    p.MultimodalInputs(
        pixel_values=b"\x00" * 8,
        pixel_shape=[2, 1],
        pixel_dtype="float32",
        image_grid_thw=[[1, 2, 2], [1, 4, 2]],
        image_hashes=[2**63 - 1, 5],
        num_image_tokens=[1, 2],
        image_token_id=9,
        mrope_delta=-3,
        video_token_id=10,
        is_video=[False, True],
        second_per_grid_ts=[0.0, 0.5],
    ),
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
    "frame",
    [
        b"",
        b"\x01\x02",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1]),
        msgpack.packb(["x", []]),
        msgpack.packb([1, 5]),
        msgpack.packb([True, []]),  # a bool is not a tag
        msgpack.packb({"rid": "x"}),
        b"\x91" * 5000 + b"\xc0",  # nested too deep for msgpack
        msgpack.packb([1, []]) + b"trailing",
        msgpack.packb(msgpack.ExtType(7, b"x")),
        msgpack.packb([9, ["r"]], use_bin_type=True)[:-1],  # cut short
    ],
)
def test_garbage_frames_raise_value_error_only(frame: bytes) -> None:
    with pytest.raises(ValueError):
        p.decode(frame)


def _tag(cls: type) -> int:
    return p.message_types().index(cls) + 1


def _frame(cls: type, values: list) -> bytes:
    return msgpack.packb([_tag(cls), values], use_bin_type=True)


def _wrong_value(annotation: str) -> object:
    """A value no field of this annotation accepts (a dict for anything but dict fields)."""
    return [1] if annotation.startswith("dict") else {"wrong": 1}


@pytest.mark.parametrize("msg", SAMPLES, ids=[type(m).__name__ for m in SAMPLES])
def test_a_wrongly_typed_field_of_any_message_is_refused_by_name(msg: object) -> None:
    for f in dataclasses.fields(msg):
        bad = dataclasses.replace(msg, **{f.name: _wrong_value(str(f.type))})
        with pytest.raises(ValueError, match=rf"^{type(msg).__name__}\.{f.name}: expected"):
            p.decode(p.encode(bad))


@pytest.mark.parametrize(
    ("cls", "values", "field"),
    [
        (p.TokenizedReq, ["r", [1, "2"], {}, 0], "input_ids"),  # a str among ints
        (p.TokenizedReq, ["r", [1, 2], {}, True], "tokenizer_idx"),  # a bool is not an int
        (p.TokenizedReq, ["r", [1.0], {}, 0], "input_ids"),  # a float is not an int
        (p.TokenizedReq, ["r", [1], {1: "x"}, 0], "sampling"),  # dict keys must be str
        (p.Abort, ["r", 1], "abort_all"),  # an int is not a bool
        (p.Shutdown, ["soon"], "grace_s"),
        (p.KVChunk, ["r", [1], "bfloat16", [1, 2], "text", True], "data"),  # str for bytes
        (p.TokenOut, [["a"], [[1], 2], [0], [None]], "token_ids"),  # ragged nesting
        (p.TokenOut, [["a"], [[1]], [0], [None], [[-0.5]], [[[["x", -0.5]]]]], "top_logprobs"),
    ],
)
def test_wrong_types_deep_inside_a_field_are_refused(cls: type, values: list, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}: expected"):
        p.decode(_frame(cls, values))


def test_records_are_only_accepted_where_the_annotation_names_them() -> None:
    nested_finish = p.encode(p.GenerateReq(rid="r", sampling={"x": p.Finish.stop(1)}))
    with pytest.raises(ValueError, match=r"^GenerateReq\.sampling"):
        p.decode(nested_finish)
    wrong_record = p.encode(p.ReqOutput("r", "", [], finish=p.Shutdown()))
    with pytest.raises(ValueError, match=r"^ReqOutput\.finish"):
        p.decode(wrong_record)
    bad_kind = p.encode(p.ReqOutput("r", "", [], finish=p.Finish("done")))  # not a FinishKind
    with pytest.raises(ValueError, match=r"^Finish\.kind"):
        p.decode(bad_kind)


def test_too_many_or_too_few_values_are_refused_and_defaults_fill_the_rest() -> None:
    with pytest.raises(ValueError, match="TokenizedReq: 3 values, expected 4..13"):
        p.decode(_frame(p.TokenizedReq, ["r", [1], {}]))
    with pytest.raises(ValueError, match="Shutdown: 2 values"):
        p.decode(_frame(p.Shutdown, [1.0, 2.0]))
    assert p.decode(_frame(p.Abort, ["r"])) == p.Abort(rid="r")  # an older sender's frame


def test_floats_accept_ints_and_optional_fields_accept_none() -> None:
    assert p.decode(_frame(p.Shutdown, [3])) == p.Shutdown(grace_s=3)
    out = p.decode(_frame(p.KVReady, ["r", 5, 0, None, None]))
    assert out.logprob is None and out.top_logprobs is None


def test_an_annotation_the_codec_cannot_carry_is_refused_at_compile_time() -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        codec._checker(tuple[int, ...], "X.f")
    with pytest.raises(TypeError, match="dict keys"):
        codec._checker(dict[tuple, int], "X.f")


def test_mutated_frames_decode_to_a_message_or_raise_value_error_only() -> None:
    rng = random.Random(0)
    frames = [p.encode(m) for m in SAMPLES]
    for _ in range(3000):
        data = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)]
        try:
            msg = p.decode(bytes(data))
        except ValueError:
            continue
        assert type(msg) in p.message_types()
        p.decode(p.encode(msg))  # what decoded once re-encodes and passes the checks again


@pytest.mark.parametrize("cls", p.message_types(), ids=lambda c: c.__name__)
def test_every_registered_message_has_annotations_the_codec_can_check(cls: type) -> None:
    spec = codec._record_spec(cls)  # TypeError for a field type that cannot travel
    assert spec.names == tuple(f.name for f in dataclasses.fields(cls))
