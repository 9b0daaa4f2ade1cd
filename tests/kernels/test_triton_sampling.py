"""The Triton race sampler (kernels/triton_sampling.py) against a float64 torch reference of the
torch sampler's draw (softmax over logits / T, min-p, argmax(p / E) with the seeded hash noise),
on fresh random logits; greedy rows and ties; a chi-square check of the draws' distribution; and,
on CUDA, the sampler's GPU path against its torch path for seeded rows.

Needs CUDA and triton; also runs (slowly) on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pdserve.worker.sampling_noise import seeded_exponential

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _HAS_TRITON or not (torch.cuda.is_available() or _INTERPRET),
        reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
    ),
]


def reference_scores(logits, temps, min_ps, keys):  # type: ignore[no-untyped-def]
    """[B, V] float64: p / E after min-p (0 where cut), the torch sampler's race."""
    probs = torch.softmax(logits.double() / temps.double().view(-1, 1), dim=-1)
    keep = probs >= min_ps.double().view(-1, 1) * probs.max(dim=-1, keepdim=True).values
    noise = seeded_exponential(keys.cpu(), logits.shape[-1]).double()
    return probs.cpu() * keep.cpu() / noise


def random_case(gen: torch.Generator, batch: int, vocab: int):  # type: ignore[no-untyped-def]
    logits = torch.randn(batch, vocab, generator=gen) * 3.0
    cut = torch.rand(batch, vocab, generator=gen) < 0.3  # a grammar's disallowed tokens
    logits[cut] = float("-inf")
    temps = 0.3 + 1.7 * torch.rand(batch, generator=gen)
    min_ps = torch.tensor([0.0, 0.05, 0.3])[torch.randint(0, 3, (batch,), generator=gen)]
    keys = torch.randint(0, 1 << 32, (batch, 2), generator=gen, dtype=torch.int64)
    return logits, temps, min_ps, keys


def run_kernel(logits, temps, min_ps, greedy, keys):  # type: ignore[no-untyped-def]
    from pdserve.kernels.triton_sampling import race_sample

    args = [t.to(DEVICE) for t in (logits, temps, min_ps, greedy, keys)]
    return race_sample(*args).cpu()


@pytest.mark.parametrize("seed", range(3))
def test_seeded_draws_equal_the_torch_samplers_race(seed: int) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    batch, vocab = 24, 5000  # vocab not a multiple of the kernel's block
    logits, temps, min_ps, keys = random_case(gen, batch, vocab)
    got = run_kernel(logits, temps, min_ps, torch.zeros(batch, dtype=torch.bool), keys)
    scores = reference_scores(logits, temps, min_ps, keys)
    want = scores.argmax(dim=-1)
    for row in (got != want).nonzero().flatten().tolist():  # only a float near-tie may differ
        a, b = scores[row, got[row]].item(), scores[row, want[row]].item()
        assert abs(a - b) <= 1e-5 * b, (row, got[row].item(), want[row].item(), a, b)
    assert (got == want).float().mean() >= 0.95


def test_greedy_rows_take_the_first_largest_allowed_logit() -> None:
    gen = torch.Generator().manual_seed(7)
    logits, temps, min_ps, keys = random_case(gen, 8, 3000)
    logits[0, 100] = logits[0, 2500] = 50.0  # a tie: torch.argmax takes the first
    logits[1, 2999] = 60.0  # the last token
    logits[2] = float("-inf")  # nothing allowed: token 0, as torch.argmax
    greedy = torch.tensor([True, True, True, True, False, False, True, False])
    got = run_kernel(logits, temps, min_ps, greedy, keys)
    want = logits.argmax(dim=-1)
    assert got[greedy].tolist() == want[greedy].tolist()
    assert got[:3].tolist() == [100, 2999, 0]
    assert all(logits[i, got[i]] > float("-inf") for i in (4, 5, 7))


def test_draws_follow_softmax_over_temperature_after_min_p() -> None:
    """4,000 rows with their own keys, one 8-token distribution: counts against the expected
    probabilities (chi-square, 7 degrees of freedom, p = 0.001: 24.3)."""
    gen = torch.Generator().manual_seed(11)
    n, temp, min_p = 4000, 0.7, 0.08
    row = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 2.0, 0.2, -3.0])
    logits = row.repeat(n, 1)
    keys = torch.randint(0, 1 << 32, (n, 2), generator=gen, dtype=torch.int64)
    got = run_kernel(
        logits, torch.full((n,), temp), torch.full((n,), min_p), torch.zeros(n, dtype=torch.bool),
        keys,
    )  # fmt: skip
    probs = torch.softmax(row.double() / temp, dim=-1)
    probs = probs * (probs >= min_p * probs.max())
    probs = probs / probs.sum()
    counts = torch.bincount(got, minlength=8).double()
    assert counts[probs == 0].sum() == 0  # min-p's cut tokens are never drawn
    live = probs > 0
    expected = probs[live] * n
    chi2 = ((counts[live] - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, (counts.tolist(), expected.tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sampler's GPU path needs CUDA")
def test_the_samplers_gpu_path_equals_its_torch_path_for_seeded_rows() -> None:
    from pdserve.config.sampling_params import SamplingParams
    from pdserve.worker.sampler import SamplingBatch, SamplingRow, sample_on_device

    gen = torch.Generator().manual_seed(5)
    vocab = 32000
    rows = [
        SamplingRow(
            SamplingParams(temperature=t, min_p=m, seed=s), (1, 2), tuple(range(s % 5)), (0,)
        )
        for t, m, s in [(0.7, 0.0, 3), (1.0, 0.1, 4), (1.3, 0.0, 9), (0.0, 0.0, 1), (0.9, 0.2, 12)]
    ]
    logits = torch.randn(len(rows), vocab, generator=gen) * 4.0
    on_gpu = sample_on_device(logits.cuda(), SamplingBatch.build(rows, vocab, "cuda"))
    on_cpu = sample_on_device(logits, SamplingBatch.build(rows, vocab, "cpu"))
    assert on_gpu.token_ids.cpu().tolist() == on_cpu.token_ids.tolist()


@pytest.mark.parametrize("seed", range(2))
def test_the_bitmask_read_in_the_kernel_equals_the_torch_race(seed: int) -> None:
    """The grammar's bitmask read beside the logits (greedy and seeded rows, min-p, a row with one
    allowed token, one with none) against worker/race_sampling.py's torch draw of the same rows."""
    from pdserve.kernels.triton_sampling import race_sample
    from pdserve.worker.grammar_mask import unpack_bitmask
    from pdserve.worker.race_sampling import race_draw_torch
    from tests.worker.test_light_sampling import random_bitmask

    gen = torch.Generator().manual_seed(300 + seed)
    batch, vocab = 12, 4100  # the last bitmask word is partly past the vocabulary
    logits, temps, min_ps, keys = random_case(gen, batch, vocab)
    logits[logits == float("-inf")] = 0.0  # every token finite: the bitmask alone forbids
    bitmask = random_bitmask(gen, batch, vocab)
    bitmask[1] = 0
    bitmask[1, 4099 // 32] = 1 << (4099 % 32)  # the last token only
    bitmask[2] = 0  # nothing allowed: token 0
    greedy = torch.arange(batch) % 3 == 0
    args = [t.to(DEVICE) for t in (logits, temps, min_ps, greedy, keys, bitmask)]
    got = race_sample(*args).cpu()
    want = race_draw_torch(logits, temps, min_ps, greedy, keys, bitmask)
    allowed = unpack_bitmask(bitmask, vocab)
    assert got[1].item() == 4099 and got[2].item() == 0
    live = torch.tensor([i != 2 for i in range(batch)])
    assert bool(allowed[torch.arange(batch), got][live].all()), "a forbidden token was drawn"
    assert got[greedy].tolist() == want[greedy].tolist()
    assert (got == want).float().mean() >= 0.9, (got.tolist(), want.tolist())


def test_the_launch_shortcuts_draw_what_the_general_launch_draws() -> None:
    """`all_greedy` (no race computed) and `any_min_p=False` (no max launch) against the general
    launches on the same rows, batch 1 (one chunk per block) and batch 40."""
    from pdserve.kernels.triton_sampling import race_sample

    gen = torch.Generator().manual_seed(21)
    for batch in (1, 40):
        logits, temps, min_ps, keys = random_case(gen, batch, 6000)
        min_ps.zero_()
        greedy = torch.ones(batch, dtype=torch.bool)
        args = [t.to(DEVICE) for t in (logits, temps, min_ps)]
        keys_d = keys.to(DEVICE)
        want_greedy = race_sample(*args, greedy.to(DEVICE), keys_d).cpu()
        got_greedy = race_sample(args[0], None, None, None, None, all_greedy=True).cpu()
        assert got_greedy.tolist() == want_greedy.tolist() == logits.argmax(dim=-1).tolist()
        sampled = (~greedy).to(DEVICE)
        want = race_sample(*args, sampled, keys_d).cpu()
        got = race_sample(*args, sampled.float(), keys_d, any_min_p=False).cpu()
        assert got.tolist() == want.tolist()
