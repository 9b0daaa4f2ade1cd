"""The decoder's small-batch path (Kernels.gemv: the norm fused into q/k/v and gate/up, SiLU-and-mul
into down_proj, o_proj as a GEMV) on the CPU, through the kernels' torch reference
(kernels/gemv_ref): a core whose steps of at most MAX_ROWS tokens take that path gives the plain
core's tokens, logprobs and finishes, for a random mix of requests on each architecture. The
Triton kernels themselves: tests/kernels/test_triton_gemv.py."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from pdserve.kernels import gemv_ref
from pdserve.worker.models.llama import Kernels
from pdserve.worker.worker_core import WorkerCore
from tests.worker.test_overlap import KINDS, assert_same, make_core, random_requests, run


def with_reference_gemv(core: WorkerCore) -> Counter[str]:
    """Give every module of the core's model the reference gemv kernels; count their calls by
    name and row count."""
    calls: Counter[str] = Counter()

    def counted(name: str):  # type: ignore[no-untyped-def]
        fn = getattr(gemv_ref, name)

        def call(x, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            calls[f"rows={x.shape[0]}"] += 1
            return fn(x, *args, **kwargs)

        return call

    names = ("gemv", "add_norm_gemv", "silu_mul_gemv")
    fake = SimpleNamespace(MAX_ROWS=gemv_ref.MAX_ROWS, **{n: counted(n) for n in names})
    for module in core.runner.model.modules():
        kernels = getattr(module, "kernels", None)
        if isinstance(kernels, Kernels):
            module.kernels = kernels._replace(gemv=fake)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_small_steps_through_the_fused_linears_give_the_plain_tokens(
    tiny_models: dict[str, Path], arch: str
) -> None:
    seed = random.randrange(2**32)
    specs = random_requests(random.Random(seed), 12, KINDS, logprobs=0.1)
    plain = run(make_core(tiny_models[arch], overlap=True), specs)
    core = make_core(tiny_models[arch], overlap=True)
    calls = with_reference_gemv(core)
    assert_same(plain, run(core, specs), seed)
    layers = core.model_config.num_layers
    # Each fused step calls each kernel once a layer (two norms fused a layer).
    assert calls["add_norm_gemv"] == 2 * calls["gemv"] == 2 * calls["silu_mul_gemv"] > 0
    assert calls["gemv"] % layers == 0
    assert set(k for k in calls if k.startswith("rows=")) <= {f"rows={n}" for n in range(1, 5)}
    assert sum(calls[f"rows={n}"] for n in (2, 3, 4)) > 0, f"seed {seed}: only batch-1 steps"
