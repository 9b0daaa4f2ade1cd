"""The overlapped loop (worker_core.py) against the plain loop on the tiny model (CPU): the same
requests give the same tokens, logprobs and finishes, token for token, whatever mix of sampling
parameters, chunked prefills, prefix reuse, preemption and arrivals mid-run; every page comes
back. Prompts and parameters are fresh random draws (the seed is in the failure message)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.worker.inflight import PendingLength
from pdserve.worker.worker_core import WorkerCore


def make_core(model: Path, overlap: bool, num_pages: int = 256) -> WorkerCore:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = EngineConfig(
        model_path=str(model),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=num_pages, page_size=4, chunk_size=8),
    )
    core = WorkerCore(config, decode=lambda ids: tokenizer.decode(ids), overlap=overlap)
    assert core.overlap is overlap
    return core


def random_params(rng: random.Random, kind: str) -> dict:
    base = {"max_new_tokens": rng.randint(1, 12), "ignore_eos": rng.random() < 0.7}
    if kind == "greedy":
        return {**base, "temperature": 0.0}
    if kind == "seeded":
        return {
            **base,
            "temperature": rng.choice([0.7, 1.0, 1.3]),
            "top_k": rng.choice([-1, 5, 40]),
            "top_p": rng.choice([1.0, 0.9]),
            "min_p": rng.choice([0.0, 0.05]),
            "seed": rng.randrange(2**31),
        }
    if kind == "min_tokens":
        return {**base, "temperature": 0.0, "min_new_tokens": base["max_new_tokens"] // 2}
    if kind == "stop":  # stop token ids and stop strings end some requests early
        return {**base, "temperature": 0.0, "stop_token_ids": [rng.randrange(5, 60)], "stop": ["e"]}
    if kind == "bias":
        return {**base, "temperature": 0.0, "logit_bias": {rng.randrange(5, 60): 4.0}}
    # Penalties and grammars read earlier tokens on the host: the step samples after the running
    # step's tokens are recorded, still overlapped with its own forward pass.
    if kind == "penalty":
        return {**base, "temperature": 0.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5}
    if kind == "regex":  # some end when the grammar completes, some run to max_new_tokens
        regex = rng.choice([r"[a-e]{1,6}", r"(ab|cd|e )+x", r"[0-9]+(\.[0-9]{1,3})?", r"\w+ \w+"])
        sampled = {"temperature": 1.0, "seed": rng.randrange(2**31)} if rng.random() < 0.5 else {}
        return {**base, "temperature": 0.0, "regex": regex, **sampled}
    raise AssertionError(kind)


KINDS = ("greedy", "seeded", "min_tokens", "stop", "bias", "penalty", "regex")


OVERLAPPABLE = KINDS  # every kind; rows asking for logprobs run unoverlapped


def random_requests(
    rng: random.Random, num: int, kinds: tuple[str, ...], logprobs: float = 0.0
) -> list[dict]:
    shared = [rng.randrange(5, 200) for _ in range(rng.randint(4, 12))]  # prefix reuse
    specs = []
    for i in range(num):
        own = [rng.randrange(5, 200) for _ in range(rng.randint(1, 20))]
        prompt = (shared + own) if rng.random() < 0.5 else own
        specs.append(
            {
                "rid": f"r{i}",
                "prompt": prompt,
                "params": random_params(rng, rng.choice(kinds)),
                "logprobs": rng.random() < logprobs,  # those steps run unoverlapped
                "arrive": rng.randint(0, 6),  # the step before which it is added
            }
        )
    return specs


def count_plain_steps(core: WorkerCore) -> list[int]:
    """A list that gets an entry for each step the core runs unoverlapped."""
    calls: list[int] = []
    run_plain = core._run

    def counting(batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch.items))
        return run_plain(batch)

    core._run = counting  # type: ignore[method-assign]
    return calls


def run(core: WorkerCore, specs: list[dict]) -> dict[str, tuple]:
    reqs = {}
    reported: dict[str, tuple] = {}  # rid -> (output ids, finish) when step() first reported it
    pending = sorted(specs, key=lambda s: s["arrive"])
    step = 0
    while pending or core.has_work():
        while pending and pending[0]["arrive"] <= step:
            s = pending.pop(0)
            req = Request(
                rid=s["rid"],
                prompt_ids=list(s["prompt"]),
                sampling=SamplingParams(**s["params"]),
                return_logprob=s["logprobs"],
                top_logprobs_num=2 if s["logprobs"] else 0,
            )
            core.add(req)
            reqs[req.rid] = req
        for req in core.step():  # what an owner streams: the finish as first reported
            if req.finish is not None and req.rid not in reported:
                reported[req.rid] = (list(req.output_ids), req.finish)
        step += 1
        assert step < 2000, "the core never ran out of work"
    sched = core.scheduler
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.num_total
    assert sched.cache.num_locked_pages == 0
    for rid, r in reqs.items():
        assert reported.get(rid) == (r.output_ids, r.finish), f"{rid}: reported {reported.get(rid)}"
    return {
        rid: (r.output_ids, r.finish, r.output_logprobs, r.output_top_logprobs)
        for rid, r in reqs.items()
    }


def assert_same(plain: dict[str, tuple], overlapped: dict[str, tuple], seed: int) -> None:
    assert plain.keys() == overlapped.keys()
    for rid in plain:
        ids_a, finish_a, lp_a, top_a = plain[rid]
        ids_b, finish_b, lp_b, top_b = overlapped[rid]
        assert ids_a == ids_b, f"seed {seed}: {rid} tokens differ"
        assert finish_a == finish_b, f"seed {seed}: {rid} finish differs"
        assert lp_a == pytest.approx(lp_b, abs=1e-4), f"seed {seed}: {rid} logprobs differ"
        assert len(top_a) == len(top_b), f"seed {seed}: {rid} top logprobs differ"


@pytest.mark.parametrize(
    ("kinds", "logprobs"),
    [(OVERLAPPABLE, 0.0), (OVERLAPPABLE, 0.0), (KINDS, 0.1)],
    ids=["overlappable", "overlappable-again", "with-unoverlapped-steps"],
)
def test_the_overlapped_loop_gives_the_plain_loops_tokens(
    tiny_llama: Path, kinds: tuple[str, ...], logprobs: float
) -> None:
    seed = random.randrange(2**32)
    specs = random_requests(random.Random(seed), 24, kinds, logprobs)
    if logprobs:  # the first steps hold no logprob row, whatever the draw: some run overlapped
        specs[0].update(logprobs=False, arrive=0)
        for spec in specs[1:]:
            if spec["logprobs"]:
                spec["arrive"] = max(spec["arrive"], 2)
    plain = run(make_core(tiny_llama, overlap=False), specs)
    core = make_core(tiny_llama, overlap=True)
    plain_steps = count_plain_steps(core)
    overlapped = run(core, specs)
    assert_same(plain, overlapped, seed)
    assert core.num_overlapped_steps > 0, f"seed {seed}: no step ran overlapped"
    if logprobs == 0.0:
        assert plain_steps == [], "every step could have run overlapped"


def test_the_overlapped_loop_gives_the_same_tokens_through_preemption(tiny_llama: Path) -> None:
    """A pool of 24 pages of 4 tokens for 12 requests of up to 40 tokens: requests are preempted
    and recomputed, some while their next token is being sampled."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    specs = random_requests(rng, 12, ("greedy", "seeded"))
    for s in specs:
        s["params"].update(max_new_tokens=rng.randint(12, 20), ignore_eos=True)
        s["prompt"] = s["prompt"][:20]
        s["logprobs"] = False
        s["arrive"] = 0
    plain_core = make_core(tiny_llama, overlap=False, num_pages=24)
    plain = run(plain_core, specs)
    overlapped_core = make_core(tiny_llama, overlap=True, num_pages=24)
    plain_steps = count_plain_steps(overlapped_core)
    overlapped = run(overlapped_core, specs)
    assert overlapped_core.scheduler.num_preemptions > 0, "the pool was not small enough"
    assert plain_steps == [] and overlapped_core.num_overlapped_steps > 0
    assert_same(plain, overlapped, seed)


def test_an_abort_while_a_token_is_in_flight_frees_everything(tiny_llama: Path) -> None:
    core = make_core(tiny_llama, overlap=True)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    keep = Request(rid="keep", prompt_ids=[5, 6, 7, 8, 9], sampling=params)
    gone = Request(rid="gone", prompt_ids=[9, 8, 7, 6, 5], sampling=params)
    core.add(keep)
    core.add(gone)
    for _ in range(4):
        core.step()
    assert gone.num_inflight == 1  # its next token is being sampled
    core.abort("gone")
    results = run(core, [])
    assert results == {}
    assert keep.finish is not None and len(keep.output_ids) == 30
    alone = make_core(tiny_llama, overlap=False)
    ref = Request(rid="ref", prompt_ids=[5, 6, 7, 8, 9], sampling=params)
    alone.add(ref)
    run(alone, [])
    assert keep.output_ids == ref.output_ids


def test_output_ids_still_being_sampled_have_a_length_but_no_values() -> None:
    ids = PendingLength([3, 4], 1)
    assert len(ids) == 3 and ids[0] == 3 and ids[1] == 4 and ids[-2] == 4
    for index in (2, -1):
        with pytest.raises(LookupError):
            ids[index]
    with pytest.raises(LookupError):
        list(ids)
