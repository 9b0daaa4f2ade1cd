"""The small-batch fused linear kernels (triton_gemv) against the unfused torch path: the residual
add + RMSNorm or SiLU-and-mul references, then a float64 matmul, on random inputs of awkward sizes.

Runs on CUDA; on the CPU, `test_under_the_interpreter` runs this file again under Triton's
interpreter (TRITON_INTERPRET=1) in a subprocess, so the kernels' logic is checked everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pdserve.kernels.activation_ref import silu_and_mul_ref
from pdserve.kernels.norm_ref import fused_add_rms_norm_ref

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_RUNS_KERNELS = _HAS_TRITON and (torch.cuda.is_available() or _INTERPRET)
_skip_without_kernels = pytest.mark.skipif(
    not _RUNS_KERNELS, reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)"
)


def needs_kernels(test):  # `pytest -m gpu` selects these on the GPU machine
    return pytest.mark.gpu(_skip_without_kernels(test))


# bf16 outputs are rounded once (2^-8 relative) on top of a different summation order; the
# interpreter also rounds bf16 by truncation, so its sums can be an ulp off the reference's.
_REL_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out.float()).all()
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _inputs(rows: int, k: int, n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    weight = rand(n, k, scale=k**-0.5)
    return rand(rows, k), rand(rows, k), rand(k).abs() + 0.5, weight, rand(n)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 200, 72), (3, 136, 40), (4, 64, 260)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_kernels_match_the_unfused_path(dtype, rows, k, n, with_bias) -> None:
    from pdserve.kernels.triton_gemv import GemvConfig, add_norm_gemv, gemv, silu_mul_gemv

    x, residual, gamma, weight, bias = _inputs(rows, k, n, dtype, seed=rows * 1000 + k)
    bias = bias if with_bias else None
    w64 = weight.double()
    b64 = bias.double() if bias is not None else torch.zeros(n, dtype=torch.float64, device=DEVICE)
    # A block smaller than K and N, so the loops' masked tails are exercised.
    cfg = GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)
    tol = _REL_TOL[dtype]

    assert rel_err(gemv(x, weight, bias, cfg), x.double() @ w64.T + b64) <= tol

    normed, summed = fused_add_rms_norm_ref(x, residual, gamma, 1e-6)
    out, res_out = add_norm_gemv(x, residual, gamma, 1e-6, weight, bias, cfg)
    assert rel_err(out, normed.double() @ w64.T + b64) <= tol
    assert rel_err(res_out, summed) <= (1e-2 if dtype == torch.bfloat16 else 0.0)
    assert res_out.data_ptr() != residual.data_ptr()  # never in place: other programs read it

    gate_up = torch.cat([x, residual], dim=1)  # [rows, 2K]
    ref = silu_and_mul_ref(gate_up).double() @ w64.T + b64
    assert rel_err(silu_mul_gemv(gate_up, weight, bias, cfg), ref) <= tol


@needs_kernels
def test_default_config_and_bad_shapes() -> None:
    from pdserve.kernels.triton_gemv import MAX_ROWS, add_norm_gemv, gemv

    x, residual, gamma, weight, _ = _inputs(1, 96, 520, torch.float32, seed=7)
    assert rel_err(gemv(x, weight), x.double() @ weight.double().T) <= 1e-5
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(MAX_ROWS + 1, 96, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"\[M, 96\]"):
        gemv(torch.zeros(1, 95, device=DEVICE), weight)
    with pytest.raises(ValueError, match="residual"):
        add_norm_gemv(x, residual[:, :50], gamma, 1e-6, weight)


@pytest.mark.skipif(
    not _HAS_TRITON or _INTERPRET or torch.cuda.is_available(),
    reason="the CPU's way to the kernels (on CUDA they run directly)",
)
def test_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not interpreter",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]
