"""Attention backend dispatch: the model calls these three operations, the backend name picks who
runs them. Backends are imported only when chosen, so CPU processes never load triton or flashinfer.

Every backend has these signatures (attention_ref.py is the numerical contract):
  store_kv(k_cache, v_cache, slots, k, v) -> None
  extend_attention(q, k_cache, v_cache, meta, scale, out=None) -> out   # ragged new tokens
  decode_attention(q, k_cache, v_cache, meta, scale, out=None) -> out   # one new token each
where `meta` is the batch's AttentionMetadata (the worker's ForwardBatch is one) and `out`, when
given, is the [T, Hq, D] tensor the result is written into (the piecewise CUDA graphs' static
buffer, worker/piecewise_graphs.py).

| name       | store_kv   | extend                 | decode                        | CUDA graphs |
|------------|------------|------------------------|-------------------------------|-------------|
| torch      | index put  | attention_ref (loops)  | attention_ref (host sync)     | no          |
| triton     | index put  | triton_extend_attention| triton_decode_attention       | yes         |
| flashinfer | index put  | triton (see below)     | FlashInfer paged decode (NHD) | no          |

FlashInfer serves decode only: its wrapper is planned on the host once per batch, which neither the
ragged extend path (Triton's kernel needs no plan) nor a captured CUDA graph (the plan would have to
be redone outside the graph before each replay) wants. With the flashinfer backend the worker runs
decode eagerly; head sizes or dtypes FlashInfer does not build (anything but fp16/bf16 with
head_dim 64, 128 or 256) fall back to the Triton decode kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class AttentionMetadata(Protocol):
    """What a backend reads of the batch; `pdserve.worker.forward_batch.ForwardBatch` has it all."""

    is_decode: bool
    page_table: torch.Tensor  # [B, max_pages] int32, device
    seq_lens: torch.Tensor  # [B] int32, device: KV length after this step
    seq_lens_cpu: list[int]  # [B]
    extend_lens_cpu: list[int]  # [B]
    extend_lens: torch.Tensor | None  # [B] int32, device
    extend_starts: torch.Tensor | None  # [B] int32, device: exclusive cumsum of extend_lens
    max_extend_len: int | None  # host max of extend_lens
    max_seq_len: int | None  # host bound on seq_lens (picks the decode split count)
    page_table_cpu: torch.Tensor | None  # [B, max_pages] int32, cpu
    # (sequences at the batch's head adding one token each, their longest KV length)
    leading_decodes: tuple[int, int]


StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (q, k_cache, v_cache, meta, scale, out=None) -> out
Attention = Callable[..., torch.Tensor]


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """result, or out holding a copy of it (backends whose kernels take no output tensor)."""
    if out is None:
        return result
    out.copy_(result)
    return out


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: StoreKV
    extend_attention: Attention  # prefill/extend: q [T, Hq, D] -> [T, Hq, D]
    decode_attention: Attention  # one new token per sequence: q [B, Hq, D] -> [B, Hq, D]
    use_triton_kernels: bool  # the model's norms, rotary and activation run as Triton kernels
    supports_cuda_graph: bool  # decode has no host sync and no host-side planning
    # decode_attention(..., new=attention_ref.NewToken) does a decode batch's rotary and new-token
    # KV store too (q and new.k not rotated yet). False: the model runs rotary + store first.
    decode_takes_new_token: bool = False


# --------------------------------------------------------------------------- torch


def _torch_backend() -> AttentionBackend:
    from pdserve.kernels import attention_ref

    def extend(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tree_mask = getattr(meta, "tree_mask", None)  # speculative tree verification
        if tree_mask is not None:
            from pdserve.kernels.tree_attention_ref import tree_extend_attention_ref

            return _into(out, tree_extend_attention_ref(
                q, k_cache, v_cache, meta.page_table, meta.seq_lens_cpu, meta.extend_lens_cpu,
                meta.tree_starts, tree_mask, scale,
            ))  # fmt: skip
        return _into(out, attention_ref.extend_attention_ref(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens_cpu, meta.extend_lens_cpu, scale
        ))  # fmt: skip

    def decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        new: attention_ref.NewToken | None = None,
    ) -> torch.Tensor:
        if new is not None:
            return _into(out, attention_ref.decode_with_new_token_ref(
                q, k_cache, v_cache, meta.page_table, meta.seq_lens, scale, new
            ))  # fmt: skip
        return _into(out, attention_ref.decode_attention_ref(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens, scale
        ))  # fmt: skip

    return AttentionBackend(
        name="torch",
        store_kv=attention_ref.store_kv,
        extend_attention=extend,
        decode_attention=decode,
        use_triton_kernels=False,
        supports_cuda_graph=False,
        decode_takes_new_token=True,
    )


# --------------------------------------------------------------------------- triton


def _import_triton_attention(name: str) -> tuple[Any, Any]:
    try:
        from pdserve.kernels import triton_decode_attention, triton_extend_attention
    except ImportError as e:
        raise ValueError(
            f"attention_backend={name!r} needs the triton package (pip install 'pdserve[gpu]'): {e}"
        ) from e
    return triton_extend_attention, triton_decode_attention


def _triton_extend(ext: Any, dec: Any) -> Attention:
    """The extend kernel; a mixed batch's leading one-token rows (decodes: the scheduler puts
    them first) go to the decode kernel instead. The extend kernel gives each query block of
    BLOCK_M rows and each query head a program, so a decode row there used 1 of its 128 rows
    and read its KV once per query head: a step with 64 such rows beside one 1,024-token chunk
    spent 290 us a layer in it on the H200."""

    def extend(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tree_mask = getattr(meta, "tree_mask", None)  # speculative tree verification
        if tree_mask is not None:
            from pdserve.kernels.triton_tree_attention import tree_attention

            return _into(out, tree_attention(
                q, k_cache, v_cache, meta.page_table, meta.seq_lens_cpu, meta.extend_lens_cpu,
                meta.tree_starts, tree_mask, scale,
            ))  # fmt: skip
        d, max_decode_len = meta.leading_decodes  # rows 0..d-1 of q: sequences 0..d-1
        if d == 0:
            return ext.extend_attention(
                q, k_cache, v_cache, meta.page_table, meta.seq_lens, meta.extend_lens,
                meta.extend_starts, meta.max_extend_len, scale, out=out,
            )  # fmt: skip
        if out is None:
            out = torch.empty_like(q)  # [T, Hq, D]
        dec.decode_attention(
            q[:d], k_cache, v_cache, meta.page_table[:d], meta.seq_lens[:d], scale,
            out=out[:d], max_seq_len=max_decode_len,
        )  # fmt: skip
        # The rest in the extend kernel, by sequence index (slices of the metadata would start
        # at addresses of changing alignment, each a new compile of the kernel).
        ext.extend_attention(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens, meta.extend_lens,
            meta.extend_starts, meta.max_extend_len, scale, out=out, first_seq=d,
        )  # fmt: skip
        return out

    return extend


def _triton_decode(dec: Any) -> Attention:
    def decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        new: Any = None,  # attention_ref.NewToken
    ) -> torch.Tensor:
        # max_seq_len is a host int: inside a CUDA graph it is the graph's fixed bound, so the split
        # count (a launch parameter) stays the one captured.
        return dec.decode_attention(
            q, k_cache, v_cache, meta.page_table, meta.seq_lens, scale, out=out,
            max_seq_len=meta.max_seq_len, new_token=new,
        )  # fmt: skip

    return decode


# The Triton decode kernel does the rotary and the new token's KV store itself (one launch a layer
# fewer). Measured on an H200 (docs/BENCHMARKS.md, eleventh session): Llama-1B batch 1 1.10 vs
# 1.13 ms a step, 8B 4.61 vs 4.67; batch 64 x 1,024 CUDA time 1.70 vs 1.72 ms. False restores the
# separate rotary + store kernel (benchmarks may set it before building an engine).
TRITON_FUSED_DECODE = True


def _triton_backend() -> AttentionBackend:
    from pdserve.kernels import attention_ref

    ext, dec = _import_triton_attention("triton")
    return AttentionBackend(
        name="triton",
        store_kv=attention_ref.store_kv,  # an index put: no host sync, capturable
        extend_attention=_triton_extend(ext, dec),
        decode_attention=_triton_decode(dec),
        use_triton_kernels=True,
        supports_cuda_graph=True,
        decode_takes_new_token=TRITON_FUSED_DECODE,
    )


# --------------------------------------------------------------------------- flashinfer

_FLASHINFER_HEAD_DIMS = (64, 128, 256)
_FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
_FLASHINFER_WORKSPACE_BYTES = 128 << 20


class _FlashInferDecode:
    """FlashInfer's paged decode over the pool's [num_pages, page_size, Hkv, D] ("NHD") layout.

    The wrapper is planned on the first layer's call of each batch (the batch object identifies
    the forward pass) and run by every layer after that.
    """

    def __init__(self, flashinfer: Any, fallback: Attention) -> None:
        self._flashinfer = flashinfer
        self._fallback = fallback
        self._wrappers: dict[tuple[torch.device, bool], Any] = {}
        self._workspace: torch.Tensor | None = None  # [128 MiB] uint8, device
        self._wrapper: Any = None
        self._planned_for: AttentionMetadata | None = None  # held, so its id is never reused

    def __call__(
        self,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [B, Hq, D]
    ) -> torch.Tensor:  # [B, Hq, D]
        if q.shape[-1] not in _FLASHINFER_HEAD_DIMS or q.dtype not in _FLASHINFER_DTYPES:
            return self._fallback(q, k_cache, v_cache, meta, scale, out=out)
        if self._planned_for is not meta:
            self._plan(q, k_cache, meta, scale)
            self._planned_for = meta
        return _into(out, self._wrapper.run(q.contiguous(), (k_cache, v_cache)))

    def _get_wrapper(self, device: torch.device, use_tensor_cores: bool) -> Any:
        key = (device, use_tensor_cores)
        if key not in self._wrappers:
            if self._workspace is None:
                self._workspace = torch.empty(
                    _FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device
                )
            self._wrappers[key] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_tensor_cores=use_tensor_cores
            )
        return self._wrappers[key]

    def _plan(
        self, q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> None:
        num_q_heads, head_dim = q.shape[1], q.shape[2]
        page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        seq_lens = torch.tensor(meta.seq_lens_cpu, dtype=torch.int32)  # [B], cpu
        num_pages = (seq_lens + page_size - 1) // page_size  # [B]
        indptr = torch.zeros(len(meta.seq_lens_cpu) + 1, dtype=torch.int32)  # [B + 1]
        indptr[1:] = num_pages.cumsum(0)
        last_page_len = seq_lens - (num_pages - 1) * page_size  # [B], in [1, page_size]
        table = meta.page_table_cpu
        if table is None:  # a hand-built batch: one sync to read its table
            table = meta.page_table.cpu()
        used = torch.arange(table.shape[1])[None, :] < num_pages[:, None]  # [B, max_pages]
        indices = table[used].to(torch.int32)  # [sum(num_pages)], row-major = sequence order
        # Tensor cores pay off once several query heads share a KV head (as in SGLang).
        wrapper = self._get_wrapper(q.device, num_q_heads // num_kv_heads >= 4)
        # Host tensors: plan reads them on the host and copies them to the device itself.
        wrapper.plan(
            indptr,
            indices,
            last_page_len,
            num_q_heads,
            num_kv_heads,
            head_dim,
            page_size,
            pos_encoding_mode="NONE",
            q_data_type=q.dtype,
            kv_data_type=k_cache.dtype,
            sm_scale=scale,
        )
        self._wrapper = wrapper


def _flashinfer_backend() -> AttentionBackend:
    from pdserve.kernels import attention_ref

    try:
        import flashinfer
    except ImportError as e:
        raise ValueError(
            "attention_backend='flashinfer' needs the flashinfer package "
            f"(pip install flashinfer-python): {e}"
        ) from e
    ext, dec = _import_triton_attention("flashinfer")
    return AttentionBackend(
        name="flashinfer",
        store_kv=attention_ref.store_kv,
        extend_attention=_triton_extend(ext, dec),
        decode_attention=_FlashInferDecode(flashinfer, fallback=_triton_decode(dec)),
        use_triton_kernels=True,
        supports_cuda_graph=False,
    )


# name -> builder; a builder does its own (lazy) imports.
_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "flashinfer": _flashinfer_backend,
}


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend called `name`; ValueError for an unknown name or a package that is missing."""
    builder = _BACKENDS.get(name)
    if builder is None:
        raise ValueError(
            f"attention_backend={name!r} is not available: expected one of {sorted(_BACKENDS)}"
        )
    return builder()
