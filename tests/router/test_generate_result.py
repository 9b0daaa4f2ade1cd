"""`generate_result`: SGLang's /generate shape, built from the deltas a choice received."""

from __future__ import annotations

from pdserve.protocol import Finish, ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.generate_result import generate_result


def received(*outs: ReqOutput) -> ChoiceState:
    choice = ChoiceState(0, "r1")
    for out in outs:
        choice.add(out)
    return choice


def with_logprobs() -> ChoiceState:
    """Two deltas of a request that asked for logprobs and two top alternatives."""
    first = ReqOutput(
        "r1", "Hel", [10, 11], None, prompt_tokens=5, completion_tokens=2, cached_tokens=4,
        logprobs=[-0.25, -0.5], top_logprobs=[[[10, -0.25], [3, -2.0]], [[11, -0.5], [4, -1.0]]],
        token_texts=["H", "el"], top_token_texts=[["H", "é"], ["el", "x"]],
    )  # fmt: skip
    last = ReqOutput(
        "r1", "lo", [12], Finish.stop("!"), prompt_tokens=5, completion_tokens=3, cached_tokens=4,
        logprobs=[-1.0], top_logprobs=[[[12, -1.0], [5, -1.5]]],
        token_texts=["lo"], top_token_texts=[["lo", "y"]],
    )  # fmt: skip
    return received(first, last)


def test_plain_result_has_text_ids_and_usage() -> None:
    choice = received(
        ReqOutput("r1", "Hi", [7], None, prompt_tokens=3, completion_tokens=1),
        ReqOutput("r1", " you", [8, 9], Finish.at_length(3), prompt_tokens=3, completion_tokens=3),
    )
    assert generate_result(choice, e2e_latency=0.12345678) == {
        "text": "Hi you",
        "output_ids": [7, 8, 9],
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "length", "length": 3},
            "prompt_tokens": 3,
            "completion_tokens": 3,
            "cached_tokens": 0,
            "e2e_latency": 0.123457,
        },
    }


def test_logprobs_carry_token_and_alternative_texts() -> None:
    result = generate_result(with_logprobs(), 0.5, return_logprob=True, top_logprobs_num=2)
    meta = result["meta_info"]
    assert result["text"] == "Hello" and result["output_ids"] == [10, 11, 12]
    assert meta["finish_reason"] == {"type": "stop", "matched": "!"}
    assert meta["cached_tokens"] == 4
    assert meta["input_token_logprobs"] == []
    assert meta["output_token_logprobs"] == [[-0.25, 10, "H"], [-0.5, 11, "el"], [-1.0, 12, "lo"]]
    assert meta["output_top_logprobs"] == [
        [[-0.25, 10, "H"], [-2.0, 3, "é"]],
        [[-0.5, 11, "el"], [-1.0, 4, "x"]],
        [[-1.0, 12, "lo"], [-1.5, 5, "y"]],
    ]


def test_texts_left_out_when_not_asked_or_not_known() -> None:
    meta = generate_result(
        with_logprobs(), 0.5, return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=False
    )["meta_info"]
    assert [entry[2] for entry in meta["output_token_logprobs"]] == [None, None, None]
    assert {entry[2] for row in meta["output_top_logprobs"] for entry in row} == {None}
    # Token in, token out: the tokenizer sent no texts at all.
    bare = received(ReqOutput("r1", "", [10], Finish.at_length(1), logprobs=[-0.25],
                              top_logprobs=[[[10, -0.25]]]))  # fmt: skip
    meta = generate_result(bare, 0.5, return_logprob=True, top_logprobs_num=1)["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.25, 10, None]]
    assert meta["output_top_logprobs"] == [[[-0.25, 10, None]]]


def test_logprob_keys_only_when_asked() -> None:
    meta = generate_result(with_logprobs(), 0.5)["meta_info"]
    assert "output_token_logprobs" not in meta and "output_top_logprobs" not in meta
    meta = generate_result(with_logprobs(), 0.5, return_logprob=True)["meta_info"]
    assert "output_token_logprobs" in meta and "output_top_logprobs" not in meta


def test_abort_shows_sglang_finish_reason_without_status_code() -> None:
    choice = received(ReqOutput("r1", "", [], Finish.abort("client went away", status_code=499)))
    result = generate_result(choice, 0.0)
    assert result["meta_info"]["finish_reason"] == {"type": "abort", "message": "client went away"}
    assert result["text"] == "" and result["output_ids"] == []


def test_running_choice_has_no_finish_reason() -> None:
    choice = received(ReqOutput("r1", "Hi", [7], None, prompt_tokens=3, completion_tokens=1))
    assert generate_result(choice, 0.0)["meta_info"]["finish_reason"] is None
