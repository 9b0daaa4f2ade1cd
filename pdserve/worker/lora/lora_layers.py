"""LoRA applied to a batch that mixes adapters: device slots for adapter weights, and the
segmented (grouped-by-adapter) matmuls the model's projections call.

For each target projection, rows t of the batch whose request uses slot s get
    out[t, cols] += (x[t] @ A[s]^T) @ B[s]^T        (the scale is folded into B at load time)
Rows are grouped by slot into segments (`LoraBatch`); `segmented_lora_ref` is the plain torch
reference ("shrink" x @ A^T to rank R, "expand" by B^T) that a Triton SGMV kernel can replace with
the same arguments: x [T, in], out [T, out] (a column slice of the fused output, updated in place),
a [S, R, in], b [S, out, R], sorted_rows [T_lora] int64, seg_starts / seg_slots (host lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.lora.adapter import LoraAdapter, module_shapes

Tensor = torch.Tensor


def fused_slices(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """pdserve's fused projection -> [(PEFT module, first output column)] inside its output."""
    shapes = module_shapes(config)
    q_size, kv_size = shapes["q_proj"][1], shapes["k_proj"][1]
    inter = config.intermediate_size
    return {
        "qkv_proj": [("q_proj", 0), ("k_proj", q_size), ("v_proj", q_size + kv_size)],
        "o_proj": [("o_proj", 0)],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", inter)],
        "down_proj": [("down_proj", 0)],
    }


class LoraWeights:
    """Preallocated adapter slots on the device, per target module:
    a[module]: [L, S, R, in], b[module]: [L, S, out, R] (model dtype; S = max_loras_per_batch,
    R = max_lora_rank). A smaller rank is zero-padded, which adds nothing to the product."""

    def __init__(
        self,
        config: ModelConfig,
        target_modules: tuple[str, ...],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shapes = module_shapes(config)
        self.num_layers = config.num_layers
        self.max_rank = max_rank
        self.target_modules = target_modules
        L, S, R = config.num_layers, num_slots, max_rank  # noqa: N806
        self.a = {
            m: torch.zeros(L, S, R, shapes[m][0], dtype=dtype, device=device)
            for m in target_modules
        }
        self.b = {
            m: torch.zeros(L, S, shapes[m][1], R, dtype=dtype, device=device)
            for m in target_modules
        }
        self.slices = {
            proj: [(m, col, shapes[m][1]) for m, col in subs if m in target_modules]
            for proj, subs in fused_slices(config).items()
        }

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy an adapter's host weights into `slot`, zeroing what it does not adapt."""
        for module in self.target_modules:
            self.a[module][:, slot].zero_()
            self.b[module][:, slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            r = a.shape[0]
            self.a[module][layer, slot, :r].copy_(a)  # [r, in]
            self.b[module][layer, slot, :, :r].copy_(b)  # [out, r]


@dataclass
class LoraBatch:
    """One forward pass's rows grouped by adapter slot; rows of the base model are left out."""

    weights: LoraWeights
    sorted_rows: Tensor  # [T_lora] int64, device: row indices in T, grouped by slot
    seg_starts: list[int]  # [num_segments + 1]: segment k is sorted_rows[seg_starts[k]:..[k+1]]
    seg_slots: list[int]  # [num_segments]: the slot of each segment

    @classmethod
    def build(
        cls, weights: LoraWeights, row_slots: list[int], device: torch.device
    ) -> LoraBatch | None:
        """From each row's slot (-1: base model); None when no row uses an adapter."""
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if slot >= 0:
                groups.setdefault(slot, []).append(row)
        if not groups:
            return None
        rows: list[int] = []
        starts, slots = [0], []
        for slot, slot_rows in sorted(groups.items()):
            rows.extend(slot_rows)
            starts.append(len(rows))
            slots.append(slot)
        sorted_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        return cls(weights, sorted_rows, starts, slots)

    def apply(self, layer_idx: int, proj: str, x: Tensor, out: Tensor) -> None:
        """Add the adapters' deltas to `out` ([T, out_total], the projection's output) in place
        for every target module fused into projection `proj`; x: [T, in] its input."""
        w = self.weights
        for module, col, size in w.slices[proj]:
            segmented_lora_ref(
                x,
                out[:, col : col + size],
                w.a[module][layer_idx],
                w.b[module][layer_idx],
                self.sorted_rows,
                self.seg_starts,
                self.seg_slots,
            )


def segmented_lora_ref(
    x: Tensor,  # [T, in]
    out: Tensor,  # [T, out], may be a column slice; updated in place
    a: Tensor,  # [S, R, in]
    b: Tensor,  # [S, out, R]
    sorted_rows: Tensor,  # [T_lora] int64
    seg_starts: list[int],  # [num_segments + 1]
    seg_slots: list[int],  # [num_segments]
) -> None:
    """The torch reference of a segmented LoRA matmul (shrink then expand, per segment)."""
    for k, slot in enumerate(seg_slots):
        rows = sorted_rows[seg_starts[k] : seg_starts[k + 1]]  # [n]
        xs = x.index_select(0, rows)  # [n, in]
        delta = (xs @ a[slot].T) @ b[slot].T  # [n, R] -> [n, out]
        out.index_add_(0, rows, delta.to(out.dtype))
