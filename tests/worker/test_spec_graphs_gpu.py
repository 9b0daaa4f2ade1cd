"""The chain verify pass's CUDA graphs on a GPU (speculative/spec_step.py, cuda_graph_runner.py
with tokens_per_row = 1 + k): a replay's hidden states at the real tokens equal the eager verify
pass's, and it writes KV only at their slots and page 0; the EAGLE head's drafting replayed from
its graphs (eagle_chain.py) gives the eager chain's drafts; greedy outputs with speculation (NGRAM
and EAGLE chains) and the graphs equal the plain loop's, with the graph paths taken. Lines
starting with RESULT summarise the numbers. The same behaviour on CPU, without capture:
test_spec_graphs.py."""

from __future__ import annotations

import gc
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from test_spec_graphs import context_free, run  # this folder: on sys.path under pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.tiny_model import build_tiny_model
from pdserve.worker.speculative.verify_batch import build_extend_batch, build_padded_chain_batch
from pdserve.worker.worker_core import WorkerCore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA GPU and triton",
    ),
]

PAGE_SIZE = 16
NUM_DRAFTS = 4
GRAPH_MAX_BATCH = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pdserve.tiny_model.eagle import build_tiny_eagle_head

    root = tmp_path_factory.mktemp("spec_graph_models")
    return {
        "llama": build_tiny_model(root / "llama", arch="llama", seed=1),
        "qwen3": build_tiny_model(root / "qwen3", arch="qwen3", seed=1),
        "head": build_tiny_eagle_head(root / "head", seed=2),
    }


def ngram() -> SpeculativeConfig:
    return SpeculativeConfig(
        speculative_algorithm="NGRAM", speculative_num_draft_tokens=NUM_DRAFTS + 1
    )


def eagle(head: Path) -> SpeculativeConfig:
    return SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(head),
        speculative_num_steps=NUM_DRAFTS,
        speculative_num_draft_tokens=NUM_DRAFTS + 1,
    )


def make_core(model: Path, spec: SpeculativeConfig | None, dtype: str = "float32") -> WorkerCore:
    config = EngineConfig(
        model_path=str(model),
        device="cuda",
        dtype=dtype,
        attention_backend="triton",
        cuda_graph=True,
        cuda_graph_max_batch=GRAPH_MAX_BATCH,
        scheduler=SchedulerConfig(num_pages=2048, page_size=PAGE_SIZE, chunk_size=64),
        speculative=spec or SpeculativeConfig(),
    )
    return WorkerCore(config, overlap=False)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- a replay against the eager pass -------------------------------------------------------------


def random_entries(
    rng: random.Random, num_rows: int, num_pages: int
) -> list[tuple[list[int], int, list[int]]]:
    """Rows at random starts over disjoint scattered pages (never page 0), 1..1 + k tokens each."""
    free = list(range(1, num_pages))
    rng.shuffle(free)
    entries = []
    for _ in range(num_rows):
        num = rng.randint(1, NUM_DRAFTS + 1)
        start = rng.randint(0, 700)
        pages = [free.pop() for _ in range(-(-(start + num) // PAGE_SIZE))]
        entries.append((pages, start, [rng.randrange(3, 300) for _ in range(num)]))
    return entries


@pytest.mark.parametrize(("model", "dtype"), [("llama", "float32"), ("qwen3", "bfloat16")])
def test_verify_replay_equals_the_eager_pass_and_writes_only_real_slots(
    model_dirs: dict[str, Path], model: str, dtype: str
) -> None:
    core = make_core(model_dirs[model], ngram(), dtype)
    graphs = core.spec.verify_graphs
    assert graphs is not None and graphs.batch_sizes[-1] == GRAPH_MAX_BATCH
    assert graphs.tokens_per_row == NUM_DRAFTS + 1
    runner = core.runner
    pool = runner.kv_pool.buffer
    pool.normal_()
    before = pool.clone()
    rng = random.Random(0)
    tol = 1e-4 if dtype == "float32" else 2e-2  # relative to the largest hidden value
    kv_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 2e-2, "atol": 5e-2}
    worst = 0.0
    with torch.inference_mode():
        for num_rows in (16, 3, 1, 9, 2):  # smaller after larger: stale rows must be padding
            entries = random_entries(rng, num_rows, runner.num_pages)
            pool.copy_(before)
            fb = build_extend_batch(entries, PAGE_SIZE, runner.device)
            want = runner.model.forward_hidden(fb, runner.kv_pool, all_rows=True)  # [T, H]
            want_pool = pool.clone()
            pool.copy_(before)
            padded = build_padded_chain_batch(entries, graphs.tokens_per_row, PAGE_SIZE)
            assert graphs.can_run(padded.batch)
            got = graphs.replay(padded.batch)[torch.tensor(padded.real_rows, device="cuda")]
            err = (got.float() - want.float()).abs().max().item()
            worst = max(worst, err / max(want.float().abs().max().item(), 1e-6))
            real = fb.slots  # [T]
            flat_now = pool.view(*pool.shape[:2], -1, *pool.shape[4:])  # [L, 2, slots, H, D]
            flat_want = want_pool.view(*flat_now.shape)
            flat_before = before.view(*flat_now.shape)
            torch.testing.assert_close(flat_now[:, :, real], flat_want[:, :, real], **kv_tol)
            changed = (flat_now != flat_before).flatten(3).any(-1).any(0).any(0)  # [slots]
            changed[real] = False
            changed[:PAGE_SIZE] = False  # page 0
            assert not changed.any(), changed.nonzero().view(-1)[:20].tolist()
    print(f"RESULT verify replay vs eager {model} {dtype}: max rel err {worst:.2e}")
    assert worst <= tol
    assert graphs.num_replays == 5
    del core, graphs
    free_gpu()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_draft_replay_equals_the_eager_chain(model_dirs: dict[str, Path], dtype: str) -> None:
    from pdserve.worker.speculative.eagle_chain import page_table_of

    core = make_core(model_dirs["llama"], eagle(model_dirs["head"]), dtype)
    drafter = core.spec.drafter
    graphs = drafter.graphs
    assert graphs is not None and graphs.batch_sizes[-1] == GRAPH_MAX_BATCH
    pool = drafter.pool.buffer
    pool.normal_()
    before = pool.clone()
    rng = random.Random(3)
    hidden = drafter.head.config.hidden_size
    agree = total = 0
    with torch.inference_mode():
        for num_rows in (16, 5, 1, 11):
            free = list(range(1, 2048))
            rng.shuffle(free)
            starts = [rng.randint(1, 700) for _ in range(num_rows)]
            wanted = [rng.randint(1, NUM_DRAFTS) for _ in range(num_rows)]
            pages = [[free.pop() for _ in range(-(-(s + n) // PAGE_SIZE))]
                     for s, n in zip(starts, wanted)]  # fmt: skip
            feature = torch.randn(num_rows, hidden, device="cuda").to(pool.dtype)
            pool.copy_(before)
            eager = drafter.chain(
                feature, torch.tensor(starts, device="cuda"), torch.tensor(wanted, device="cuda"),
                page_table_of(pages, max(map(len, pages))).cuda(), NUM_DRAFTS,
                max(starts) + NUM_DRAFTS,
            ).tolist()  # fmt: skip
            pool.copy_(before)
            replayed = graphs.replay(feature, starts, wanted, pages).tolist()
            for e, r, n in zip(eager, replayed, wanted):
                agree += e[:n] == r[:n]
                total += 1
    print(f"RESULT draft replay vs eager chain {dtype}: {agree}/{total} rows' drafts equal")
    if dtype == "float32":
        assert agree == total
    else:  # a near-tie in the head's argmax may break differently in other kernel shapes
        assert agree >= 0.9 * total
    assert graphs.num_replays == 4
    del core, drafter, graphs
    free_gpu()


# --- greedy generation ---------------------------------------------------------------------------


def generate(
    core: WorkerCore, prompts: list[list[int]], max_new_tokens: int = 32, late: int = 1
) -> list[list[int]]:
    """Greedy outputs (test_spec_graphs.run); the first `late` prompts arrive after three steps
    (prefill chunks riding along in verify passes: those of more than 1 + k tokens run eagerly)."""
    return run(core, prompts, max_new_tokens, late)


def prompts_for(core: WorkerCore, num: int, repeat: bool) -> list[list[int]]:
    rng = random.Random(7)
    if not repeat:
        return [[rng.randrange(3, 300) for _ in range(rng.randint(1, 40))] for _ in range(num)]
    starts = [[rng.randrange(3, 300)] for _ in range(num)]  # then the model's own cycle
    return [s + out for s, out in zip(starts, generate(core, starts, 24, late=0))]


@pytest.mark.parametrize(
    ("algorithm", "repeat"), [("NGRAM", True), ("NGRAM", False), ("EAGLE", False)]
)
def test_greedy_outputs_with_verify_graphs_equal_plain_decoding(
    model_dirs: dict[str, Path], algorithm: str, repeat: bool
) -> None:
    path = model_dirs["llama"]
    spec = ngram() if algorithm == "NGRAM" else eagle(model_dirs["head"])
    plain_core = make_core(path, None)
    if repeat:
        context_free(plain_core)
    prompts = prompts_for(plain_core, 12, repeat)
    prompts.insert(0, list(range(5, 75)))  # arrives late, prefilled in chunks of 64
    plain = generate(plain_core, prompts)
    assert plain_core.runner.graph_runner.num_replays > 0  # plain decoding replays its graphs
    del plain_core
    free_gpu()
    core = make_core(path, spec)
    if repeat:
        context_free(core)
    outs = generate(core, prompts)
    stats, graphs = core.spec.stats, core.spec.verify_graphs
    same = sum(a == b for a, b in zip(outs, plain))
    drafter = core.spec.drafter
    draft_replays = drafter.graphs.num_replays if drafter is not None else "-"
    print(
        f"RESULT greedy {algorithm} repeat={repeat}: {same}/{len(plain)} equal the plain loop; "
        f"{stats.num_graph_steps}/{stats.num_verify_steps} verify passes replayed; accepted "
        f"{stats.accept_length:.2f} tokens per row; draft graph replays {draft_replays}"
    )
    assert outs == plain
    assert graphs.num_replays == stats.num_graph_steps > stats.num_verify_steps // 2
    if drafter is not None:
        assert drafter.graphs is not None and drafter.graphs.num_replays > 0
    if repeat:
        assert stats.accept_length > 2.0, stats
    del core, graphs
    free_gpu()
