"""Speculative decoding (worker/speculative/) on the tiny model (CPU): with NGRAM drafts the
outputs equal the plain loop's token for token (greedy, seeded sampling, stops, min_new_tokens,
logit bias, penalties, logprobs), more than one token per step is accepted where the model repeats
its prompt, preemption under a small pool leaves every page accounted for; sampling with
temperature keeps the target's distribution (a two-sample test against the plain loop), and the
general rejection rule reproduces p on a small vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.scheduler.request import Request
from pdserve.worker.speculative.ngram import ngram_draft
from pdserve.worker.speculative.verify import rejection_sample
from pdserve.worker.worker_core import WorkerCore

NGRAM = SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)


def make_core(
    model: Path, spec: SpeculativeConfig | None, num_pages: int = 256, decode=None
) -> WorkerCore:
    config = EngineConfig(
        model_path=str(model),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=num_pages, page_size=4, chunk_size=16),
        speculative=spec or SpeculativeConfig(),
    )
    return WorkerCore(config, decode=decode, overlap=False)


def run(core: WorkerCore, specs: list[dict]) -> dict[str, Request]:
    """Add each spec at its `arrive` step (0 by default), step until all are done."""
    reqs = {}
    pending = sorted(specs, key=lambda s: s.get("arrive", 0))
    steps = 0
    while pending or core.has_work():
        while pending and pending[0].get("arrive", 0) <= steps:
            s = pending.pop(0)
            req = Request(
                rid=s["rid"],
                prompt_ids=list(s["prompt"]),
                sampling=SamplingParams(**s["params"]),
                return_logprob=s.get("logprobs", False),
                top_logprobs_num=2 if s.get("logprobs") else 0,
            )
            core.add(req)
            reqs[req.rid] = req
        core.step()
        steps += 1
        assert steps < 3000, "the core never ran out of work"
    sched = core.scheduler
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.num_total
    assert sched.cache.num_locked_pages == 0
    return reqs


def repeating_prompt(rng: random.Random) -> list[int]:
    """Text that repeats: prompt lookup finds drafts, and a random model often copies it."""
    unit = [rng.randrange(5, 300) for _ in range(rng.randint(2, 6))]
    return unit * rng.randint(2, 5) + [rng.randrange(5, 300) for _ in range(rng.randint(0, 3))]


def random_specs(rng: random.Random, num: int) -> list[dict]:
    specs = []
    for i in range(num):
        base = {"max_new_tokens": rng.randint(1, 24), "ignore_eos": rng.random() < 0.8}
        kinds = ["greedy", "greedy", "seeded", "stop", "min", "bias", "penalty", "lp", "regex"]
        kind = rng.choice(kinds)
        params = {**base, "temperature": 0.0}
        if kind == "seeded":
            params = {**base, "temperature": 0.8, "top_k": 20, "seed": rng.randrange(2**31)}
        elif kind == "stop":
            params["stop_token_ids"] = [rng.randrange(5, 300)]
            params["stop"] = ["e"]
        elif kind == "min":
            params.update(ignore_eos=False, min_new_tokens=base["max_new_tokens"] // 2)
        elif kind == "bias":
            params["logit_bias"] = {rng.randrange(5, 300): 3.0}
        elif kind == "penalty":
            params.update(repetition_penalty=1.2, frequency_penalty=0.3)
        elif kind == "regex":  # a draft the grammar refuses is never accepted
            params["regex"] = rng.choice([r"(ab|cd|e )+x", r"[0-9]+(\.[0-9]{1,3})?", r"\w+ \w+"])
            if rng.random() < 0.5:
                params.update(temperature=1.0, seed=rng.randrange(2**31))
        prompt = repeating_prompt(rng) if rng.random() < 0.7 else [rng.randrange(5, 300)] * 3
        specs.append(
            {"rid": f"r{i}", "prompt": prompt, "params": params, "logprobs": kind == "lp",
             "arrive": rng.randint(0, 6)}  # later ones prefill beside running decodes
        )  # fmt: skip
    return specs


def test_ngram_draft_copies_what_followed_the_latest_longest_match() -> None:
    assert ngram_draft([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert ngram_draft([1, 2, 3, 1, 2, 9, 1, 2], 2) == [9, 1]  # the latest match wins
    assert ngram_draft([5, 2, 8, 1, 2, 9, 5, 2], 1) == [8]  # the longer suffix [5, 2] wins
    assert ngram_draft([5, 6, 7], 2) == []
    assert ngram_draft([1, 2, 3, 1, 2], 4, min_window=3) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_ngram_outputs_equal_the_plain_loop(tiny_llama: Path, seed: int) -> None:
    """Greedy, seeded, stops, min_new_tokens, logit bias, penalties, logprobs and regex rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    specs = random_specs(random.Random(seed), 12)
    plain = run(make_core(tiny_llama, None, decode=decode), specs)
    core = make_core(tiny_llama, NGRAM, decode=decode)
    spec = run(core, specs)
    for rid, a in plain.items():
        b = spec[rid]
        assert a.output_ids == b.output_ids, f"seed {seed}: {rid} {specs[int(rid[1:])]['params']}"
        assert a.finish == b.finish, rid
        assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-4), rid
        assert len(a.output_top_logprobs) == len(b.output_top_logprobs), rid
    stats = core.spec.stats
    assert stats.num_verify_steps > 0 and stats.num_drafts > 0
    assert sum(r.spec_verify_ct for r in spec.values()) == stats.num_row_steps


def make_context_free(core: WorkerCore) -> WorkerCore:
    """Zero every attention output: the next token becomes a function of the current one, so
    greedy decoding enters a cycle, which the model then reproduces for ever."""
    for layer in core.runner.model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
    return core


def test_ngram_accepts_more_than_one_token_per_step_on_repeated_text(tiny_llama: Path) -> None:
    """The prompt holds the model's own cycle; prompt lookup then predicts what it reproduces."""
    greedy = {"temperature": 0.0, "ignore_eos": True}
    warm = [{"rid": f"w{t}", "prompt": [t], "params": {**greedy, "max_new_tokens": 40}}
            for t in (11, 99, 250)]  # fmt: skip
    cycles = run(make_context_free(make_core(tiny_llama, None)), warm)
    specs = [
        {
            "rid": f"r{i}",
            "prompt": [w["prompt"][0], *cycles[w["rid"]].output_ids],
            "params": {**greedy, "max_new_tokens": 48},
        }  # fmt: skip
        for i, w in enumerate(warm)
    ]
    plain = run(make_context_free(make_core(tiny_llama, None)), specs)
    core = make_context_free(make_core(tiny_llama, NGRAM))
    spec = run(core, specs)
    assert all(plain[r].output_ids == spec[r].output_ids for r in plain)
    stats = core.spec.stats
    assert stats.accept_length > 3.0, stats  # up to 5: four drafts and the bonus token
    assert sum(r.spec_verify_ct for r in spec.values()) < 3 * 48 / 3


def test_ngram_with_preemption_on_a_small_pool_keeps_outputs_and_pages(tiny_llama: Path) -> None:
    rng = random.Random(5)
    specs = [
        {
            "rid": f"r{i}",
            "prompt": repeating_prompt(rng),
            "params": {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True},
        }  # fmt: skip
        for i in range(6)
    ]
    plain = run(make_core(tiny_llama, None, num_pages=24), specs)
    core = make_core(tiny_llama, NGRAM, num_pages=24)
    spec = run(core, specs)
    assert core.scheduler.num_preemptions > 0
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
    core.scheduler.allocator.check_integrity()


def test_ngram_sampling_keeps_the_target_distribution(tiny_llama: Path) -> None:
    """Unseeded temperature sampling on a two-way random walk (context-free model, top_k=2) whose
    prompt is an earlier walk, so drafts are often right and often wrong: the tokens at each
    output position, over many requests, are distributed as without speculation (chi-square)."""
    walk = {"temperature": 1.0, "top_k": 2, "ignore_eos": True}
    warm = [{"rid": "w", "prompt": [11], "params": {**walk, "max_new_tokens": 60, "seed": 1}}]
    prompt = [11, *run(make_context_free(make_core(tiny_llama, None)), warm)["w"].output_ids]
    specs = [
        {"rid": f"r{i}", "prompt": prompt, "params": {**walk, "max_new_tokens": 4}}
        for i in range(150)
    ]
    # A pool for every request at once: admission never waits on a chunked prefill.
    plain = run(make_context_free(make_core(tiny_llama, None, num_pages=5000)), specs)
    core = make_context_free(make_core(tiny_llama, NGRAM, num_pages=5000))
    spec = run(core, specs)
    stats = core.spec.stats
    assert stats.num_tokens - stats.num_row_steps > 30, stats  # drafts were accepted
    assert stats.num_tokens - stats.num_row_steps < stats.num_drafts / 2, stats  # and rejected
    for pos in range(1, 4):
        a = [r.output_ids[pos] for r in plain.values()]
        b = [r.output_ids[pos] for r in spec.values()]
        assert _two_sample_p_value(a, b) > 1e-3, (pos, sorted(a), sorted(b))


def _two_sample_p_value(a: list[int], b: list[int]) -> float:
    """Chi-square test of homogeneity of two samples of categories."""
    keys = sorted(set(a) | set(b))
    if len(keys) == 1:
        return 1.0
    table = torch.tensor(
        [[a.count(k) for k in keys], [b.count(k) for k in keys]], dtype=torch.float64
    )
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(keys) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def test_rejection_sample_reproduces_the_target_distribution() -> None:
    """Drafts drawn from q, verified against p: the kept tokens are distributed as p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    num = 40000
    drafts = torch.multinomial(q.expand(num, -1), 1, replacement=True, generator=gen).view(-1)
    verdict = rejection_sample(p.expand(num, -1), q.expand(num, -1), drafts, gen)
    freq = torch.bincount(verdict.token_ids, minlength=5).float() / num
    assert torch.allclose(freq, p, atol=0.01), freq
    # Acceptance rate is sum(min(p, q)) = 0.1 + 0.1 + 0.2 + 0.1 + 0 = 0.5.
    assert verdict.accepted.float().mean().item() == pytest.approx(0.5, abs=0.01)
    same = rejection_sample(p.expand(8, -1), p.expand(8, -1), torch.zeros(8, dtype=torch.long))
    assert same.accepted.all()


def test_speculative_config_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match="speculative_algorithm='MEDUSA'"):
        SpeculativeConfig(speculative_algorithm="MEDUSA")
    with pytest.raises(ValueError, match="speculative_num_draft_tokens"):
        SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_draft_tokens=1)
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        SpeculativeConfig(speculative_algorithm="EAGLE")
    with pytest.raises(ValueError, match="speculative_bogus"):
        SpeculativeConfig.from_options({"speculative_bogus": 1})
    cfg = EngineConfig.from_options(
        "m", speculative_algorithm="ngram", speculative_num_draft_tokens=3
    )
    assert cfg.speculative.speculative_algorithm == "NGRAM"
    assert cfg.speculative.num_drafts == 2
    with pytest.raises(ValueError, match="tp_size=2"):
        EngineConfig.from_options("m", speculative_algorithm="NGRAM", tp_size=2)


# ---------------------------------------------------------------------------------------- EAGLE


def eagle_config(head: Path, num_steps: int = 4) -> SpeculativeConfig:
    return SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(head),
        speculative_num_steps=num_steps,
        speculative_num_draft_tokens=num_steps + 1,
    )


@pytest.fixture(scope="module")
def random_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pdserve.tiny_model.eagle import build_tiny_eagle_head

    return build_tiny_eagle_head(tmp_path_factory.mktemp("eagle") / "head", seed=2)


def agreeing_head(core: WorkerCore, out: Path) -> Path:
    """A head for the context-free target (make_context_free plus zeroed MLP outputs, so the
    target's hidden state is norm(embed(t)) and its next token argmax lm_head(w * embed(t)),
    w the final norm's weight): fc takes w * embed(next token) and the layer adds nothing, so
    every draft is the target's own next token."""
    from safetensors.torch import save_file

    from pdserve.tiny_model.build import write_json
    from pdserve.tiny_model.eagle import eagle_head_config, eagle_head_shapes

    config = eagle_head_config()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    weights = {n: torch.randn(s) * 0.2 for n, s in eagle_head_shapes(config).items()}
    w = core.runner.model.model.norm.weight.detach().float()  # [H]
    hidden = w.numel()
    weights["fc.weight"] = torch.cat([torch.diag(w), torch.zeros(hidden, hidden)], dim=1)
    weights["fc.bias"] = torch.zeros(hidden)
    weights["layers.0.self_attn.o_proj.weight"].zero_()
    weights["layers.0.mlp.down_proj.weight"].zero_()
    save_file(weights, str(out / "model.safetensors"))
    return out


def make_bigram(core: WorkerCore) -> WorkerCore:
    """No layer adds anything: the next token is a function of the current one."""
    make_context_free(core)
    for layer in core.runner.model.model.layers:
        layer.mlp.down_proj.weight.zero_()
    return core


@pytest.mark.parametrize("seed", [0])
def test_eagle_outputs_equal_the_plain_loop(tiny_llama: Path, random_head: Path, seed: int) -> None:
    """A random head: drafts are mostly wrong, outputs are still the plain loop's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    specs = random_specs(random.Random(seed + 10), 10)
    plain = run(make_core(tiny_llama, None, decode=decode), specs)
    core = make_core(tiny_llama, eagle_config(random_head), decode=decode)
    spec = run(core, specs)
    for rid, a in plain.items():
        assert a.output_ids == spec[rid].output_ids, f"seed {seed}: {rid}"
        assert a.finish == spec[rid].finish, rid
        assert a.output_logprobs == pytest.approx(spec[rid].output_logprobs, abs=1e-4), rid
    assert core.spec.stats.num_verify_steps > 0 and core.spec.stats.num_drafts > 0


def test_eagle_with_an_agreeing_head_accepts_every_draft(tiny_llama: Path, tmp_path: Path) -> None:
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 33}
    rng = random.Random(4)
    specs = [
        {
            "rid": f"r{i}",
            "prompt": [rng.randrange(5, 300) for _ in range(rng.randint(1, 9))],
            "params": greedy,
        }  # fmt: skip
        for i in range(5)
    ]
    plain_core = make_bigram(make_core(tiny_llama, None))
    head = agreeing_head(plain_core, tmp_path / "head")
    plain = run(plain_core, specs)
    core = make_bigram(make_core(tiny_llama, eagle_config(head, num_steps=4)))
    spec = run(core, specs)
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
    stats = core.spec.stats
    assert stats.num_tokens == stats.num_row_steps + stats.num_drafts, stats  # all accepted
    assert stats.accept_length > 4.0, stats  # 5 per step but for the last, shorter ones
    # The first token comes from the prefill; 32 more in 7 steps of at most 5.
    assert all(r.spec_verify_ct == 7 for r in spec.values())


def test_eagle_with_preemption_keeps_outputs_and_pages(tiny_llama: Path, random_head: Path) -> None:
    rng = random.Random(6)
    specs = [
        {
            "rid": f"r{i}",
            "prompt": repeating_prompt(rng),
            "params": {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True},
        }  # fmt: skip
        for i in range(6)
    ]
    plain = run(make_core(tiny_llama, None, num_pages=24), specs)
    core = make_core(tiny_llama, eagle_config(random_head), num_pages=24)
    spec = run(core, specs)
    assert core.scheduler.num_preemptions > 0
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
    core.scheduler.allocator.check_integrity()


def test_topology_speculative_section_per_worker(tiny_llama: Path) -> None:
    from pdserve.config.topology import Topology

    topo = Topology.from_dict(
        {"model": str(tiny_llama), "prefill": [{}],
         "decode": [{"speculative": {"algorithm": "ngram", "num_draft_tokens": 3}}, {}]}
    )  # fmt: skip
    specs = {w.name: topo.engine_config(w).speculative for w in topo.workers()}
    assert specs["decode0"].speculative_algorithm == "NGRAM"
    assert specs["decode0"].speculative_num_draft_tokens == 3
    assert not specs["decode1"].enabled and not specs["prefill0"].enabled
    flat = Topology.for_model(str(tiny_llama), mode="pd", speculative_algorithm="NGRAM")
    assert [w.speculative.enabled for w in flat.workers()] == [False, True]
    with pytest.raises(ValueError, match=r"decode\[0\]\.speculative: unknown .*speculative_bogus"):
        Topology.from_dict({"model": str(tiny_llama), "decode": [{"speculative": {"bogus": 1}}]})
    with pytest.raises(ValueError, match=r"prefill\[0\]\.speculative"):
        Topology.from_dict(
            {"model": str(tiny_llama), "prefill": [{"speculative": {"algorithm": "NGRAM"}}],
             "decode": [{}]}
        )  # fmt: skip


# ------------------------------------------------------------------------------------ EAGLE trees


class OracleTreeDrafter:
    """Trees with the target's own next tokens on the second branch, wrong tokens elsewhere:
    the accepted path skips nodes, so its KV has to move (spec_step._compact_tree_kv)."""

    needs_hidden = False

    def __init__(self, truth: dict[str, list[int]], vocab: int) -> None:
        self.truth = truth
        self.vocab = vocab
        self.trees = 0

    def has_state(self, req: Request) -> bool:
        return True

    def draft_tree(self, reqs, budgets, depths, topk):  # type: ignore[no-untyped-def]
        from pdserve.worker.speculative.draft_tree import DraftTree

        trees = []
        for req, budget, depth in zip(reqs, budgets, depths):
            t = self.truth[req.rid][len(req.output_ids) :] + [0, 0, 0]
            w = [(x + 1) % self.vocab for x in t]
            # depth 1: wrong, right; depth 2: under wrong, wrong and right under right; 3: right
            tree = DraftTree([w[0], t[0], t[1], w[1], t[1], t[2]], [0, 0, 1, 2, 2, 5])
            if budget < 6 or depth < 3:
                tree = DraftTree([], [])
            trees.append(tree)
            self.trees += budget >= 6 and depth >= 3
        return trees

    def after_verify(self, rows, paths, hidden) -> None:  # type: ignore[no-untyped-def]
        assert all(path == [0, 2, 5, 6][: len(path)] for path in paths), paths

    def observe(self, items, hidden, row_starts) -> None:  # type: ignore[no-untyped-def]
        pass


def test_tree_verify_accepts_a_side_branch_and_moves_its_kv(tiny_llama: Path) -> None:
    from pdserve.worker.speculative.spec_step import SpeculativeDecoder

    rng = random.Random(8)
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 20}
    specs = [
        {
            "rid": f"r{i}",
            "prompt": [rng.randrange(5, 300) for _ in range(rng.randint(3, 11))],
            "params": greedy,
        }  # fmt: skip
        for i in range(3)
    ]
    plain = run(make_core(tiny_llama, None), specs)
    core = make_core(tiny_llama, None)
    cfg = SpeculativeConfig(
        speculative_algorithm="NGRAM", speculative_eagle_topk=2, speculative_num_steps=3,
        speculative_num_draft_tokens=7,
    )  # fmt: skip
    drafter = OracleTreeDrafter({r: plain[r].output_ids for r in plain}, 512)
    core.spec = SpeculativeDecoder(
        cfg, core.runner, core.scheduler, core._sampling_row, core.max_context_len, drafter
    )
    spec = run(core, specs)
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
    assert drafter.trees > 0
    stats = core.spec.stats  # every tree's three right drafts were accepted
    assert stats.num_tokens - stats.num_row_steps == 3 * drafter.trees, stats


def test_tree_attention_matches_causal_attention_along_each_path() -> None:
    """Each node of a tree sees what the sequence prefix + its path would see causally."""
    from pdserve.kernels.attention_ref import extend_attention_ref, store_kv
    from pdserve.kernels.tree_attention_ref import tree_extend_attention_ref
    from pdserve.worker.speculative.draft_tree import DraftTree

    torch.manual_seed(0)
    tree = DraftTree([1, 2, 3, 4, 5], [0, 0, 1, 1, 3])  # node 5 under 3 under 1
    prefix, page, heads, kv_heads, dim = 6, 4, 4, 2, 8
    n = tree.num_nodes
    k_cache = torch.zeros(16, page, kv_heads, dim)
    v_cache = torch.zeros(16, page, kv_heads, dim)
    k_all = torch.randn(prefix + n, kv_heads, dim)
    v_all = torch.randn(prefix + n, kv_heads, dim)
    q = torch.randn(n, heads, dim)
    table = torch.arange(1, 5, dtype=torch.int32)[None]  # pages 1..4
    store_kv(k_cache, v_cache, torch.arange(page, page + prefix + n), k_all, v_all)
    out = tree_extend_attention_ref(
        q, k_cache, v_cache, table, [prefix + n], [n], [prefix], tree.ancestor_mask(), 0.5
    )
    for node in range(n):
        path = [node]
        while path[-1]:
            path.append(tree.parents[path[-1] - 1])
        path = path[::-1]  # root .. node
        rows = list(range(prefix)) + [prefix + p for p in path]
        kc = torch.zeros_like(k_cache)
        vc = torch.zeros_like(v_cache)
        store_kv(kc, vc, torch.arange(page, page + len(rows)), k_all[rows], v_all[rows])
        ref = extend_attention_ref(q[path], kc, vc, table, [len(rows)], [len(path)], 0.5)
        assert torch.allclose(out[node], ref[-1], atol=1e-5), node


def test_eagle_tree_outputs_equal_the_plain_loop(tiny_llama: Path, random_head: Path) -> None:
    cfg = SpeculativeConfig(
        speculative_algorithm="EAGLE", speculative_draft_model_path=str(random_head),
        speculative_num_steps=3, speculative_eagle_topk=3, speculative_num_draft_tokens=6,
    )  # fmt: skip
    specs = random_specs(random.Random(21), 8)
    plain = run(make_core(tiny_llama, None), specs)
    core = make_core(tiny_llama, cfg)
    spec = run(core, specs)
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
        assert plain[rid].finish == spec[rid].finish, rid
    assert core.spec.stats.num_drafts > 0


def test_eagle_tree_with_an_agreeing_head_accepts_a_full_path(
    tiny_llama: Path, tmp_path: Path
) -> None:
    greedy = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 25}
    specs = [{"rid": f"r{i}", "prompt": [11 + 40 * i, 7], "params": greedy} for i in range(3)]
    plain_core = make_bigram(make_core(tiny_llama, None))
    head = agreeing_head(plain_core, tmp_path / "head")
    plain = run(plain_core, specs)
    cfg = SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(head),
        speculative_num_steps=3,
        speculative_eagle_topk=2,
        speculative_num_draft_tokens=11,  # 10 nodes keep every candidate (2 + 4 + 4)
    )
    core = make_bigram(make_core(tiny_llama, cfg))
    spec = run(core, specs)
    for rid in plain:
        assert plain[rid].output_ids == spec[rid].output_ids, rid
    # The head's likeliest path is the target's: up to 3 drafts and its token per step.
    assert core.spec.stats.accept_length > 3.0, core.spec.stats


def test_eagle_decode_worker_starts_from_the_prefills_hidden_states(
    tiny_llama: Path, random_head: Path
) -> None:
    """Prefill on one core, KV and the prompt's last hidden states handed to an EAGLE core (as
    PrefillTask.spec_hidden_rows / KVReady.spec_hidden do): the head's state equals a mixed
    worker's that computed the prompt itself, so the first decode step can speculate."""
    from pdserve.protocol import KVReady
    from pdserve.worker.speculative.prompt_hidden import PROMPT_HIDDEN_ROWS, PromptHiddenCapture

    prompt = [5, 9, 33, 2, 71, 80, 80, 13, 140, 9, 33]
    assert len(prompt) <= PROMPT_HIDDEN_ROWS  # every position's head KV is rebuilt
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    prefill = make_core(tiny_llama, None)
    src = Request(rid="p", prompt_ids=list(prompt), sampling=params, prefill_only=True)
    PromptHiddenCapture.for_request(src, PROMPT_HIDDEN_ROWS)
    prefill.add(src)
    while not src.output_ids:
        prefill.step()
    raw, shape, dtype = src.spec_state.encode()
    assert shape == [len(prompt), 64] and raw
    ready = KVReady("d", src.output_ids[0], 0, spec_hidden=raw, spec_hidden_shape=shape,
                    spec_hidden_dtype=dtype)  # fmt: skip

    decode = make_core(tiny_llama, eagle_config(random_head))
    dst = Request(rid="d", prompt_ids=list(prompt), sampling=params)
    pages = decode.scheduler.reserve_for_transfer(dst, 0)
    src_pool, dst_pool = prefill.runner.kv_pool.buffer, decode.runner.kv_pool.buffer
    dst_pool[:, :, pages] = src_pool[:, :, src.page_ids[: len(pages)]]
    decode.scheduler.commit_transferred(dst, ready)
    decode.spec.bootstrap(dst, ready)
    assert decode.spec.can_speculate(dst)

    mixed = make_core(tiny_llama, eagle_config(random_head))
    ref = Request(rid="m", prompt_ids=list(prompt), sampling=params)
    mixed.add(ref)
    while not ref.output_ids:
        mixed.step()
    assert ref.output_ids[0] == dst.output_ids[0]
    assert dst.spec_state.num_valid == ref.spec_state.num_valid == len(prompt)
    assert torch.allclose(dst.spec_state.feature, ref.spec_state.feature, atol=1e-5)
    while decode.has_work():
        decode.step()
    while mixed.has_work():
        mixed.step()
    assert dst.output_ids == ref.output_ids
    assert dst.spec_verify_ct == ref.spec_verify_ct  # the first decode step speculated too


def test_tiny_model_eagle_cli_writes_a_head_the_worker_loads(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from pdserve.entrypoints.cli import main
    from pdserve.worker.speculative.eagle_head import eagle_model_config

    out = tmp_path / "head"
    assert main(["tiny-model", str(out), "--eagle", "--seed", "5"]) == 0
    assert eagle_model_config(out).num_layers == 1
    core = make_core(tiny_llama, eagle_config(out))  # loads every tensor, or says which is missing
    fc = core.spec.drafter.head.fc.weight
    assert fc.shape == (64, 128) and fc.abs().sum() > 0
    (out / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        make_core(tiny_llama, eagle_config(out))


def test_launch_flags_with_sglangs_names_reach_the_decode_worker(tiny_llama: Path) -> None:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.cli import build_parser
    from pdserve.entrypoints.launch_cli import _overrides

    argv = ["launch", "--model", str(tiny_llama), "--speculative-algorithm", "ngram",
            "--speculative-num-draft-tokens", "6", "--device", "cpu"]  # fmt: skip
    args = build_parser().parse_args(argv)
    topo = Topology.for_model(args.model, **_overrides(args))
    prefill, decode = topo.workers()
    assert not topo.engine_config(prefill).speculative.enabled
    spec = topo.engine_config(decode).speculative
    assert (spec.speculative_algorithm, spec.speculative_num_draft_tokens) == ("NGRAM", 6)
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        build_parser().parse_args([*argv[:3], "--speculative-algorithm", "medusa"])


def test_eagle_tree_sampling_keeps_the_target_distribution(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A two-way random walk (bigram target, top_k=2) drafted by a head whose tree holds both
    successors at each level: draws follow first and second children alike, and the tokens at
    each position are distributed as without speculation (chi-square)."""
    walk = {"temperature": 1.0, "top_k": 2, "ignore_eos": True, "max_new_tokens": 5}
    specs = [{"rid": f"r{i}", "prompt": [11, 7], "params": walk} for i in range(150)]
    plain_core = make_bigram(make_core(tiny_llama, None, num_pages=2000))
    head = agreeing_head(plain_core, tmp_path / "head")
    plain = run(plain_core, specs)
    cfg = SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(head),
        speculative_num_steps=3,
        speculative_eagle_topk=2,
        speculative_num_draft_tokens=11,
    )
    core = make_bigram(make_core(tiny_llama, cfg, num_pages=2000))
    spec = run(core, specs)
    stats = core.spec.stats
    assert stats.accept_length > 3.0, stats  # the walk's successors are in the tree
    for pos in range(1, 5):
        a = [r.output_ids[pos] for r in plain.values()]
        b = [r.output_ids[pos] for r in spec.values()]
        assert _two_sample_p_value(a, b) > 1e-3, (pos, sorted(a), sorted(b))
