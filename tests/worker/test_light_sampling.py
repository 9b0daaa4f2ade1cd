"""The light sampling path (worker/light_sampling.py, worker/race_sampling.py): which rows take it,
its draw against the SamplingBatch path on fresh random logits and bitmasks, its unseeded draws'
distribution, and whole runs of the tiny model (CPU) whose tokens equal the general path's, token
for token, plain and overlapped, greedy, seeded, min-p and under regexes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import pdserve.worker.worker_core as worker_core
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.device_copy import host_buffer
from pdserve.worker.grammar_mask import apply_bitmask, unpack_bitmask
from pdserve.worker.light_sampling import LightSampler, is_light
from pdserve.worker.race_sampling import race_draw_torch
from pdserve.worker.sampler import SamplingBatch, SamplingRow, sample_on_device
from tests.worker.test_overlap import assert_same, make_core, run


def checked_request(output_ids: list[int] | None = None, **params: object) -> Request:
    req = Request(rid="r", prompt_ids=[1, 2, 3], sampling=SamplingParams(**params))
    req.checked_sampling = req.sampling
    req.output_ids = list(output_ids or [])
    return req


@pytest.mark.parametrize(
    ("params", "light"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 0.8, "seed": 3}, True),
        ({"temperature": 1.2, "min_p": 0.1}, True),
        ({"temperature": 0.8, "top_k": 1}, True),  # greedy
        ({"temperature": 0.8, "top_k": 40}, False),
        ({"temperature": 0.8, "top_p": 0.9}, False),
        ({"temperature": 0.0, "repetition_penalty": 1.1}, False),
        ({"temperature": 0.0, "presence_penalty": 0.5}, False),
        ({"temperature": 0.0, "logit_bias": {5: 1.0}}, False),
        ({"temperature": 0.0, "min_new_tokens": 3}, False),  # its EOS ban is still pending
        ({"temperature": 0.0, "min_new_tokens": 2}, True),  # two tokens already out
    ],
)
def test_which_rows_are_light(params: dict, light: bool) -> None:
    assert is_light(checked_request([7, 8], **params)) is light


def test_rows_asking_for_logprobs_or_not_checked_are_not_light() -> None:
    req = checked_request()
    req.return_logprob = True
    assert not is_light(req)
    req = checked_request()
    req.top_logprobs_num = 2
    assert not is_light(req)
    req = checked_request()
    req.checked_sampling = None
    assert not is_light(req)


def random_bitmask(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32 allowing each token with probability 0.3 (at least one)."""
    allowed = torch.rand(rows, vocab, generator=gen) < 0.3
    allowed[:, 0] |= ~allowed.any(dim=-1)
    words = -(-vocab // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    bits = (padded.view(rows, words, 32) << torch.arange(32)).sum(dim=-1)  # [rows, W] < 2**32
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


@pytest.mark.parametrize("seed", range(3))
def test_the_race_draws_the_sampling_batch_paths_tokens(seed: int) -> None:
    """Seeded and greedy rows over a random bitmask: race_draw_torch (the kernel's reference, the
    CPU's light path) against sample_on_device of a SamplingBatch with the same seeds and the
    same logits masked: equal tokens, but where two tokens nearly tie in float32."""
    gen = torch.Generator().manual_seed(100 + seed)
    num_rows, vocab = 16, 3000
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0
    bitmask = random_bitmask(gen, num_rows, vocab)
    assert bool((unpack_bitmask(bitmask, vocab).sum(dim=-1) > 0).all())
    params = [
        SamplingParams(
            temperature=0.0 if i % 4 == 0 else 0.3 + 1.5 * random.Random(seed * 50 + i).random(),
            min_p=(0.0, 0.05, 0.3)[i % 3],
            seed=1000 * seed + i,
        )
        for i in range(num_rows)
    ]
    rows = [SamplingRow(p, (1,), tuple(range(i % 5)), (0,)) for i, p in enumerate(params)]
    batch = SamplingBatch.build(rows, vocab, "cpu")
    want = sample_on_device(apply_bitmask(logits, bitmask), batch).token_ids
    keys = torch.zeros(num_rows, 2, dtype=torch.int64)
    keys[batch.seeded_rows] = batch.seed_keys
    got = race_draw_torch(
        logits, batch.temperatures.view(-1), batch.min_ps.view(-1), batch.is_greedy, keys, bitmask
    )
    allowed = unpack_bitmask(bitmask, vocab)
    assert bool(allowed[torch.arange(num_rows), got].all()), "a forbidden token was drawn"
    greedy = batch.is_greedy
    assert got[greedy].tolist() == want[greedy].tolist()
    assert (got == want).float().mean() >= 0.9, (got.tolist(), want.tolist())


def test_a_row_with_nothing_allowed_gets_token_0() -> None:
    logits = torch.randn(2, 64)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[1, 1] = 1 << 3  # token 35 only
    keys = torch.tensor([[1, 2], [3, 4]])
    got = race_draw_torch(
        logits, torch.ones(2), torch.zeros(2), torch.tensor([False, False]), keys, bitmask
    )
    assert got.tolist() == [0, 35]


def items_for(reqs: list[Request]) -> list[BatchItem]:
    return [BatchItem(req=r, start=0, num_tokens=1) for r in reqs]


def test_unseeded_light_rows_follow_softmax_over_temperature_after_min_p() -> None:
    """4,000 unseeded rows of one 8-token distribution through LightSampler: counts against the
    expected probabilities (chi-square, 7 degrees of freedom, p = 0.001: 24.3)."""
    n, temp, min_p = 4000, 0.7, 0.08
    row = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 2.0, 0.2, -3.0])
    reqs = [checked_request(temperature=temp, min_p=min_p) for _ in range(n)]
    got = LightSampler(seed=random.randrange(2**31)).sample(row.repeat(n, 1), items_for(reqs))
    assert got is not None
    probs = torch.softmax(row.double() / temp, dim=-1)
    probs = probs * (probs >= min_p * probs.max())
    probs = probs / probs.sum()
    counts = torch.bincount(got, minlength=8).double()
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    expected = probs[live] * n
    chi2 = ((counts[live] - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, (counts.tolist(), expected.tolist())


def test_a_seeded_rows_draw_depends_on_its_seed_and_step_only() -> None:
    """The same seeded request drawn alone and among others, at the same step: the same token;
    at another step: its own key (tokens over 40 steps are not all equal)."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 500, generator=gen)
    sampler = LightSampler(seed=1)
    req = checked_request([5, 6, 7], temperature=1.0, seed=42)
    others = [checked_request(temperature=0.9) for _ in range(3)]
    alone = sampler.sample(logits[2:3].clone(), items_for([req]))
    mixed = sampler.sample(logits, items_for([others[0], others[1], req, others[2]]))
    assert alone is not None and mixed is not None
    assert alone.item() == mixed[2].item()
    draws = set()
    for step in range(40):
        req.output_ids = [5] * step
        draws.add(sampler.sample(logits[2:3].clone(), items_for([req])).item())  # type: ignore[union-attr]
    assert len(draws) > 1


def test_row_keys_are_the_seeded_keys_or_the_generators_draws() -> None:
    """A seeded row's keys are seed_keys(seed, step) (the SamplingBatch's), whatever the others,
    at each step; the other rows take the generator's draws in row order, greedy rows included."""
    import numpy as np

    from pdserve.worker.light_sampling import _BatchRows
    from pdserve.worker.sampling_noise import seed_keys, split_keys

    rng = random.Random()
    reqs = [
        checked_request(
            [1] * rng.randrange(9),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            seed=rng.choice([None, rng.randrange(2**63), rng.randrange(2**31)]),
        )  # fmt: skip
        for _ in range(40)
    ]
    rows = _BatchRows(reqs)
    assert rows.holds(list(reqs)) and not rows.holds(reqs[::-1]) and not rows.holds(reqs[1:])
    gen, ref = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(3):
        for req in reqs:
            req.output_ids.append(5)
            req.num_inflight = rng.randrange(2)
        got = rows.keys(gen)
        want = split_keys(ref.integers(0, 2**64, size=40, dtype=np.uint64, endpoint=False))
        seeded = [
            i for i, r in enumerate(reqs) if r.sampling.seed is not None and r.sampling.temperature
        ]
        steps = [len(reqs[i].output_ids) + reqs[i].num_inflight for i in seeded]
        want[seeded] = seed_keys([reqs[i].sampling.seed for i in seeded], steps)
        assert got.dtype == np.int64 and got.shape == (40, 2)
        assert np.array_equal(got, want)


def test_the_vectorized_splitmix_equals_the_scalar_one() -> None:
    import numpy as np

    from pdserve.worker.sampling_noise import splitmix64, splitmix64_array

    values = [random.randrange(2**64) for _ in range(50)] + [0, 2**64 - 1]
    got = splitmix64_array(np.array(values, dtype=np.uint64)).tolist()
    assert got == [splitmix64(v) for v in values]


def test_host_buffer_on_the_cpu_is_a_plain_tensor() -> None:
    host, send = host_buffer((3, 5), torch.float32, "cpu")
    host.fill_(2.5)
    out = send()
    assert out.device.type == "cpu" and out.shape == (3, 5) and bool((out == 2.5).all())


# ---- whole runs ---------------------------------------------------------------------------


def light_params(rng: random.Random) -> dict:
    base = {"max_new_tokens": rng.randint(1, 12), "ignore_eos": rng.random() < 0.7}
    kind = rng.choice(("greedy", "seeded", "min_p", "regex", "regex_seeded", "min_tokens"))
    if kind == "greedy":
        return {**base, "temperature": 0.0}
    if kind == "seeded":
        return {**base, "temperature": rng.choice([0.7, 1.0, 1.3]), "seed": rng.randrange(2**31)}
    if kind == "min_p":
        return {**base, "temperature": 1.0, "min_p": 0.05, "seed": rng.randrange(2**31)}
    if kind == "min_tokens":  # light once min_new_tokens are out
        return {**base, "temperature": 0.0, "min_new_tokens": base["max_new_tokens"] // 2}
    regex = rng.choice([r"[a-e]{1,6}", r"(ab|cd|e )+x", r"[0-9]+(\.[0-9]{1,3})?", r"\w+ \w+"])
    if kind == "regex":
        return {**base, "temperature": 0.0, "regex": regex}
    return {**base, "temperature": 1.0, "seed": rng.randrange(2**31), "regex": regex}


def light_specs(rng: random.Random, num: int) -> list[dict]:
    return [
        {
            "rid": f"r{i}",
            "prompt": [rng.randrange(5, 200) for _ in range(rng.randint(1, 20))],
            "params": light_params(rng),
            "logprobs": False,
            "arrive": rng.randint(0, 6),
        }
        for i in range(num)
    ]


def count_light_steps(core: worker_core.WorkerCore) -> tuple[list[int], list[int]]:
    """Lists that get the rows of each light draw: queued at once, and deferred (a grammar
    step's draw queued when the next batch is built, its bitmask filled on the fill thread)."""
    now: list[int] = []
    deferred: list[int] = []
    prepare = core.light_sampler.prepare

    def counting(logits, items, background, after=None):  # type: ignore[no-untyped-def]
        draw = prepare(logits, items, background, after)
        (deferred if background else now).append(0 if draw is None else len(items))
        return draw

    core.light_sampler.prepare = counting  # type: ignore[method-assign]
    return now, deferred


# The loops a core runs, (overlap, defer_grammar_draws, accept_on_fill_thread): plain;
# overlapped (the default: grammar draws queued in their own step, bitmasks filled inline);
# overlapped with deferred grammar draws (bitmasks filled on the fill thread, the read-back tokens
# fed to the matchers inline); deferred, with those tokens fed on the fill thread.
LOOPS = {
    "plain": (False, False, False),
    "overlapped": (True, False, False),
    "deferred": (True, True, False),
    "thread-accept": (True, True, True),
}


def make_loop_core(model_dir: Path, loop: str) -> worker_core.WorkerCore:
    overlap, defer, on_thread = LOOPS[loop]
    core = make_core(model_dir, overlap=overlap)
    core.defer_grammar_draws = defer
    core.accept_on_fill_thread = on_thread
    return core


@pytest.mark.parametrize("loop", list(LOOPS))
def test_light_runs_give_the_general_paths_tokens(
    tiny_llama: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    specs = light_specs(rng, 20)
    # Two constrained requests after the others: steps of light rows only, which defer their draws
    # (random specs alone may always hold a row still under min_new_tokens beside a grammar's).
    for i, regex in enumerate((r"[a-e]{3,9}", r"\w+ \w+")):
        params = {"max_new_tokens": 8, "temperature": 1.0, "seed": rng.randrange(2**31)}
        prompt = [rng.randrange(5, 200) for _ in range(6)]
        specs.append({"rid": f"late{i}", "prompt": prompt, "params": {**params, "regex": regex},
                      "logprobs": False, "arrive": 40})  # fmt: skip
    core = make_loop_core(tiny_llama, loop)
    now, deferred = count_light_steps(core)
    accepted = count_thread_accepts(monkeypatch)
    light = run(core, specs)
    assert sum(now) + sum(deferred) > 0, f"no step took the light path (seed {seed})"
    overlap, defer, on_thread = LOOPS[loop]
    if overlap and defer:
        assert sum(deferred) > 0, f"no grammar step deferred its draw (seed {seed})"
        if on_thread:
            assert sum(accepted) > 0, "no tokens went to the matchers on the fill thread"
    else:
        assert not sum(deferred), f"a draw was deferred, not asked to (seed {seed})"
    assert on_thread or not accepted, "tokens went to the fill thread, not asked to"
    monkeypatch.setattr(worker_core, "is_light", lambda req: False)
    general = run(make_core(tiny_llama, overlap=False), specs)
    assert_same(general, light, seed)


def count_thread_accepts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets the rows of each batch of tokens fed to matchers on the fill thread."""
    rows: list[int] = []
    real = worker_core.GrammarAccept

    def counting(records):  # type: ignore[no-untyped-def]
        accept = real(records)
        rows.append(len(accept.reqs))
        return accept

    monkeypatch.setattr(worker_core, "GrammarAccept", counting)
    return rows


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_grammars_end_wins_over_the_length_limit_on_the_same_token(
    tiny_llama: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ignore_eos, the token that completes a grammar (its stop token) ends the request as a
    stop even when max_new_tokens also ends there, as when the limit is far; with thread-accept,
    the matchers take the read-back tokens on the fill thread and their verdict comes first."""
    rng = random.Random()
    regexes = [r"(ab|cd)x", r"[0-9]{2,4}", r"yes|no", r"[a-c]+d"]

    def specs(limits: dict[str, int]) -> list[dict]:
        return [
            {
                "rid": f"r{i}",
                "prompt": [5 + i, 9, 11 + i],
                "params": {
                    "max_new_tokens": limits.get(f"r{i}", 40),
                    "ignore_eos": True,
                    "temperature": 1.0,
                    "seed": 7 * i + 1,
                    "regex": regex,
                },
                "logprobs": False,
                "arrive": rng.randint(0, 3),
            }  # fmt: skip
            for i, regex in enumerate(regexes)
        ]

    free = run(make_core(tiny_llama, overlap=False), specs({}))
    for rid, (ids, finish, _, _) in free.items():
        assert finish.kind == "stop" and len(ids) < 40, (rid, finish)
    accepted = count_thread_accepts(monkeypatch)
    # The far limit under this loop too: a grammar that ends while its row's next draw is being
    # prepared (ignore_eos keeps the stop token from ending it first) is not filled again.
    assert_same(free, run(make_loop_core(tiny_llama, loop), specs({})), 0)
    tight = run(make_loop_core(tiny_llama, loop), specs({r: len(v[0]) for r, v in free.items()}))
    assert_same(free, tight, 0)
    if LOOPS[loop][2]:
        assert sum(accepted) > 0, "no tokens went to the matchers on the fill thread"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_light_runs_on_cuda_give_the_cpu_general_paths_tokens(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton race (chunks, bitmask read beside the logits) and the grammar draws
    with CUDA graphs (the draws over a decode graph's logits replayed), float32, against the CPU's general path: equal tokens but where two tokens
    nearly tie (at most 2 requests of 24 may part ways)."""
    from transformers import AutoTokenizer

    from pdserve.config.engine_config import EngineConfig, SchedulerConfig

    seed = random.randrange(2**32)
    specs = light_specs(random.Random(seed), 24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = EngineConfig(
        model_path=str(tiny_llama), device="cuda", dtype="float32",
        scheduler=SchedulerConfig(num_pages=256, page_size=4, chunk_size=8),
    )  # fmt: skip
    core = worker_core.WorkerCore(config, decode=lambda ids: tokenizer.decode(ids))
    now, deferred = count_light_steps(core)
    on_gpu = run(core, specs)
    assert sum(now) + sum(deferred) > 0
    draws = core.runner.draw_graphs
    assert draws is not None and draws.num_replays > 0, "no draw replayed a CUDA graph"
    monkeypatch.setattr(worker_core, "is_light", lambda req: False)
    general = run(make_core(tiny_llama, overlap=False), specs)
    differ = [rid for rid in general if general[rid][0] != on_gpu[rid][0]]
    assert len(differ) <= 2, f"seed {seed}: {differ}"
    for rid, (_ids, finish, _, _) in on_gpu.items():
        assert finish is not None and finish.kind != "abort", (seed, rid, finish)


@pytest.mark.timeout(30)
def test_a_fill_job_that_fails_before_entering_xgrammar_does_not_hang_the_hand_over() -> None:
    """The fill thread's job raising before it calls ready(): hand_over returns, and wait()
    raises the job's error (the step then fails its requests, never hangs)."""
    from pdserve.worker.grammar_mask import _on_fill_thread

    def broken(matcher, ready):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    job = _on_fill_thread(broken)  # hands over: returns only once the job let go
    with pytest.raises(RuntimeError, match="boom"):
        job.wait()
