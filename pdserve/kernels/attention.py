"""Attention backend dispatch: the model calls these three operations, the backend name picks who
runs them. Backends are imported only when chosen, so CPU processes never load triton or flashinfer.

Every backend has the torch reference's signatures (attention_ref.py is the contract):
  store_kv(k_cache, v_cache, slots, k, v) -> None
  extend_attention(q, k_cache, v_cache, page_table, seq_lens_cpu, extend_lens_cpu, scale) -> out
  decode_attention(q, k_cache, v_cache, page_table, seq_lens, scale) -> out
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
ExtendAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], float],
    torch.Tensor,
]
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: StoreKV
    extend_attention: ExtendAttention  # prefill/extend: ragged new tokens over cached prefixes
    decode_attention: DecodeAttention  # one new token per sequence


def _torch_backend() -> AttentionBackend:
    from pdserve.kernels import attention_ref

    return AttentionBackend(
        name="torch",
        store_kv=attention_ref.store_kv,
        extend_attention=attention_ref.extend_attention_ref,
        decode_attention=attention_ref.decode_attention_ref,
    )


# name -> builder; a builder does its own (lazy) imports.
_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": _torch_backend,
}


def get_attention_backend(name: str) -> AttentionBackend:
    builder = _BACKENDS.get(name)
    if builder is None:
        raise ValueError(
            f"attention_backend={name!r} is not available: expected one of {sorted(_BACKENDS)}"
        )
    return builder()
