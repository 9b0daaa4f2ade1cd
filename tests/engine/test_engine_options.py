"""The in-process Engine's SGLang extras: option names, get_server_info and flush_cache answered
from its core, and skip_tokenizer_init (ids in, ids out, no text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.config.engine_config import EngineOptions
from pdserve.entrypoints.engine import Engine, InProcessEngine
from pdserve.entrypoints.process_engine import ProcessEngine

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PROMPT_IDS = [5, 17, 42, 99, 120, 7, 33, 250, 61]  # two full pages of 4 and a bit


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> InProcessEngine:
    return Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=64, page_size=4)


def test_sglang_option_names_configure_the_same_engine(tiny_llama: Path) -> None:
    sglang = Engine(
        str(tiny_llama),
        in_process=True,
        device="cpu",
        num_pages=16,
        mem_fraction_static=0.5,
        chunked_prefill_size=64,
        max_prefill_tokens=256,
        disable_radix_cache=True,
        random_seed=3,
        context_length=512,
        tp_size=1,
        dp_size=1,
    )
    sched = sglang.config.scheduler
    assert (sched.mem_fraction, sched.chunk_size, sched.max_batch_tokens) == (0.5, 64, 256)
    assert not sched.enable_prefix_cache and sglang.config.seed == 3
    assert sglang.get_server_info()["max_context_len"] == 512
    with pytest.raises(ValueError, match="^dp_size=2 is invalid: expected 1"):
        Engine(str(tiny_llama), in_process=True, device="cpu", dp_size=2)


def test_server_info_reports_the_core_and_flush_cache_empties_the_prefix_cache(
    engine: InProcessEngine, tiny_llama: Path
) -> None:
    engine.generate(input_ids=PROMPT_IDS, sampling_params=GREEDY)
    info = engine.get_server_info()
    assert (info["model_path"], info["model_name"]) == (str(tiny_llama), tiny_llama.name)
    assert info["max_context_len"] == 2048  # the tiny model's max_position_embeddings
    assert info["num_requests_in_flight"] == 0 and info["version"]
    (worker,) = info["workers"]
    assert (worker["name"], worker["role"], worker["healthy"]) == ("mixed0", "mixed", True)
    assert worker["num_cached_pages"] >= 2  # the prompt's full pages stay for reuse
    assert worker["num_free_pages"] + worker["num_cached_pages"] == worker["num_total_pages"]
    assert engine.flush_cache() is True
    worker = engine.get_server_info()["workers"][0]
    assert worker["num_cached_pages"] == 0
    assert worker["num_free_pages"] == worker["num_total_pages"]


def test_skip_tokenizer_init_gives_the_same_ids_without_text(
    engine: InProcessEngine, tiny_llama: Path
) -> None:
    token_only = Engine(
        str(tiny_llama), in_process=True, device="cpu", num_pages=64, skip_tokenizer_init=True
    )
    assert token_only.tokenizer is None
    lp = {"return_logprob": True, "top_logprobs_num": 2}
    got = token_only.generate(input_ids=[PROMPT_IDS, PROMPT_IDS[:3]], sampling_params=GREEDY, **lp)
    want = engine.generate(input_ids=[PROMPT_IDS, PROMPT_IDS[:3]], sampling_params=GREEDY, **lp)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert all("text" not in g for g in got)
    entries = got[0]["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == got[0]["output_ids"] and {e[2] for e in entries} == {None}
    with pytest.raises(ValueError, match="expected input_ids"):
        token_only.generate("Hello", GREEDY)
    with pytest.raises(ValueError, match="stop strings need the tokenizer"):
        token_only.generate(input_ids=PROMPT_IDS, sampling_params={**GREEDY, "stop": "x"})


def test_the_process_engine_shapes_requests_and_results_the_same_way() -> None:
    engine = ProcessEngine.__new__(ProcessEngine)  # no cluster: only the request shaping
    engine.options = EngineOptions(skip_tokenizer_init=True)
    body = engine._request_body(None, [1, 2], {"max_new_tokens": 2}, True, 0)
    assert body["input_ids"] == [1, 2] and body["return_text_in_logprobs"] is False
    assert engine._shaped([{"text": "", "output_ids": [3]}]) == [{"output_ids": [3]}]
    with pytest.raises(ValueError, match="expected input_ids"):
        engine._request_body("Hello", None, None, False, 0)


def test_a_topology_engine_takes_only_the_router_address_beside_the_file(
    tiny_llama: Path, tmp_path: Path
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\ndevice: cpu\n")
    with pytest.raises(ValueError, match=r"set options in the topology: \['page_size'\]"):
        Engine(topology=path, port=0, page_size=4)  # refused before any process starts
    with pytest.raises(ValueError, match=r"^router\.port=-1 is invalid"):
        Engine(topology=path, port=-1)
