"""Piecewise CUDA graphs (worker/piecewise_graphs.py) on the GPU: replayed segments with eager
attention between them give the eager forward's logits, and the torch backend's, for mixed
batches (decodes first, then prefill chunks over cached prefixes) of token counts that pad into
several buckets; they write the same KV for the batch's tokens; greedy generation through the
Engine with them matches the torch backend. Lines starting with RESULT summarise the numbers."""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig, SchedulerConfig
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.models import load_model
from tests.worker.test_gpu_path import (
    NUM_PAGES,
    _agreement,
    _free_gpu,
    _generate,
    _prompts,
    _rel_err,
    model_dirs,  # noqa: F401  (the fixture)
    random_batch,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA GPU and triton",
    ),
]

MAX_TOKENS = 512


@pytest.mark.parametrize(
    ("model", "dtype"), [("qwen3", "bfloat16"), ("llama1024", "float32"), ("llama1024", "bfloat16")]
)
def test_piecewise_logits_and_kv_equal_eager_and_torch_backend(
    model_dirs: dict[str, Path],  # noqa: F811
    model: str,
    dtype: str,
) -> None:
    path = model_dirs[model]
    config = EngineConfig(
        model_path=str(path), device="cuda", dtype=dtype, attention_backend="triton",
        cuda_graph_max_batch=16, piecewise_graph_max_tokens=MAX_TOKENS,
        scheduler=SchedulerConfig(num_pages=NUM_PAGES),
    ).resolved()  # fmt: skip
    model_config = ModelConfig.from_hf(path)
    start = time.perf_counter()
    runner = ModelRunner(config, model_config)
    setup_s = time.perf_counter() - start
    piecewise = runner.piecewise
    assert piecewise is not None
    num_segments = model_config.num_layers + 1
    assert len(piecewise.graphs) == num_segments * len(piecewise.buckets)
    reference = load_model(model_config, path, runner.dtype, runner.device, "torch")
    runner.kv_pool.buffer.normal_()
    rng = random.Random(0)
    tol = 1e-3 if dtype == "float32" else 3e-2
    worst = {"piecewise_vs_eager": 0.0, "eager_vs_torch": 0.0, "kv": 0.0}
    shapes = [
        ([], [(0, 37)]),  # a fresh prompt
        ([300, 5, 900], [(128, 200)]),  # a mixed step
        ([rng.randint(1, 1500) for _ in range(40)], [(17, 64), (0, 3), (250, 100)]),
        ([rng.randint(1, 1500) for _ in range(100)], []),  # decodes above the decode graphs
        ([7], [(0, MAX_TOKENS - 1)]),  # the largest bucket, full
        ([1, 2], [(5, 3)]),  # padded into the smallest buckets after a large step
    ]
    used_buckets = set()
    with torch.inference_mode():
        for decode_lens, prefills in shapes:
            batch = random_batch(
                decode_lens, prefills, model_config.vocab_size, runner.page_size, rng
            )
            fb = runner.build_forward_batch(batch)
            assert piecewise.can_run(fb) and not runner.graph_runner.can_run(fb)
            used_buckets.add(piecewise.bucket(fb.num_tokens))
            replayed = piecewise.run(fb).clone()  # [B, V]
            kv = [runner.kv_pool.k(i).view(-1, *runner.kv_pool.k(i).shape[2:])[fb.slots].clone()
                  for i in range(model_config.num_layers)]  # fmt: skip
            eager = runner.model(fb, runner.kv_pool)
            for i, k in enumerate(kv):
                k_eager = runner.kv_pool.k(i).view(-1, *k.shape[1:])[fb.slots]
                worst["kv"] = max(worst["kv"], _rel_err(k, k_eager))
            torch_ref = reference(fb, runner.kv_pool)
            worst["piecewise_vs_eager"] = max(
                worst["piecewise_vs_eager"], _rel_err(replayed, eager)
            )
            worst["eager_vs_torch"] = max(worst["eager_vs_torch"], _rel_err(eager, torch_ref))
    print(
        f"RESULT piecewise {model} {dtype}: max rel err piecewise/eager "
        f"{worst['piecewise_vs_eager']:.2e}, eager/torch {worst['eager_vs_torch']:.2e}, KV "
        f"{worst['kv']:.2e}; {len(piecewise.graphs)} graphs over buckets {piecewise.buckets}, "
        f"runner setup {setup_s:.1f} s; buckets used {sorted(used_buckets)}"
    )
    assert piecewise.num_runs == len(shapes) and len(used_buckets) >= 4
    assert worst["piecewise_vs_eager"] <= tol
    assert worst["eager_vs_torch"] <= tol
    assert worst["kv"] <= tol
    del runner, reference, piecewise
    _free_gpu()


@pytest.mark.parametrize(("model", "dtype"), [("llama", "float32"), ("llama1024", "float32")])
def test_greedy_generation_with_piecewise_graphs_matches_torch_backend(
    model_dirs: dict[str, Path],  # noqa: F811
    model: str,
    dtype: str,
) -> None:
    path = model_dirs[model]
    prompts = _prompts(ModelConfig.from_hf(path).vocab_size)
    refs, _ = _generate(path, prompts, dtype=dtype, attention_backend="torch")
    for max_tokens in (MAX_TOKENS, 0):
        outs, info = _generate(
            path, prompts, dtype=dtype, attention_backend="triton",
            piecewise_graph_max_tokens=max_tokens,
        )  # fmt: skip
        exact, first, prefix = _agreement(outs, refs)
        print(
            f"RESULT greedy {model} {dtype} piecewise graphs up to {max_tokens} tokens: exact "
            f"{exact:.0%}, first token {first:.0%}, common prefix {prefix:.0%}; generate "
            f"{info['seconds']:.2f} s"
        )
        assert (info["piecewise_runs"] > 0) == (max_tokens > 0)
        assert exact >= 0.9
