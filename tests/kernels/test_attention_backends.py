"""Attention backend dispatch: names, lazy imports, and each backend against the torch reference.

The torch backend must be the reference exactly (the CPU path runs it). The Triton and FlashInfer
backends run where their packages and a GPU are (Triton also under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pdserve.kernels import attention_ref
from pdserve.kernels.attention import get_attention_backend
from pdserve.worker.forward_batch import ForwardBatch

PAGE_SIZE = 4
NUM_PAGES = 48
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
_CAN_RUN_TRITON = _HAS_TRITON and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)


def test_unknown_backend_name_is_a_value_error_listing_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"'sdpa' is not available.*'flashinfer', 'torch', 'triton'"
    ):
        get_attention_backend("sdpa")


def test_missing_package_is_a_value_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` fail
    with pytest.raises(ValueError, match="needs the flashinfer package"):
        get_attention_backend("flashinfer")
    for name in ("triton", "pdserve.kernels.triton_decode_attention"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match="'triton' needs the triton package"):
        get_attention_backend("triton")


def test_importing_dispatch_and_torch_backend_loads_no_gpu_package() -> None:
    code = (
        "import sys\n"
        "from pdserve.kernels.attention import get_attention_backend\n"
        "from pdserve.worker.models.llama import LlamaForCausalLM\n"
        "get_attention_backend('torch')\n"
        "loaded = sorted(m for m in ('triton', 'flashinfer') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_flags() -> None:
    torch_backend = get_attention_backend("torch")
    assert (torch_backend.use_triton_kernels, torch_backend.supports_cuda_graph) == (False, False)


# --- numerics -----------------------------------------------------------------------------------


def _paged_batch(
    extend_lens: list[int],
    prefix_lens: list[int],
    device: str,
    dtype: torch.dtype,
    heads: tuple[int, int, int] = (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM),
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ragged batch over scattered pages: (meta, q, k_cache, v_cache, new k, new v)."""
    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(0)
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    free = (torch.randperm(NUM_PAGES - 1, generator=gen) + 1).tolist()  # page 0 is reserved
    tables, slots = [], []
    for seq_len, ext_len in zip(seq_lens, extend_lens):
        pages = [free.pop() for _ in range(-(-seq_len // PAGE_SIZE))]
        tables.append(pages)
        slots += [
            pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
            for p in range(seq_len - ext_len, seq_len)
        ]
    table = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for b, pages in enumerate(tables):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    num_tokens = sum(extend_lens)
    shape = (NUM_PAGES, PAGE_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    ends = torch.tensor(extend_lens).cumsum(0)
    meta = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        slots=torch.tensor(slots, dtype=torch.int64, device=device),
        page_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=extend_lens,
        logit_idx=(ends - 1).to(device),
        is_decode=all(n == 1 for n in extend_lens),
        page_table_cpu=table,
    )
    return meta, q, k_cache, v_cache, k, v


def test_forward_batch_derives_the_kernel_fields_from_host_lists() -> None:
    meta, *_ = _paged_batch([3, 1, 5], [0, 6, 2], "cpu", torch.float32)
    assert meta.extend_lens.tolist() == [3, 1, 5]
    assert meta.extend_starts.tolist() == [0, 3, 4]
    assert (meta.max_extend_len, meta.max_seq_len) == (5, 7)


def test_torch_backend_is_the_reference_exactly() -> None:
    backend = get_attention_backend("torch")
    scale = HEAD_DIM**-0.5
    meta, q, k_cache, v_cache, k, v = _paged_batch([3, 1, 5], [0, 6, 2], "cpu", torch.float32)
    backend.store_kv(k_cache, v_cache, meta.slots, k, v)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    flat = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[meta.slots], k)
    out = backend.extend_attention(q, k_cache, v_cache, meta, scale)
    expected = attention_ref.extend_attention_ref(
        q, ref_k, ref_v, meta.page_table, meta.seq_lens_cpu, meta.extend_lens_cpu, scale
    )
    assert torch.equal(out, expected)

    meta, q, k_cache, v_cache, k, v = _paged_batch([1, 1, 1], [0, 9, 4], "cpu", torch.float32)
    out = backend.decode_attention(q, k_cache, v_cache, meta, scale)
    expected = attention_ref.decode_attention_ref(
        q, k_cache, v_cache, meta.page_table, meta.seq_lens, scale
    )
    assert torch.equal(out, expected)


def _gpu_backends() -> list:
    marks = [pytest.mark.gpu]
    return [
        pytest.param(
            "triton",
            marks=[*marks, pytest.mark.skipif(not _CAN_RUN_TRITON, reason="needs triton + GPU")],
        ),
        pytest.param(
            "flashinfer",
            marks=[
                *marks,
                pytest.mark.skipif(
                    not (_HAS_FLASHINFER and torch.cuda.is_available()),
                    reason="needs flashinfer + GPU",
                ),
            ],
        ),
    ]


@pytest.mark.parametrize("name", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_backend_matches_the_reference(name: str, dtype: torch.dtype) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = get_attention_backend(name)
    heads = (8, 2, 64)  # a head size FlashInfer builds, four query heads per KV head
    scale = heads[2] ** -0.5
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    cases = (
        ([3, 1, 17], [0, 6, 2]),
        ([1, 1, 1, 1], [0, 9, 4, 30]),
        # a mixed step: decodes first (the decode kernel takes them), then prefill chunks
        ([1, 1, 1, 9, 1, 20], [40, 3, 17, 0, 8, 5]),
    )
    for extend_lens, prefix_lens in cases:
        meta, q, k_cache, v_cache, k, v = _paged_batch(
            extend_lens, prefix_lens, device, dtype, heads
        )
        backend.store_kv(k_cache, v_cache, meta.slots, k, v)
        outs = [backend.extend_attention(q, k_cache, v_cache, meta, scale)]
        ref = attention_ref.extend_attention_ref(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens_cpu, meta.extend_lens_cpu, scale
        )
        if meta.is_decode:
            outs.append(backend.decode_attention(q, k_cache, v_cache, meta, scale))
        for out in outs:
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= tol * ref.float().abs().max().item(), (name, extend_lens, err)
