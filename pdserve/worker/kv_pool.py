"""The paged KV pool of one worker: one tensor, so it can be shared (CUDA IPC) and moved in bulk."""

from __future__ import annotations

import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup


class KVPool:
    """buffer: [num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim].

    Page 0 is never handed out by the allocator: padded page-table entries point at it, so stray
    writes of padded (CUDA graph) slots land somewhere harmless. With tensor parallelism a rank's
    pool holds only its KV heads (TPGroup.kv_heads).
    """

    def __init__(
        self,
        model: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tp: TPGroup = SINGLE,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = model.num_layers
        self.buffer = torch.zeros(
            (model.num_layers, 2, num_pages, page_size, _local_kv_heads(model, tp), model.head_dim),
            dtype=dtype,
            device=device,
        )

    def k(self, layer: int) -> torch.Tensor:  # [num_pages, page_size, Hkv, D]
        return self.buffer[layer, 0]

    def v(self, layer: int) -> torch.Tensor:  # [num_pages, page_size, Hkv, D]
        return self.buffer[layer, 1]

    @property
    def bytes_per_page(self) -> int:
        return self.buffer[:, :, 0].numel() * self.buffer.element_size()

    @staticmethod
    def bytes_per_page_for(
        model: ModelConfig, page_size: int, dtype: torch.dtype, tp: TPGroup = SINGLE
    ) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        heads = _local_kv_heads(model, tp)
        return model.num_layers * 2 * page_size * heads * model.head_dim * elem


def _local_kv_heads(model: ModelConfig, tp: TPGroup) -> int:
    return tp.kv_heads(model.num_kv_heads).size
