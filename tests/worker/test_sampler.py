"""The sampler against float64 references written here from the HF/OpenAI definitions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from pdserve.config.sampling_params import SamplingParams
from pdserve.worker.sampler import (
    SamplingBatch,
    SamplingRow,
    build_skipping_bad_rows,
    process_logits,
    sample,
)
from pdserve.worker.sampling_checks import BadRow, SamplingRowError, find_bad_rows

V = 32
NUM_DRAWS = 4000


def row(
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    eos_token_ids: Sequence[int] = (),
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    **params: object,
) -> SamplingRow:
    return SamplingRow(
        SamplingParams(**params),
        prompt_ids,
        output_ids,
        eos_token_ids,
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num,
    )


def run(rows: list[SamplingRow], logits: torch.Tensor, generator: torch.Generator | None = None):
    batch = SamplingBatch.build(rows, logits.shape[-1], "cpu")
    return sample(logits, batch, generator)


def random_logits(num_rows: int, vocab_size: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 2


# ---- references --------------------------------------------------------------------------


def reference_truncated_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> dict[int, float]:
    """HF warper order in float64: temperature, top-k, top-p (on renormalized top-k), min-p."""
    scaled = [x / temperature for x in logits]
    peak = max(scaled)
    weights = {i: math.exp(x - peak) for i, x in enumerate(scaled)}
    order = sorted(weights, key=lambda i: -weights[i])
    if top_k > 0:
        order = order[:top_k]
    total = sum(weights[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        assert top_p == 1.0 or abs(mass - top_p) > 1e-4, "top_p too close to a boundary"
        kept.append(i)
        mass += weights[i] / total
    kept = [i for i in kept if weights[i] >= min_p * weights[order[0]]]
    total = sum(weights[i] for i in kept)
    return {i: weights[i] / total for i in kept}


def reference_penalized(
    logits: list[float],
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    params: SamplingParams,
) -> list[float]:
    """logit_bias, then HF repetition penalty, then OpenAI frequency/presence, in float64."""
    out = [float(x) for x in logits]
    for token_id, bias in params.logit_bias.items():
        out[token_id] += bias
    for token_id in set(prompt_ids) | set(output_ids):
        penalty = params.repetition_penalty
        out[token_id] = out[token_id] / penalty if out[token_id] > 0 else out[token_id] * penalty
    for token_id in set(output_ids):
        count = list(output_ids).count(token_id)
        out[token_id] -= count * params.frequency_penalty + params.presence_penalty
    return out


def log_softmax64(values: list[float]) -> list[float]:
    peak = max(values)
    log_total = peak + math.log(sum(math.exp(x - peak) for x in values))
    return [x - log_total for x in values]


# ---- truncation and distribution ---------------------------------------------------------

TRUNCATIONS = {
    "top_k": dict(temperature=0.7, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "all": dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
    "plain": dict(temperature=1.0),
}


@pytest.mark.parametrize("seeded", [False, True], ids=["global_generator", "per_row_seed"])
@pytest.mark.parametrize("name", list(TRUNCATIONS))
def test_draws_stay_in_support_and_follow_truncated_distribution(name: str, seeded: bool) -> None:
    settings = TRUNCATIONS[name]
    logits = random_logits(1)[0]
    expected = reference_truncated_probs(
        logits.double().tolist(),
        settings["temperature"],
        settings.get("top_k", -1),
        settings.get("top_p", 1.0),
        settings.get("min_p", 0.0),
    )
    assert 1 < len(expected) < V or name == "plain"
    rows = [row(seed=i if seeded else None, **settings) for i in range(NUM_DRAWS)]
    out = run(rows, logits.expand(NUM_DRAWS, V), torch.Generator().manual_seed(1))

    counts = torch.bincount(torch.tensor(out.token_ids), minlength=V).tolist()
    outside = {i: c for i, c in enumerate(counts) if c and i not in expected}
    assert not outside, f"drew tokens outside the support: {outside}"
    # Pearson chi-square over the support; df <= 31, and 80 is far beyond its 0.999 quantile.
    chi2 = sum((counts[i] - NUM_DRAWS * p) ** 2 / (NUM_DRAWS * p) for i, p in expected.items())
    assert chi2 < 80, f"chi-square {chi2:.1f} over {len(expected)} tokens"


def test_distribution_check_rejects_a_wrong_temperature() -> None:
    """The chi-square check above can fail: sampling at T=1 is rejected against T=0.5."""
    logits = random_logits(1)[0]
    expected = reference_truncated_probs(logits.double().tolist(), 0.5, -1, 1.0, 0.0)
    rows = [row(temperature=1.0) for _ in range(NUM_DRAWS)]
    out = run(rows, logits.expand(NUM_DRAWS, V), torch.Generator().manual_seed(1))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=V).tolist()
    chi2 = sum((counts[i] - NUM_DRAWS * p) ** 2 / (NUM_DRAWS * p) for i, p in expected.items())
    assert chi2 > 200


# ---- greedy ------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    logits = random_logits(4, seed=3)
    rows = [
        row(temperature=0.0),
        row(temperature=1e-7, top_p=0.5),
        row(temperature=1.5, top_k=1),
        row(temperature=0.0, seed=7, min_p=0.5),
    ]
    out = run(rows, logits, torch.Generator().manual_seed(0))
    expected = [max(range(V), key=lambda i, r=r: r[i]) for r in logits.double().tolist()]
    assert out.token_ids == expected
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_and_sampled_rows_share_a_batch() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 50.0  # near-certain under sampling too
    logits[1, 3] = 0.0  # row 1: flat, so a sampled row would not always pick the argmax
    logits[1, 9] = 0.1
    rows = [row(temperature=1.0), row(temperature=0.0)]
    for step in range(20):
        out = run(rows, logits, torch.Generator().manual_seed(step))
        assert out.token_ids == [3, 9]


# ---- seeds -------------------------------------------------------------------------------


def seeded_sequence(seed: int, neighbours: list[SamplingRow], position: int) -> list[int]:
    """Ten steps of one seeded request, placed at `position` among `neighbours`."""
    step_logits = torch.randn(10, 1000, generator=torch.Generator().manual_seed(5))
    output_ids: list[int] = []
    for step in range(10):
        rows = list(neighbours)
        rows.insert(position, row(output_ids=list(output_ids), seed=seed, top_p=0.95))
        logits = random_logits(len(rows), 1000, seed=100 + step)
        logits[position] = step_logits[step]
        out = run(rows, logits, torch.Generator().manual_seed(step))
        output_ids.append(out.token_ids[position])
    return output_ids


def test_same_seed_reproduces_whatever_the_batch() -> None:
    alone = seeded_sequence(42, [], 0)
    neighbours = [row(), row(seed=42, temperature=0.5), row(temperature=0.0), row(seed=3)]
    assert seeded_sequence(42, neighbours, 2) == alone
    assert seeded_sequence(42, neighbours[:1], 1) == alone
    assert len(set(alone)) > 5, "a seeded stream must vary from step to step"


def test_different_seeds_give_different_sequences() -> None:
    sequences = {tuple(seeded_sequence(seed, [], 0)) for seed in (0, 1, 2, -1, 2**40)}
    assert len(sequences) == 5


def test_unseeded_rows_follow_the_given_generator() -> None:
    logits = random_logits(8, 1000)
    rows = [row() for _ in range(8)]
    first = run(rows, logits, torch.Generator().manual_seed(9)).token_ids
    assert run(rows, logits, torch.Generator().manual_seed(9)).token_ids == first
    assert run(rows, logits, torch.Generator().manual_seed(10)).token_ids != first


# ---- penalties and bias ------------------------------------------------------------------


def test_penalties_and_bias_change_logits_by_their_definitions() -> None:
    logits = random_logits(6, seed=11)
    logits[:, 3] = 1.5  # token 3: positive and generated three times
    logits[:, 2] = -0.75  # token 2: negative, in the prompt and generated once
    prompt_ids, output_ids = [1, 2, 9], [3, 3, 2, 3, 5]
    cases = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.8),
        dict(frequency_penalty=0.4),
        dict(presence_penalty=-0.25),
        dict(logit_bias={7: 2.5, 3: -1.0}),
        dict(
            repetition_penalty=1.7,
            frequency_penalty=-0.3,
            presence_penalty=0.6,
            logit_bias={3: 4.0, 9: -2.0, 0: 1.0},
        ),
    ]
    rows = [row(prompt_ids, output_ids, **case) for case in cases]
    got = process_logits(logits, SamplingBatch.build(rows, V, "cpu"))
    for i, r in enumerate(rows):
        expected = reference_penalized(
            logits[i].double().tolist(), prompt_ids, output_ids, r.params
        )
        torch.testing.assert_close(got[i].double(), torch.tensor(expected, dtype=torch.float64))
    assert not torch.equal(got, logits), "the cases must change something"


def test_rows_without_penalties_keep_their_logits() -> None:
    logits = random_logits(2, seed=12)
    rows = [row([1, 2], [3, 3]), row([1, 2], [3, 3], repetition_penalty=1.5, presence_penalty=1)]
    got = process_logits(logits, SamplingBatch.build(rows, V, "cpu"))
    assert torch.equal(got[0], logits[0])
    assert not torch.equal(got[1], logits[1])


def test_logit_bias_steers_greedy_choice() -> None:
    logits = random_logits(1, seed=13)
    low = min(range(V), key=lambda i: logits[0, i].item())
    assert run([row(temperature=0.0, logit_bias={low: 100.0})], logits).token_ids == [low]


def test_bad_token_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingBatch.build([row(logit_bias={V: 1.0})], V, "cpu")
    with pytest.raises(ValueError, match="top_logprobs_num"):
        SamplingBatch.build([row(top_logprobs_num=21)], V, "cpu")
    batch = SamplingBatch.build([row()], V, "cpu")
    with pytest.raises(ValueError, match="logits shape"):
        sample(torch.zeros(2, V), batch)


# ---- min_new_tokens ----------------------------------------------------------------------


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(3, V)
    logits[:, 5] = 10.0  # EOS
    logits[:, 7] = 9.0  # stop token
    logits[:, 11] = 8.0
    params = dict(temperature=0.0, min_new_tokens=3, max_new_tokens=8, stop_token_ids=(7,))
    rows = [
        row(output_ids=[1, 1], eos_token_ids=(5,), **params),  # 2 < 3: masked
        row(output_ids=[1, 1, 1], eos_token_ids=(5,), **params),  # reached
        row(output_ids=[], eos_token_ids=(5,), temperature=0.0),  # no minimum
    ]
    batch = SamplingBatch.build(rows, V, "cpu")
    processed = process_logits(logits, batch)
    assert processed[0, 5] == -math.inf and processed[0, 7] == -math.inf
    assert torch.isfinite(processed[1:]).all()
    assert sample(logits, batch).token_ids == [11, 5, 5]


def test_min_new_tokens_leaves_an_ignored_eos_alone() -> None:
    """With ignore_eos an EOS ends nothing, so min_new_tokens does not ban it (as in vLLM); the
    stop ids it still bans. A row whose minimum bans nothing is plain greedy and light (the
    worker's fast paths): a benchmark's min_tokens + ignore_eos requests take them."""
    from pdserve.worker.sampler import is_plain_greedy_request

    logits = torch.zeros(2, V)
    logits[:, 5] = 10.0  # EOS
    logits[:, 7] = 9.0  # stop token
    base = dict(temperature=0.0, min_new_tokens=3, max_new_tokens=8, ignore_eos=True)
    rows = [
        row(output_ids=[1], eos_token_ids=(5,), **base),
        row(output_ids=[1], eos_token_ids=(5,), stop_token_ids=(5, 7), **base),
    ]
    batch = SamplingBatch.build(rows, V, "cpu")
    processed = process_logits(logits, batch)
    assert torch.isfinite(processed[0]).all()
    assert processed[1, 5] == -math.inf and processed[1, 7] == -math.inf
    assert sample(logits, batch).token_ids == [5, 0]
    assert is_plain_greedy_request(rows[0].params, 1, False, 0, None)
    assert not is_plain_greedy_request(rows[1].params, 1, False, 0, None)
    unignored = SamplingParams(temperature=0.0, min_new_tokens=3, max_new_tokens=8)
    assert not is_plain_greedy_request(unignored, 1, False, 0, None)
    assert is_plain_greedy_request(unignored, 3, False, 0, None)
    assert rows[0].params.is_light and not rows[0].params.min_new_tokens_bans
    assert rows[1].params.min_new_tokens_bans and unignored.min_new_tokens_bans


def test_min_new_tokens_holds_for_sampled_rows() -> None:
    logits = torch.zeros(NUM_DRAWS, V)
    logits[:, 5] = 3.0
    rows = [row(output_ids=[], eos_token_ids=(5,), min_new_tokens=1) for _ in range(NUM_DRAWS)]
    out = run(rows, logits, torch.Generator().manual_seed(0))
    assert 5 not in out.token_ids


# ---- logprobs ----------------------------------------------------------------------------


def test_logprobs_are_log_softmax_after_penalties_before_temperature() -> None:
    logits = random_logits(4, seed=21)
    rows = [
        row(return_logprob=True, temperature=0.6, top_k=4),
        row(top_logprobs_num=3, temperature=0.0),
        row(top_logprobs_num=20, temperature=1.7, top_p=0.7),
        row([1, 4], [4, 4, 6], top_logprobs_num=5, repetition_penalty=1.4, frequency_penalty=0.5),
    ]
    out = run(rows, logits, torch.Generator().manual_seed(0))
    assert out.logprobs is not None and out.top_logprobs is not None
    for i, r in enumerate(rows):
        penalized = reference_penalized(
            logits[i].double().tolist(), r.prompt_ids, r.output_ids, r.params
        )
        expected = log_softmax64(penalized)
        token_id = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(expected[token_id], abs=1e-5)
        top_ids, top_values = out.top_logprobs[i]
        k = r.top_logprobs_num
        assert top_ids == sorted(range(V), key=lambda t, e=expected: -e[t])[:k]
        assert top_values == pytest.approx([expected[t] for t in top_ids], abs=1e-5)
        assert top_values == sorted(top_values, reverse=True)


def test_logprobs_are_skipped_when_nobody_asks() -> None:
    out = run([row(), row(temperature=0.0)], random_logits(2))
    assert out.logprobs is None and out.top_logprobs is None


# ---- device ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_rows_match_between_cpu_and_cuda() -> None:
    logits = random_logits(6, 1000, seed=31)
    rows = [row(output_ids=[i] * i, seed=1000 + i, top_k=50, top_p=0.9) for i in range(6)]
    cpu = run(rows, logits).token_ids
    batch = SamplingBatch.build(rows, 1000, "cuda")
    assert sample(logits.cuda(), batch).token_ids == cpu


# ---- one row's bad parameter never fails the batch ----------------------------------------


def forced(params: SamplingParams, **bad: object) -> SamplingParams:
    """Params carrying values validation would refuse: what a bug upstream could let through."""
    for key, value in bad.items():
        object.__setattr__(params, key, value)
    return params


def poisoned_rows() -> dict[str, SamplingRow]:
    greedy = SamplingParams(temperature=0.0)
    return {
        "logit_bias past vocab": row(temperature=0.0, logit_bias={V + 5: 5.0}),
        "negative logit_bias id": SamplingRow(forced(greedy, logit_bias={-1: 5.0}), (), ()),
        "stop id past vocab": row(temperature=0.0, min_new_tokens=3, stop_token_ids=(V,)),
        "prompt id past vocab": row(prompt_ids=[1, V + 1], temperature=0.0, repetition_penalty=1.3),
        "output id past int64": row(
            output_ids=[2, 2**70], temperature=0.0, frequency_penalty=0.5, max_new_tokens=9
        ),
        "nan temperature": SamplingRow(forced(SamplingParams(), temperature=math.nan), (), ()),
        "top_logprobs 21": row(temperature=0.0, top_logprobs_num=21),
    }


@pytest.mark.parametrize("name", list(poisoned_rows()))
def test_a_bad_row_is_named_and_the_others_sample_as_alone(name: str) -> None:
    good = [
        row(temperature=0.0, presence_penalty=0.5, output_ids=[3]),
        row(temperature=0.7, seed=5),
    ]
    rows = [good[0], poisoned_rows()[name], good[1]]
    logits = random_logits(3, seed=4)
    with pytest.raises(SamplingRowError) as info:
        SamplingBatch.build(rows, V, "cpu")
    assert info.value.row_indices == [1]

    part = build_skipping_bad_rows(rows, V, "cpu")
    assert part.row_indices == [0, 2]
    assert [r.row_idx for r in part.bad_rows] == [1] and part.bad_rows[0].message
    assert part.batch is not None
    out = sample(logits[part.row_indices], part.batch)
    alone = run(good, logits[[0, 2]])
    assert out.token_ids == alone.token_ids


def test_every_bad_row_is_reported_and_an_all_bad_batch_gives_none() -> None:
    names = list(poisoned_rows())
    bad = list(poisoned_rows().values())
    # The per-step check covers numbers, logit_bias and stop ids; prompt/output ids are checked
    # (vectorized) while the batch is built.
    cheap = [names[r.row_idx] for r in find_bad_rows(bad, V)]
    assert cheap == [n for n in names if not n.startswith(("prompt id", "output id"))]
    part = build_skipping_bad_rows(bad, V, "cpu")
    assert part.batch is None and part.row_indices == []
    assert [r.row_idx for r in part.bad_rows] == list(range(len(bad)))
    assert all(isinstance(r, BadRow) and r.message for r in part.bad_rows)


def test_top_k_past_the_vocab_means_no_truncation() -> None:
    logits = random_logits(1, seed=9)
    huge = run([row(top_k=2**31 - 1, seed=3)], logits).token_ids
    assert huge == run([row(top_k=-1, seed=3)], logits).token_ids
