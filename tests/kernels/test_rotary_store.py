"""The fused rotary + KV-cache store kernel against its two torch references (rotary, then the
index put), on random inputs: q rotated in place, k's rotation and v in the cache at each slot,
nothing else written (partial rotary included). Needs CUDA and triton, or TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pdserve.config.engine_config import RopeScaling
from pdserve.kernels.attention_ref import store_kv
from pdserve.kernels.rotary_ref import apply_rotary_ref, rope_cos_sin_cache

_HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _HAS_TRITON
        or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
        reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
    ),
]


@pytest.mark.parametrize(
    ("dtype", "head_dim", "rotary_dim", "num_tokens"),
    [
        (torch.bfloat16, 64, 64, 37),
        (torch.bfloat16, 128, 128, 1),
        (torch.float32, 64, 32, 9),  # partial rotary: the tail is stored as it is
        (torch.float16, 128, 128, 300),
    ],
)
def test_rotary_and_store_equals_rotary_then_store(
    dtype: torch.dtype, head_dim: int, rotary_dim: int, num_tokens: int
) -> None:
    from pdserve.kernels.triton_rotary import apply_rotary_and_store_

    hq, hkv, num_pages, page_size = 32, 8, 64, 16
    cos_sin = rope_cos_sin_cache(rotary_dim, 5000, 500000.0, RopeScaling(), DEVICE)
    positions = torch.randint(0, 5000, (num_tokens,), device=DEVICE)
    slots = torch.randperm(num_pages * page_size, device=DEVICE)[:num_tokens]
    # q, k, v as the views of one fused qkv output the model hands over
    qkv = torch.randn((num_tokens, (hq + 2 * hkv) * head_dim), dtype=dtype, device=DEVICE)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(num_tokens, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim :].view(num_tokens, hkv, head_dim)
    pool = torch.randn((2, num_pages, page_size, hkv, head_dim), dtype=dtype, device=DEVICE)
    ref_pool = pool.clone()
    ref_q, ref_k = apply_rotary_ref(q[..., :rotary_dim], k[..., :rotary_dim], positions, cos_sin)
    ref_q = torch.cat([ref_q, q[..., rotary_dim:]], dim=-1)
    ref_k = torch.cat([ref_k, k[..., rotary_dim:]], dim=-1)
    store_kv(ref_pool[0], ref_pool[1], slots, ref_k, v)
    k_before, v_before = k.clone(), v.clone()

    out = apply_rotary_and_store_(q, k, v, positions, cos_sin, pool[0], pool[1], slots)

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert out is q
    torch.testing.assert_close(q.float(), ref_q.float(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(pool.float(), ref_pool.float(), atol=tol * 4, rtol=tol)
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    flat, ref_flat = pool.view(2, -1, hkv, head_dim), ref_pool.view(2, -1, hkv, head_dim)
    assert torch.equal(flat[:, untouched], ref_flat[:, untouched]), "wrote outside its slots"
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "k or v changed in place"


def test_a_cache_that_is_not_slot_contiguous_is_refused() -> None:
    from pdserve.kernels.triton_rotary import apply_rotary_and_store_

    cos_sin = rope_cos_sin_cache(64, 100, 10000.0, RopeScaling(), DEVICE)
    q = torch.randn((2, 4, 64), device=DEVICE)
    k, v = torch.randn((2, 2, 64), device=DEVICE), torch.randn((2, 2, 64), device=DEVICE)
    caches = torch.randn((4, 8, 2, 2, 64), device=DEVICE).transpose(0, 1)  # pages not in order
    positions = torch.arange(2, device=DEVICE)
    with pytest.raises(ValueError, match="slot-contiguous"):
        apply_rotary_and_store_(q, k, v, positions, cos_sin, caches[0], caches[1], positions)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_model_with_the_fused_kernel_equals_the_torch_path(
    arch: str, tiny_models: dict, tmp_path
) -> None:
    """Prefill then one decode step through the whole model: the Triton kernels (the fused rotary
    + store among them) against the torch references, logits and KV pool alike (float32)."""
    from pdserve.config.engine_config import ModelConfig
    from pdserve.worker.forward_batch import ForwardBatch
    from pdserve.worker.kv_pool import KVPool
    from pdserve.worker.models import load_model

    path = tiny_models[arch]
    config = ModelConfig.from_hf(str(path))
    num_tokens = 7
    prompt = torch.randint(5, 200, (num_tokens,), device=DEVICE)
    table = torch.tensor([[3, 1]], dtype=torch.int32, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model = load_model(config, str(path), torch.float32, torch.device(DEVICE), backend)
        assert (model.model.layers[0].self_attn.kernels.rotary_and_store is not None) == (
            backend == "triton"
        )
        pool = KVPool(config, 8, 4, torch.float32, DEVICE)
        slots = torch.tensor([12, 13, 14, 15, 4, 5, 6], device=DEVICE)  # pages 3 then 1
        prefill = ForwardBatch(
            input_ids=prompt,
            positions=torch.arange(num_tokens, device=DEVICE),
            slots=slots,
            page_table=table,
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=DEVICE),
            seq_lens_cpu=[num_tokens],
            extend_lens_cpu=[num_tokens],
            logit_idx=torch.tensor([num_tokens - 1], device=DEVICE),
            is_decode=False,
        )
        decode = ForwardBatch(
            input_ids=torch.tensor([9], device=DEVICE),
            positions=torch.tensor([num_tokens], device=DEVICE),
            slots=torch.tensor([7], device=DEVICE),
            page_table=table,
            seq_lens=torch.tensor([num_tokens + 1], dtype=torch.int32, device=DEVICE),
            seq_lens_cpu=[num_tokens + 1],
            extend_lens_cpu=[1],
            logit_idx=torch.tensor([0], device=DEVICE),
            is_decode=True,
        )
        with torch.inference_mode():
            results[backend] = (model(prefill, pool), model(decode, pool), pool.buffer.clone())
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
