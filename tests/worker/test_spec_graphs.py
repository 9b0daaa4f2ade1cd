"""The chain verify pass's CUDA graphs (cuda_graph_runner.py with tokens_per_row = 1 + k, wired in
speculative/spec_step.py) on CPU, where nothing can be captured: the padded batch's layout, and the
model run eagerly on the graphs' static buffers (the very ForwardBatch a graph is captured on)
giving the unpadded eager pass's hidden states and logits at the real tokens while writing KV
only at the real tokens' slots and page 0; then whole runs with a stand-in runner that replays
by running the model eagerly on those buffers: outputs equal the plain loop and the graph path
is taken. The Triton backend, which reads none of the batch's host lists, runs the same check
under Triton's interpreter. The EAGLE head's drafting on the device (eagle_chain.py), directly and
on its graphs' static buffers, gives the step-by-step loop's drafts and head KV. Capture and replay
on a GPU: test_spec_graphs_gpu.py."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.scheduler.request import Request
from pdserve.worker.cuda_graph_runner import (
    CudaGraphRunner,
    GraphInputs,
    capture_batch_sizes,
    num_table_pages,
    padded_batch_size,
)
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.speculative.eagle_chain import DraftGraphs
from pdserve.worker.speculative.eagle_drafter import EagleDrafter, EagleState
from pdserve.worker.speculative.verify_batch import (
    build_extend_batch,
    build_padded_chain_batch,
    slot_of,
)
from pdserve.worker.worker_core import WorkerCore

PAGE_SIZE = 4
NUM_DRAFTS = 4
ROW = NUM_DRAFTS + 1  # tokens a row in the verify graphs


def make_core(model: Path, spec: SpeculativeConfig | None) -> WorkerCore:
    config = EngineConfig(
        model_path=str(model),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=256, page_size=PAGE_SIZE, chunk_size=16),
        speculative=spec or SpeculativeConfig(),
    )
    return WorkerCore(config, overlap=False)


# --------------------------------------------------------------------------- the padded layout


def test_padded_chain_batch_pads_each_row_after_its_real_tokens_into_page_0() -> None:
    entries = [
        ([3, 7], 5, [11, 12, 13]),  # a decode and two drafts at positions 5, 6, 7
        ([9], 2, [21]),  # a decode without drafts
        ([4, 6, 8], 6, [31, 32, 33, 34]),  # a full row: crosses from page 6 into page 8
    ]
    padded = build_padded_chain_batch(entries, tokens_per_row=4, page_size=PAGE_SIZE)
    fb = padded.batch
    assert fb.input_ids.tolist() == [11, 12, 13, 0, 21, 0, 0, 0, 31, 32, 33, 34]
    assert fb.positions.tolist() == [5, 6, 7, 0, 2, 0, 0, 0, 6, 7, 8, 9]
    assert fb.slots.tolist() == [29, 30, 31, 0, 38, 0, 0, 0, 26, 27, 32, 33]
    assert fb.seq_lens.tolist() == fb.seq_lens_cpu == [9, 6, 10]
    assert fb.extend_lens.tolist() == [4, 4, 4] and fb.extend_starts.tolist() == [0, 4, 8]
    assert fb.page_table.tolist() == [[3, 7, 0], [9, 0, 0], [4, 6, 8]]
    assert fb.logit_idx.tolist() == [2, 4, 11]  # each row's last real token
    assert (fb.is_decode, fb.max_extend_len, fb.max_seq_len) == (False, 4, 10)
    assert padded.real_rows == [0, 1, 2, 4, 8, 9, 10, 11]
    # The real tokens are the unpadded batch's, in its order.
    plain = build_extend_batch(entries, PAGE_SIZE, torch.device("cpu"))
    real = torch.tensor(padded.real_rows)
    for name in ("input_ids", "positions", "slots"):
        assert torch.equal(getattr(fb, name)[real], getattr(plain, name)), name


def test_padded_chain_batch_refuses_a_row_longer_than_the_graphs_take() -> None:
    with pytest.raises(ValueError, match=r"sequences of \[2, 5\] tokens: expected 1..4 each"):
        build_padded_chain_batch([([1], 0, [1, 2]), ([2, 3], 1, [1] * 5)], 4, PAGE_SIZE)


def test_verify_inputs_reset_rows_past_a_smaller_batch_to_padding() -> None:
    inputs = GraphInputs([2, 4], max_pages=3, max_context_len=8, device="cpu", tokens_per_row=3)
    view = inputs.batch(2)
    assert view.logit_idx.tolist() == [2, 5] and view.extend_starts.tolist() == [0, 3]
    assert (view.is_decode, view.max_extend_len, view.max_seq_len) == (False, 3, 8)
    big = build_padded_chain_batch(
        [([1], 0, [5, 6, 7]), ([2], 1, [8]), ([3, 4], 3, [9, 10])], 3, PAGE_SIZE
    ).batch
    inputs.load(big, 4)
    bucket = inputs.buckets[4]
    assert bucket.slots[:9].tolist() == [4, 5, 6, 9, 0, 0, 15, 16, 0]
    inputs.load(build_padded_chain_batch([([5], 2, [1, 2])], 3, PAGE_SIZE).batch, 4)
    assert bucket.input_ids.tolist() == [1, 2] + [0] * 10
    assert bucket.positions.tolist() == [2, 3] + [0] * 10
    assert bucket.slots.tolist() == [22, 23] + [0] * 10  # padding writes slot 0 only
    assert bucket.seq_lens.tolist() == [5, 3, 3, 3]  # padding rows: an extend over no prefix
    assert inputs.page_table[1:4, :1].eq(0).all()  # the columns a padding row reads
    assert inputs.buckets[2].seq_lens.tolist() == [3, 3]  # the other bucket: untouched
    with pytest.raises(ValueError, match="exactly 3 tokens a row"):
        inputs.load(build_extend_batch([([1], 0, [5, 6])], PAGE_SIZE, torch.device("cpu")), 4)


# ------------------------------------------------- eager on the static buffers vs the eager pass


def random_entries(
    rng: random.Random, num_rows: int, num_pages: int
) -> list[tuple[list[int], int, list[int]]]:
    """Rows at random starts over disjoint random pages (never page 0), each feeding 1..ROW
    tokens; all their pages allocated, as the scheduler reserves them."""
    free = list(range(1, num_pages))
    rng.shuffle(free)
    entries = []
    for _ in range(num_rows):
        num = rng.randint(1, ROW)
        start = rng.randint(0, 30)
        pages = [free.pop() for _ in range(-(-(start + num) // PAGE_SIZE))]
        entries.append((pages, start, [rng.randrange(3, 300) for _ in range(num)]))
    return entries


def slot_values(pool: torch.Tensor) -> torch.Tensor:
    """[L, 2, P, page, H, D] -> [P * page, L * 2 * H * D]: one row per KV slot."""
    layers, two, pages, page, heads, dim = pool.shape
    return pool.permute(2, 3, 0, 1, 4, 5).reshape(pages * page, -1)


def host_lists_of(view: ForwardBatch, inputs: GraphInputs, bs: int) -> ForwardBatch:
    """The torch backend reads each row's lengths from host lists, fixed at capture: refresh them
    from the static buffers (a capturable backend reads the device tensors, as a replay does)."""
    return dataclasses.replace(view, seq_lens_cpu=inputs.buckets[bs].seq_lens.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eager_run_on_the_graph_buffers_equals_the_eager_verify_pass(
    tiny_llama: Path, seed: int
) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    runner = make_core(tiny_llama, None).runner
    model, pool = runner.model, runner.kv_pool.buffer
    pool.copy_(torch.randn_like(pool))  # every slot holds something: a stray write shows
    before = pool.clone()
    sizes = capture_batch_sizes(8)
    inputs = GraphInputs(sizes, num_table_pages(64 + ROW, PAGE_SIZE), 64, "cpu", tokens_per_row=ROW)
    # A bigger batch first: its rows past the next batch must turn back into padding.
    for num_rows in (7, 3):
        entries = random_entries(rng, num_rows, runner.num_pages)
        pool.copy_(before)
        fb = build_extend_batch(entries, PAGE_SIZE, runner.device)
        with torch.inference_mode():
            want = model.forward_hidden(fb, runner.kv_pool, all_rows=True)  # [T, H]
        want_pool = pool.clone()

        pool.copy_(before)
        padded = build_padded_chain_batch(entries, ROW, PAGE_SIZE)
        bs = padded_batch_size(sizes, len(entries))
        inputs.load(padded.batch, bs)
        with torch.inference_mode():
            view = host_lists_of(inputs.batch(bs), inputs, bs)
            got = model.forward_hidden(view, runner.kv_pool, all_rows=True)  # [bs * ROW, H]
        assert got.shape[0] == bs * ROW
        got = got[torch.tensor(padded.real_rows)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model.compute_logits(got), model.compute_logits(want), rtol=1e-5, atol=1e-5
        )
        # KV: the real tokens' slots hold what the eager pass wrote; nothing else changed
        # outside page 0.
        real = fb.slots  # [T]
        slots_now, slots_want = slot_values(pool), slot_values(want_pool)
        torch.testing.assert_close(slots_now[real], slots_want[real], rtol=1e-5, atol=1e-5)
        changed = (slots_now != slot_values(before)).any(dim=1)  # [P * page]
        changed[real] = False
        changed[:PAGE_SIZE] = False  # page 0
        assert not changed.any(), changed.nonzero().view(-1).tolist()


# ------------------------------------------------------------- EAGLE drafting on the device


class EagerDraftGraphs(DraftGraphs):
    """DraftGraphs whose replay runs the chain eagerly on the static buffers (CPU)."""

    def _capture(self, sizes: list[int]) -> None:
        for bs in sizes:
            self.outputs[bs] = self.run(bs)
            self.graphs[bs] = _EagerDraftGraph(self, bs)  # type: ignore[assignment]
        self.batch_sizes = sorted(sizes)


class _EagerDraftGraph:
    def __init__(self, graphs: EagerDraftGraphs, bs: int) -> None:
        self.graphs, self.bs = graphs, bs

    def replay(self) -> None:
        self.graphs.outputs[self.bs].copy_(self.graphs.run(self.bs))


def eager_draft_graphs(drafter: EagleDrafter, max_batch: int) -> EagerDraftGraphs:
    runner = drafter.runner
    return EagerDraftGraphs(
        drafter.chain, NUM_DRAFTS, max_batch, num_table_pages(64, PAGE_SIZE), 64,
        drafter.head.config.hidden_size, runner.dtype, runner.device,
    )  # fmt: skip


def loop_drafts(drafter: EagleDrafter, reqs: list, num_drafts: list[int]) -> list[list[int]]:
    """The reference: one head step at a time over the rows still drafting, each step's batch
    built on the host, the argmax read back after each."""
    logits = drafter.runner.model.compute_logits
    drafts: list[list[int]] = [[] for _ in reqs]
    live = [b for b, n in enumerate(num_drafts) if n > 0]
    feature = torch.stack([reqs[b].spec_state.feature for b in live])
    token = logits(feature).argmax(-1)
    step = 0
    while live:
        for b, t in zip(live, token.tolist()):
            drafts[b].append(t)
        step += 1
        keep = [k for k, b in enumerate(live) if num_drafts[b] > step]
        live = [live[k] for k in keep]
        if not live:
            break
        token, feature = token[keep], feature[keep]
        entries = [
            (reqs[b].page_ids, reqs[b].spec_state.num_valid + step - 1, [int(t)])
            for b, t in zip(live, token.tolist())
        ]
        feature = drafter._run(entries, token, feature, is_decode=True)
        token = logits(feature).argmax(-1)
    return drafts


def draft_rows(
    rng: random.Random, num_rows: int, hidden: int, num_pages: int, full: bool = False
) -> tuple:
    """Requests with a random head state at a random position, pages for their drafts (all
    NUM_DRAFTS with full, else 0..NUM_DRAFTS)."""
    from types import SimpleNamespace

    free = list(range(1, num_pages))
    rng.shuffle(free)
    reqs, num_drafts = [], []
    for _ in range(num_rows):
        num_valid, num = rng.randint(1, 40), NUM_DRAFTS if full else rng.randint(0, NUM_DRAFTS)
        pages = [free.pop() for _ in range(-(-(num_valid + num) // PAGE_SIZE))]
        state = EagleState(torch.randn(hidden), num_valid)
        reqs.append(SimpleNamespace(spec_state=state, page_ids=pages))
        num_drafts.append(num)
    return reqs, num_drafts


@pytest.mark.parametrize("through_graphs", [False, True])
def test_device_draft_chain_equals_the_step_by_step_loop(
    tiny_llama: Path, tmp_path: Path, through_graphs: bool
) -> None:
    from pdserve.tiny_model.eagle import build_tiny_eagle_head

    spec = SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(build_tiny_eagle_head(tmp_path / "head", seed=2)),
        speculative_num_steps=NUM_DRAFTS,
        speculative_num_draft_tokens=NUM_DRAFTS + 1,
    )
    drafter = make_core(tiny_llama, spec).spec.drafter
    assert drafter.graphs is None  # CPU: nothing captured
    if through_graphs:
        drafter.graphs = eager_draft_graphs(drafter, max_batch=8)
    pool = drafter.pool.buffer
    torch.manual_seed(0)
    pool.copy_(torch.randn_like(pool))
    before = pool.clone()
    rng = random.Random(1)
    for num_rows in (7, 3, 1):  # smaller after larger: the graphs' stale rows are padding
        hidden = drafter.head.config.hidden_size
        reqs, num_drafts = draft_rows(rng, num_rows, hidden, 200, full=num_rows == 7)
        pool.copy_(before)
        with torch.inference_mode():
            want = loop_drafts(drafter, reqs, num_drafts)
        want_pool = pool.clone()
        pool.copy_(before)
        assert drafter.draft(reqs, num_drafts) == want
        # The head's KV: written at each row's draft positions as the loop writes it, and
        # nowhere else but page 0.
        real = torch.tensor(
            [
                slot_of(r.page_ids, p, PAGE_SIZE)
                for r, n in zip(reqs, num_drafts)
                for p in range(r.spec_state.num_valid, r.spec_state.num_valid + n - 1)
            ],
            dtype=torch.int64,
        )  # [num written]: a head step per draft but the last
        now, ref = slot_values(pool), slot_values(want_pool)
        torch.testing.assert_close(
            now[real], ref[real], rtol=1e-3, atol=1e-4
        )  # batch shapes differ
        changed = (now != slot_values(before)).any(dim=1)
        changed[real] = False
        changed[:PAGE_SIZE] = False
        assert not changed.any(), changed.nonzero().view(-1).tolist()
    if through_graphs:
        assert drafter.graphs.num_replays == 3


# --------------------------------------- whole runs: the speculative decoder replays the graphs


class EagerGraphs(CudaGraphRunner):
    """The verify graphs with every capture replaced by an eager run of the model on the same
    static buffers at replay (CPU has no CUDA graphs): what replay loads, pads and returns is
    the real runner's."""

    def __init__(self, runner, tokens_per_row: int) -> None:  # type: ignore[no-untyped-def]
        capturable = dataclasses.replace(runner.model.attention, supports_cuda_graph=True)
        runner.model.attention = capturable  # only the runner asks it; the layers keep theirs
        super().__init__(runner, tokens_per_row)

    def _capture(self, sizes: list[int]) -> None:
        for bs in sizes:
            self.outputs[(bs, False)] = self._forward(self.inputs.batch(bs))
            self.graphs[(bs, False)] = _EagerGraph(self, bs)  # type: ignore[assignment]
        self.batch_sizes = sorted(sizes)


class _EagerGraph:
    def __init__(self, graphs: EagerGraphs, bs: int) -> None:
        self.graphs, self.bs = graphs, bs

    def replay(self) -> None:
        g, bs = self.graphs, self.bs
        view = host_lists_of(g.inputs.batch(bs), g.inputs, bs)
        g.outputs[(bs, False)].copy_(g._forward(view))


def run(
    core: WorkerCore, prompts: list[list[int]], max_new_tokens: int, late: int = 0
) -> list[list[int]]:
    """Greedy outputs of every prompt; the first `late` prompts arrive after three steps, so
    their prefill chunks ride along in verify passes."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(rid=f"r{i}", prompt_ids=p, sampling=params) for i, p in enumerate(prompts)]
    for req in reqs[late:]:
        core.add(req)
    steps = 0
    while core.has_work() or steps < 3:
        if steps == 3:
            for req in reqs[:late]:
                core.add(req)
        core.step()
        steps += 1
        assert steps < 2000
    return [r.output_ids for r in reqs]


def context_free(core: WorkerCore) -> WorkerCore:
    """Zero every attention output: greedy decoding enters a cycle that prompt lookup predicts."""
    for layer in core.runner.model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
    return core


@pytest.mark.parametrize("algorithm", ["NGRAM", "EAGLE"])
def test_greedy_outputs_through_the_verify_graphs_equal_the_plain_loop(
    tiny_llama: Path, tmp_path: Path, algorithm: str
) -> None:
    # Prompts holding the model's own greedy cycle: prompt lookup predicts what comes next.
    cycles = run(context_free(make_core(tiny_llama, None)), [[11], [99], [250], [42]], 24)
    prompts = [[t, *out] for t, out in zip([11, 99, 250, 42], cycles)]
    prompts.insert(0, [7, 8, 9] * 7)  # arrives late: a chunk longer than a graph row, eager
    if algorithm == "NGRAM":
        spec = SpeculativeConfig(
            speculative_algorithm="NGRAM", speculative_num_draft_tokens=NUM_DRAFTS + 1
        )
    else:
        from pdserve.tiny_model.eagle import build_tiny_eagle_head

        spec = SpeculativeConfig(
            speculative_algorithm="EAGLE",
            speculative_draft_model_path=str(build_tiny_eagle_head(tmp_path / "head", seed=2)),
            speculative_num_steps=NUM_DRAFTS,
            speculative_num_draft_tokens=NUM_DRAFTS + 1,
        )
    plain = run(context_free(make_core(tiny_llama, None)), prompts, 20, late=1)
    core = context_free(make_core(tiny_llama, spec))
    core.spec.verify_graphs = graphs = EagerGraphs(core.runner, NUM_DRAFTS + 1)
    drafter = core.spec.drafter
    if drafter is not None:
        drafter.graphs = eager_draft_graphs(drafter, max_batch=8)
    assert run(core, prompts, 20, late=1) == plain
    if drafter is not None:
        assert drafter.graphs.num_replays > 0
    stats = core.spec.stats
    assert graphs.num_replays == stats.num_graph_steps > 0
    assert stats.num_graph_steps < stats.num_verify_steps  # the long chunk's pass ran eagerly
    if algorithm == "NGRAM":
        assert stats.num_tokens - stats.num_row_steps > 20, stats  # drafts accepted through them


def test_verify_graphs_stay_off_for_trees_and_backends_that_cannot_be_captured(
    tiny_llama: Path,
) -> None:
    from types import SimpleNamespace

    from pdserve.worker.speculative.factory import make_verify_graphs

    core = make_core(tiny_llama, None)
    ngram = SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_draft_tokens=3)
    assert core.runner.graph_runner is None  # CPU: no decode graphs, so no verify graphs
    assert make_verify_graphs(ngram, core.runner) is None
    tree = SpeculativeConfig(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path="head",
        speculative_eagle_topk=2,
    )
    with_graphs = SimpleNamespace(graph_runner=SimpleNamespace(batch_sizes=[1, 2]))
    assert make_verify_graphs(tree, with_graphs) is None  # type: ignore[arg-type]
    graphs = CudaGraphRunner(core.runner, tokens_per_row=3)  # torch backend: nothing captured
    padded = build_padded_chain_batch([([1], 0, [5, 6])], 3, PAGE_SIZE).batch
    assert graphs.batch_sizes == [] and not graphs.can_run(padded)


# ---------------------------------------------- the Triton backend, under Triton's interpreter

TRITON_CHECK = textwrap.dedent(
    """
    import random, sys
    import torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_spec_graphs import ROW, PAGE_SIZE, make_core, random_entries
    from pdserve.worker.cuda_graph_runner import GraphInputs, num_table_pages
    from pdserve.worker.speculative.verify_batch import (
        build_extend_batch, build_padded_chain_batch,
    )

    from pdserve.worker.models import load_model

    runner = make_core(Path(sys.argv[1]), None).runner
    # The same weights under the Triton backend (the engine allows it on CUDA only).
    model = load_model(runner.model_config, sys.argv[1], runner.dtype, "cpu", "triton")
    pool = runner.kv_pool.buffer
    torch.manual_seed(0)
    pool.copy_(torch.randn_like(pool))
    before = pool.clone()
    inputs = GraphInputs([4], num_table_pages(64 + ROW, PAGE_SIZE), 64, "cpu", tokens_per_row=ROW)
    rng = random.Random(0)
    for entries in (random_entries(rng, 4, 200), random_entries(rng, 3, 200)):
        pool.copy_(before)
        fb = build_extend_batch(entries, PAGE_SIZE, runner.device)
        with torch.inference_mode():
            want = model.forward_hidden(fb, runner.kv_pool, all_rows=True)
        pool.copy_(before)
        padded = build_padded_chain_batch(entries, ROW, PAGE_SIZE)
        inputs.load(padded.batch, 4)
        with torch.inference_mode():  # the captured batch itself: host lists as at capture
            got = model.forward_hidden(inputs.batch(4), runner.kv_pool, all_rows=True)
        got = got[torch.tensor(padded.real_rows)]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print("ok")
    """
)


def test_triton_backend_on_the_captured_batch_equals_the_eager_pass(tiny_llama: Path) -> None:
    """The batch a graph is captured on, with its capture-time host lists, under the Triton
    backend (interpreted on CPU): the extend path reads only device tensors and max_extend_len."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK, str(tiny_llama), here],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
