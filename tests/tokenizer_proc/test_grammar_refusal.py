"""The tokenizer process refuses a request whose grammar cannot be compiled before any worker sees
it, naming the field; a good grammar travels on in the request's sampling parameters."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import GenerateReq
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore


@pytest.fixture
def core(tokenizer: Any) -> TokenizerCore:
    return TokenizerCore(tokenizer, idx=0, max_context_len=256, num_workers=1)


def generate_req(**sampling: Any) -> GenerateReq:
    return GenerateReq(rid="r", sampling=SamplingParams(**sampling).to_dict(), text="hi")


@pytest.mark.parametrize(
    ("sampling", "start"),
    [
        ({"json_schema": '{"type": "object", "required": 5}'}, "json_schema="),
        ({"regex": "[a-"}, "regex='[a-' is invalid: Regex parsing error"),
        ({"ebnf": "root ::= "}, "ebnf='root ::= ' is invalid: EBNF parser error"),
    ],
)
def test_a_bad_grammar_is_refused_before_it_is_queued(
    core: TokenizerCore, sampling: dict, start: str
) -> None:
    with pytest.raises(ValueError) as info:
        core.on_generate(generate_req(**sampling))
    assert str(info.value).startswith(start) and " is invalid: " in str(info.value)
    assert not core.states


def test_a_good_grammar_goes_on_to_the_worker(core: TokenizerCore) -> None:
    _, tokenized = core.on_generate(generate_req(regex="[0-9]+", max_new_tokens=4))
    assert tokenized.sampling["regex"] == "[0-9]+"
    assert SamplingParams.from_dict(tokenized.sampling).grammar is not None
