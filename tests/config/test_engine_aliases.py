"""SGLang's option names: each alias sets the pdserve option of the same meaning, conflicts and
unsupported parallel sizes are refused naming the key, and the Engine's own options are checked."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.config.engine_config import (
    SGLANG_ALIASES,
    EngineConfig,
    EngineOptions,
    SchedulerConfig,
    translate_options,
)


@pytest.mark.parametrize(
    ("sglang", "pdserve"),
    [
        ({"mem_fraction_static": 0.5}, {"mem_fraction": 0.5}),
        ({"chunked_prefill_size": 256}, {"chunk_size": 256}),
        ({"max_prefill_tokens": 1024}, {"max_batch_tokens": 1024}),
        ({"disable_radix_cache": True}, {"enable_prefix_cache": False}),
        ({"disable_radix_cache": False}, {"enable_prefix_cache": True}),
        ({"context_length": 512}, {"max_context_len": 512}),
        ({"random_seed": 7}, {"seed": 7}),
        ({"disable_cuda_graph": True}, {"cuda_graph": False}),
        ({"disable_overlap_schedule": True}, {"overlap_schedule": False}),
        ({"cuda_graph_max_bs": 32}, {"cuda_graph_max_batch": 32}),
        ({"max_running_requests": 8, "page_size": 4}, {"max_running_requests": 8, "page_size": 4}),
        ({"tp_size": 1, "dp_size": 1, "pp_size": 1, "seed": 2}, {"tp_size": 1, "seed": 2}),
        ({"tp_size": 2}, {"tp_size": 2}),  # each worker's tensor-parallel degree
        ({"chunked_prefill_size": -1}, {}),  # SGLang's "no chunking": pdserve's default chunks
        ({"num_pages": None, "random_seed": None}, {}),  # None: not given
    ],
)
def test_sglang_names_become_pdserve_names(sglang: dict[str, Any], pdserve: dict[str, Any]):
    assert translate_options(sglang) == pdserve


def test_every_alias_targets_an_option_the_engine_config_has() -> None:
    engine_keys = {"seed", "cuda_graph", "overlap_schedule", "cuda_graph_max_batch"}
    config_keys = (
        engine_keys
        | {"piecewise_graph_max_tokens"}
        | {f for f in SchedulerConfig.__dataclass_fields__}
    )
    assert {a.target for a in SGLANG_ALIASES.values()} <= config_keys


def test_engine_config_built_from_sglang_names_equals_the_one_from_pdserve_names() -> None:
    sglang = EngineConfig.from_options(
        "/m", mem_fraction_static=0.4, disable_radix_cache=True, random_seed=5, tp_size=1
    )
    assert sglang == EngineConfig.from_options(
        "/m", mem_fraction=0.4, enable_prefix_cache=False, seed=5
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dp_size": 4}, r"^dp_size=4 is invalid: expected 1"),
        ({"pp_size": True}, r"^pp_size=True is invalid"),  # a bool is not a size
        ({"mem_fraction": 0.5, "mem_fraction_static": 0.6}, "mem_fraction and mem_fraction_static"),
        ({"disable_radix_cache": "yes"}, r"^disable_radix_cache='yes' is invalid"),
    ],
)
def test_unsupported_sizes_and_conflicts_are_refused_by_name(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        translate_options(options)


def test_unknown_options_are_still_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mem_fraction_dynamic'\]"):
        EngineConfig.from_options("/m", mem_fraction_dynamic=0.5)


def test_engine_options_are_split_off_and_checked() -> None:
    own, rest = EngineOptions.split(
        {"skip_tokenizer_init": True, "log_level": "debug", "random_seed": 1}
    )
    assert own == EngineOptions(skip_tokenizer_init=True, log_level="debug")
    assert rest == {"seed": 1}
    with pytest.raises(ValueError, match=r"^log_level='loud' is invalid"):
        EngineOptions.split({"log_level": "loud"})
    with pytest.raises(ValueError, match=r"^skip_tokenizer_init=1 is invalid"):
        EngineOptions(skip_tokenizer_init=1)  # type: ignore[arg-type]


def test_without_a_tokenizer_text_prompts_and_stop_strings_are_refused() -> None:
    token_only = EngineOptions(skip_tokenizer_init=True)
    token_only.check_inputs(None, [{"stop_token_ids": [2]}, None])
    with pytest.raises(ValueError, match="^prompt is invalid with skip_tokenizer_init"):
        token_only.check_inputs("Hello", None)
    with pytest.raises(ValueError, match="^sampling_params.stop is invalid"):
        token_only.check_inputs(None, [{}, {"stop": ["x"]}])
    EngineOptions().check_inputs("Hello", {"stop": "x"})  # with a tokenizer: fine
