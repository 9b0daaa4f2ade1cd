"""Constrained sampling on a small hand-made vocabulary: the bitmask xgrammar fills, its use in the
sampler with every sampling parameter, min_new_tokens against a grammar that has ended, logprobs,
and the matcher's advance and termination in FinishChecker."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import xgrammar as xgr

from pdserve.config.sampling_params import GrammarSpec, SamplingParams
from pdserve.protocol import Finish
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.worker.grammar import RequestGrammar, backend_for, bind_grammar
from pdserve.worker.grammar_mask import apply_bitmask, fill_bitmask, unpack_bitmask
from pdserve.worker.sampler import (
    SamplingBatch,
    SamplingRow,
    build_skipping_bad_rows,
    is_plain_greedy,
    sample,
)

EOS = 0
VOCAB = ["<eos>", "a", "b", "c", "ab", "{", "}", '"', ":", ",", " ", "0", "1", "2", "x", "y"]
V = 40  # the model's vocabulary is padded past the tokenizer's: ids 16.. are never allowed
_compiler = xgr.GrammarCompiler(
    xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[EOS], vocab_size=V)
)


def grammar(regex: str, fed: Sequence[int] = ()) -> RequestGrammar:
    """A request's grammar for `regex` on VOCAB, already past the tokens `fed`."""
    compiled: Future = Future()
    compiled.set_result(_compiler.compile_regex(regex))
    g = RequestGrammar(GrammarSpec("regex", regex), compiled)
    for token in fed:
        assert g.accept_token(token)
    return g


def allowed_ids(g: RequestGrammar) -> set[int]:
    bitmask = fill_bitmask([g], V)
    assert bitmask is not None
    return set(torch.nonzero(unpack_bitmask(bitmask, V)[0]).flatten().tolist())


def constrained_row(g: RequestGrammar | None, output_ids: Sequence[int] = (), **params: object):
    return SamplingRow(SamplingParams(**params), (), output_ids, (EOS,), grammar=g)


def logits_favouring(token: int, num_rows: int = 1, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed))
    logits[:, token] += 20.0
    return logits


# ---- the bitmask -------------------------------------------------------------------------


def test_bitmask_allows_the_grammar_tokens_only_and_free_rows_everything() -> None:
    g = grammar("(a|b)+c")
    bitmask = fill_bitmask([g, None], V)
    assert bitmask is not None and bitmask.shape == (2, 2) and bitmask.dtype == torch.int32
    allowed = unpack_bitmask(bitmask, V)
    assert set(torch.nonzero(allowed[0]).flatten().tolist()) == {1, 2, 4}  # a, b, ab
    assert bool(allowed[1].all())
    assert fill_bitmask([None, None], V) is None


def test_bitmask_into_a_used_buffer_overwrites_every_row() -> None:
    # fill_bitmask sets only the free rows to ones and leaves the constrained rows to xgrammar,
    # which must write the whole row: a reused buffer's old bits never leak into the mask.
    g1, g2 = grammar("(a|b)+c"), grammar("(a|b)+c", fed=[1, 3])
    fresh = fill_bitmask([g1, None, g2], V)
    assert fresh is not None
    for old in (0, 0x55555555, -1):
        out = torch.full((3, 2), old, dtype=torch.int32)
        assert fill_bitmask([g1, None, g2], V, out=out) is out
        assert torch.equal(out, fresh)


def test_grammar_ends_with_eos_only_once_complete() -> None:
    assert allowed_ids(grammar("(a|b)+c", fed=[1])) == {1, 2, 3, 4}
    assert allowed_ids(grammar("(a|b)+c", fed=[1, 3])) == {EOS}


def test_apply_bitmask_masks_what_xgrammars_own_kernel_masks() -> None:
    gen = torch.Generator().manual_seed(3)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 2), dtype=torch.int32, generator=gen)
    logits = torch.randn(5, V, generator=gen)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    got = apply_bitmask(logits, bitmask)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


# ---- sampling ----------------------------------------------------------------------------

EVERY_PARAMETER = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.5),
    "top_k": dict(temperature=1.0, top_k=2),
    "top_p": dict(temperature=1.0, top_p=0.5),
    "min_p": dict(temperature=1.0, min_p=0.2),
    "penalties": dict(
        temperature=1.0, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5
    ),  # fmt: skip
    "seeded": dict(temperature=1.0, seed=7),
    "bias_on_a_banned_token": dict(temperature=1.0, logit_bias={14: 100.0}),
}


@pytest.mark.parametrize("name", sorted(EVERY_PARAMETER))
def test_constrained_rows_draw_only_allowed_tokens(name: str) -> None:
    params = EVERY_PARAMETER[name]
    rows = [constrained_row(grammar("(a|b)+c", fed=[1]), output_ids=[1], **params)] * 3
    rows.append(constrained_row(None, output_ids=[1], **params))  # free, in the same batch
    drawn: set[int] = set()
    for seed in range(40):
        logits = logits_favouring(14, len(rows), seed)  # "x": the grammar never allows it
        out = sample(logits, SamplingBatch.build(rows, V, "cpu"))
        drawn |= set(out.token_ids[:3])
        if name == "greedy":
            assert out.token_ids[3] == 14  # the free row is not masked
    assert drawn <= {1, 2, 3, 4}
    assert len(drawn) >= (1 if name == "greedy" else 2)


def test_greedy_constrained_row_takes_the_best_allowed_token() -> None:
    logits = torch.arange(V, dtype=torch.float32).view(1, V)  # the larger the id, the likelier
    rows = [constrained_row(grammar("(a|b)+c"), temperature=0.0)]
    out = sample(logits, SamplingBatch.build(rows, V, "cpu"))
    assert out.token_ids == [4]  # "ab": the largest of a, b, ab


def test_a_constrained_row_is_never_plain_greedy() -> None:
    assert is_plain_greedy(constrained_row(None, temperature=0.0))
    assert not is_plain_greedy(constrained_row(grammar("a"), temperature=0.0))


def test_logprobs_are_the_models_before_the_grammar_mask() -> None:
    logits = logits_favouring(14)
    g = grammar("(a|b)+c")
    row = SamplingRow(
        SamplingParams(temperature=0.0), (), (), (EOS,), True, top_logprobs_num=3, grammar=g
    )
    out = sample(logits, SamplingBatch.build([row], V, "cpu"))
    reference = torch.log_softmax(logits[0], dim=-1)
    token = out.token_ids[0]
    assert token in {1, 2, 4}
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.logprobs[0] == pytest.approx(float(reference[token]), abs=1e-5)
    top_ids, top_values = out.top_logprobs[0]
    assert top_ids[0] == 14  # the model's favourite, though the grammar bans it
    assert all(v > float("-inf") for v in top_values)


def test_min_new_tokens_gives_way_to_a_grammar_that_allows_only_eos() -> None:
    done = constrained_row(grammar("ab", fed=[4]), output_ids=[4], min_new_tokens=5,
                           temperature=0.0)  # fmt: skip
    open_ended = constrained_row(grammar("a+", fed=[1]), output_ids=[1], min_new_tokens=5,
                                 temperature=0.0)  # fmt: skip
    logits = logits_favouring(EOS, 2)
    out = sample(logits, SamplingBatch.build([done, open_ended], V, "cpu"))
    assert out.token_ids[0] == EOS  # nothing else may follow "ab"
    assert out.token_ids[1] == 1  # "a" may: EOS waits for min_new_tokens


def test_a_grammar_whose_compile_failed_ends_its_request_alone() -> None:
    failed: Future = Future()
    failed.set_exception(RuntimeError("[01:02:03] /x/y.cc:9: the grammar is bad"))
    bad = RequestGrammar(GrammarSpec("regex", "a"), failed)
    rows = [constrained_row(None), constrained_row(bad)]
    partial = build_skipping_bad_rows(rows, V, "cpu")
    assert partial.row_indices == [0]
    assert [r.row_idx for r in partial.bad_rows] == [1]
    assert partial.bad_rows[0].message == "regex could not be compiled: the grammar is bad"


# ---- advancing and ending ----------------------------------------------------------------


def constrained_request(g: RequestGrammar, **params: object) -> Request:
    return Request(rid="r", prompt_ids=[1, 2], sampling=SamplingParams(**params), grammar=g)


def feed(checker: FinishChecker, req: Request, token: int) -> Finish | None:
    req.output_ids.append(token)
    return checker.check(req)


@pytest.mark.parametrize("params", [{}, {"ignore_eos": True, "min_new_tokens": 50}])
def test_the_matcher_advances_with_each_token_and_the_request_stops_with_the_grammar(
    params: dict,
) -> None:
    checker = FinishChecker([EOS], max_context_len=100)
    req = constrained_request(grammar("(a|b)+c"), **params)
    assert [feed(checker, req, t) for t in (1, 4, 3)] == [None, None, None]
    assert allowed_ids(req.grammar) == {EOS}
    assert feed(checker, req, EOS) == Finish.stop(EOS)


def test_a_grammar_that_allows_more_runs_to_max_new_tokens() -> None:
    checker = FinishChecker([EOS], max_context_len=100)
    req = constrained_request(grammar("a+"), max_new_tokens=3)
    assert [feed(checker, req, 1) for _ in range(3)] == [None, None, Finish.at_length(3)]


def test_a_token_the_grammar_refuses_ends_the_request_as_a_server_error() -> None:
    checker = FinishChecker([EOS], max_context_len=100)
    req = constrained_request(grammar("(a|b)+c"))
    finish = feed(checker, req, 14)
    assert finish is not None and finish.is_abort and finish.status_code == 500


# ---- binding -----------------------------------------------------------------------------


def test_bind_grammar_compiles_on_the_model_tokenizer_and_refuses_bad_grammars(
    tiny_llama: Path,
) -> None:
    path = str(tiny_llama)
    vocab_size = backend_for(512, path).vocab_size
    req = Request(rid="g", prompt_ids=[1], sampling=SamplingParams(regex="[0-9]{2}"))
    bind_grammar(req, vocab_size, path)
    assert req.grammar is not None and req.grammar.problem() is None and req.grammar.is_ready()
    free = Request(rid="f", prompt_ids=[1], sampling=SamplingParams())
    bind_grammar(free, vocab_size, path)
    assert free.grammar is None
    bad = Request(rid="b", prompt_ids=[1], sampling=SamplingParams(json_schema='{"type": 5}'))
    with pytest.raises(ValueError, match=r"^json_schema='\{\"type\": 5\}' is invalid: "):
        bind_grammar(bad, vocab_size, path)
