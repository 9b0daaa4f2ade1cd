"""Structured output through the in-process Engine on the tiny model (random weights): every output
of twenty JSON schemas and ten regexes validates, under several seeds and sampling parameters;
greedy constrained output equals transformers' `generate` with xgrammar's own logits processor;
a grammar that allows more runs to max_new_tokens; a bad grammar is refused naming it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xgrammar as xgr
from structured_output_cases import CASES, MAX_TOKENS, check_output, sampling_fields
from transformers import AutoModelForCausalLM, AutoTokenizer
from xgrammar.contrib.hf import LogitsProcessor

from pdserve.entrypoints.engine import Engine, InProcessEngine

PROMPT = "Answer in the requested format:"
# One set of sampling parameters per seed: every parameter is exercised under a grammar.
SAMPLINGS = {
    1: {"temperature": 1.0},
    2: {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1},
    3: {
        "temperature": 0.8,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "logit_bias": {"7": 5.0},
        "min_new_tokens": 2,
    },  # fmt: skip
}


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[InProcessEngine]:
    with Engine(str(tiny_llama), in_process=True, device="cpu", page_size=4) as eng:
        assert isinstance(eng, InProcessEngine)
        yield eng


def test_every_output_validates_under_every_seed_and_sampling_parameter(
    engine: InProcessEngine,
) -> None:
    jobs = [(case, seed) for seed in SAMPLINGS for case in CASES]
    params = [
        {**sampling_fields(case), **SAMPLINGS[seed], "seed": seed, "max_new_tokens": MAX_TOKENS}
        for case, seed in jobs
    ]
    outs = engine.generate([PROMPT] * len(jobs), params)
    for (case, seed), out in zip(jobs, outs):
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}, (case, seed)
        check_output(case, out["text"])
    # The seeds and parameters matter: outputs of one grammar differ between them.
    texts = {case.name: set() for case in CASES}
    for (case, _), out in zip(jobs, outs):
        texts[case.name].add(out["text"])
    assert sum(len(t) > 1 for t in texts.values()) >= len(CASES) // 2


def hf_constrained_greedy(
    model_dir: Path, prompt: str, fields: dict[str, Any], num_new: int
) -> list[int]:
    """transformers' greedy `generate` with xgrammar's HF logits processor: independent of
    pdserve's sampler, bitmask and matcher handling."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=model.config.vocab_size, stop_token_ids=[model.config.eos_token_id]
    )
    compiler = xgr.GrammarCompiler(info)
    if "regex" in fields:
        compiled = compiler.compile_regex(fields["regex"])
    else:
        compiled = compiler.compile_json_schema(fields["json_schema"])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=num_new,
            logits_processor=[LogitsProcessor(compiled)],
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


GREEDY_CASES = [c for c in CASES if c.name in (
    "schema-flat_object", "schema-nested_object", "schema-array_of_objects", "schema-any_of",
    "schema-string_length", "regex-email", "regex-ipv4", "regex-key_value",
)]  # fmt: skip


def test_greedy_output_equals_transformers_with_xgrammars_logits_processor(
    engine: InProcessEngine, tiny_llama: Path
) -> None:
    num_new = 40
    params = [
        {**sampling_fields(c), "temperature": 0.0, "max_new_tokens": num_new} for c in GREEDY_CASES
    ]
    outs = engine.generate([PROMPT] * len(GREEDY_CASES), params)
    for case, fields, out in zip(GREEDY_CASES, params, outs):
        expected = hf_constrained_greedy(tiny_llama, PROMPT, fields, num_new)
        assert out["output_ids"] == expected, case.name


def test_a_grammar_that_allows_more_samples_until_max_new_tokens(engine: InProcessEngine) -> None:
    out = engine.generate(PROMPT, {"regex": "[0-9]{200}", "seed": 4, "max_new_tokens": 12})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert out["meta_info"]["completion_tokens"] == 12
    assert re.fullmatch("[0-9]+", out["text"]) and len(out["text"]) >= 12


def test_a_complete_grammar_ends_the_request_whatever_min_new_tokens_and_ignore_eos_say(
    engine: InProcessEngine,
) -> None:
    params = {"regex": "(yes|no)", "min_new_tokens": 20, "ignore_eos": True, "seed": 5}
    out = engine.generate(PROMPT, {**params, "max_new_tokens": 30})
    assert out["text"] in ("yes", "no")
    assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_ebnf_json_object_and_stop_strings(engine: InProcessEngine) -> None:
    ebnf = 'root ::= answer ("," answer){0,3}\nanswer ::= "yes" | "no"'
    outs = engine.generate(
        [PROMPT] * 6,
        [{"ebnf": ebnf, "seed": s, "max_new_tokens": 40} for s in range(3)]
        + [{"json_object": True, "seed": s, "max_new_tokens": MAX_TOKENS} for s in (2, 4, 5)],
    )
    for out in outs[:3]:
        assert re.fullmatch("(yes|no)(,(yes|no)){0,3}", out["text"]), out["text"]
    for out in outs[3:]:
        assert isinstance(json.loads(out["text"]), dict), out["text"]
    cut = engine.generate(
        PROMPT, {"regex": "[abc]{30}", "stop": "b", "seed": 6, "max_new_tokens": 40}
    )
    assert re.fullmatch("[ac]*", cut["text"]), cut["text"]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": "b"}


@pytest.mark.parametrize(
    ("fields", "start"),
    [
        ({"json_schema": '{"type": "object", "properties": 3}'}, "json_schema="),
        ({"regex": "a{3,1}"}, "regex='a{3,1}' is invalid: "),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "regex= and ebnf= are both set"),
    ],
)
def test_a_bad_grammar_is_refused_naming_it(
    engine: InProcessEngine, fields: dict[str, Any], start: str
) -> None:
    with pytest.raises(ValueError) as info:
        engine.generate(PROMPT, {**fields, "max_new_tokens": 4})
    assert str(info.value).startswith(start), info.value
    assert not engine.core.scheduler.requests
