"""Draws replayed over a decode graph's logits buffer (worker/draw_graphs.py), off the GPU: the
same bookkeeping (the inputs laid out for the buffer's rows and copied into a static buffer, rows
past the batch drawn greedy, one capture per layout) with a recorded call in place of the CUDA
graph. Against the eager draw on fresh random logits, and whole runs of the tiny model whose
decode steps hand their logits over in such a buffer, against the general sampling path."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import pdserve.worker.worker_core as worker_core
from pdserve.worker.device_copy import host_buffer
from pdserve.worker.draw_graphs import DrawGraphs, DrawLayout, mask_view, packed, packed_bytes
from pdserve.worker.grammar_mask import bitmask_words
from pdserve.worker.light_sampling import LightSampler
from pdserve.worker.race_sampling import race_draw
from tests.worker.test_light_sampling import (
    LOOPS,
    checked_request,
    items_for,
    light_specs,
    make_loop_core,
    random_bitmask,
)
from tests.worker.test_overlap import assert_same, make_core, run

CPU = torch.device("cpu")


def test_rows_for_takes_only_a_prefix_of_a_registered_buffer() -> None:
    graphs = DrawGraphs(CPU)
    buf = torch.randn(8, 100)
    graphs.add_logits_buffer(buf)
    assert graphs.rows_for(buf[:3]) == 8
    assert graphs.rows_for(buf) == 8
    assert graphs.rows_for(buf[1:4]) is None  # not its first rows
    assert graphs.rows_for(buf[:, :50]) is None  # its pointer, not its rows' width
    assert graphs.rows_for(buf.t()[:8]) is None  # nor its strides
    assert graphs.rows_for(buf.index_select(0, torch.tensor([0, 2]))) is None
    assert graphs.rows_for(torch.randn(3, 100)) is None
    with pytest.raises(ValueError, match="float32"):
        graphs.add_logits_buffer(torch.zeros(8, 100, dtype=torch.bfloat16))


def random_rows(rng: random.Random, num: int) -> list:
    reqs = []
    for _ in range(num):
        kind = rng.choice(("greedy", "seeded", "min_p", "unseeded"))
        if kind == "greedy":
            params = {"temperature": 0.0}
        elif kind == "seeded":
            params = {"temperature": rng.choice([0.5, 1.0, 1.7]), "seed": rng.randrange(2**31)}
        elif kind == "min_p":
            params = {"temperature": 1.0, "min_p": 0.1, "seed": rng.randrange(2**31)}
        else:
            params = {"temperature": 0.9}
        reqs.append(checked_request([rng.randrange(50) for _ in range(rng.randrange(6))], **params))
    return reqs


def test_replayed_draws_equal_the_eager_draws_step_after_step() -> None:
    """Batches of 1-8 rows over an 8-row buffer, their logits, rows and sizes fresh each step:
    the replayed draw (and the greedy one) gives the eager draw's tokens; a layout is captured
    once and replayed after, so its static inputs are refreshed by every draw."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = 300
    buf = torch.empty(8, vocab)
    graphs = DrawGraphs(CPU)
    graphs.add_logits_buffer(buf)
    replayed, eager = LightSampler(seed=5, graphs=graphs), LightSampler(seed=5)
    for step in range(30):
        batch = rng.randint(1, 8)
        buf.copy_(torch.randn(8, vocab, generator=gen) * 3.0)  # rows past the batch: garbage
        logits = buf[:batch]
        items = items_for(random_rows(rng, batch))
        got = replayed.sample(logits, items)
        want = eager.sample(logits.clone(), items)
        assert got is not None and want is not None
        assert got.tolist() == want.tolist(), f"seed {seed}, step {step}"
        greedy = graphs.draw(logits, DrawLayout(8, 0, 0, False), None)
        assert greedy.tolist() == logits.argmax(dim=-1).tolist(), f"seed {seed}, step {step}"
    # Layouts: greedy, temperature without and with min-p (all over 8 rows): 3 at most, each
    # captured once, every other draw a replay.
    assert 2 <= graphs.num_captured <= 3
    assert graphs.num_replays == 60 - graphs.num_captured


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_every_layout_replays_the_eager_race_draw(device: str) -> None:
    """Each kind of draw (greedy or not, bitmask or not, min-p or not) over the first rows of a
    registered buffer, its host bytes fresh each step and sent as LightSampler sends them: the
    replayed tokens equal race_draw's on the same inputs (on CUDA: real graphs, the Triton race
    kernel, captured on a side stream)."""
    seed = random.randrange(2**32)
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = 16, 5000
    dev = torch.device(device)
    buf = torch.empty(rows, vocab, device=dev)
    graphs = DrawGraphs(dev)
    graphs.add_logits_buffer(buf)
    words = bitmask_words(vocab)
    for step in range(24):
        any_min_p, has_mask, greedy_only = step % 2 == 1, step % 3 != 0, step % 4 == 0
        param_bytes = 0 if greedy_only else -(-packed_bytes(rows) // 64) * 64
        layout = DrawLayout(rows, param_bytes, words if has_mask else 0, any_min_p)
        batch = 1 + step % rows
        buf.copy_(torch.randn(rows, vocab, generator=gen) * 3.0)
        host, send = host_buffer((max(layout.num_bytes, 1),), torch.uint8, dev)
        host = host[: layout.num_bytes]
        if has_mask:
            mask_view(host, param_bytes, rows, words).copy_(random_bitmask(gen, rows, vocab))
        if not greedy_only:
            keys, floats = packed(host, rows)
            keys.copy_(torch.randint(0, 2**32, (rows, 2), generator=gen))
            floats[0] = torch.rand(rows, generator=gen) + 0.3
            floats[1] = torch.rand(rows, generator=gen) * 0.2 if any_min_p else 0.0
            floats[2] = (torch.rand(rows, generator=gen) < 0.3).float()
        got = graphs.draw(
            buf[:batch], layout, (lambda dst, s=send: s(dst)) if layout.num_bytes else None
        )
        ref = host.to(dev)
        bitmask = mask_view(ref, param_bytes, rows, words)[:batch] if has_mask else None
        if greedy_only:
            want = race_draw(buf[:batch], None, None, None, None, bitmask, all_greedy=True)
        else:
            keys, floats = packed(ref, rows)
            want = race_draw(
                buf[:batch], floats[0, :batch], floats[1, :batch], floats[2, :batch],
                keys[:batch], bitmask, any_min_p=any_min_p,
            )  # fmt: skip
        assert got.tolist() == want.tolist(), f"seed {seed}, step {step}, {layout}"
    assert graphs.num_captured == len({(s % 2, s % 3 != 0, s % 4 == 0) for s in range(24)})
    assert graphs.num_replays == 24 - graphs.num_captured


def with_static_logits(core: worker_core.WorkerCore) -> DrawGraphs:
    """Decode steps hand their logits over as the first rows of a per-size buffer, as a decode
    graph's replay does (its rows past the batch hold garbage); the core's draws over them replay."""
    graphs = DrawGraphs(CPU)
    buffers: dict[int, torch.Tensor] = {}
    forward = core.runner.forward

    def static_forward(batch, pending=None):  # type: ignore[no-untyped-def]
        logits = forward(batch, pending)
        if not batch.is_decode:
            return logits
        num_rows = logits.shape[0]
        rows = next(s for s in (2, 4, 8, 16, 32, 64) if s >= num_rows)
        if rows not in buffers:
            buffers[rows] = torch.empty(rows, logits.shape[1])
            graphs.add_logits_buffer(buffers[rows])
        buf = buffers[rows]
        buf.normal_()
        buf[:num_rows] = logits
        return buf[:num_rows]

    core.runner.forward = static_forward  # type: ignore[method-assign]
    core.light_sampler.graphs = graphs
    return graphs


@pytest.mark.parametrize("loop", list(LOOPS))
def test_runs_with_replayed_draws_give_the_general_paths_tokens(
    tiny_llama: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    specs = light_specs(rng, 16)
    for spec in specs:  # long decodes: most steps are pure decode steps of the same rows
        spec["arrive"] = rng.randint(0, 2)
        spec["params"]["max_new_tokens"] += 16
    core = make_loop_core(tiny_llama, loop)
    graphs = with_static_logits(core)
    replayed = run(core, specs)
    assert graphs.num_replays > 0, f"no draw replayed (seed {seed})"
    monkeypatch.setattr(worker_core, "is_light", lambda req: False)
    general = run(make_core(tiny_llama, overlap=False), specs)
    assert_same(general, replayed, seed)
