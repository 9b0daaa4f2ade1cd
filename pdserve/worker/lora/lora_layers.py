"""LoRA applied to a batch that mixes adapters: the segmented (grouped-by-adapter) matmuls the
model's projections call, over the device slots of `lora_weights.LoraWeights`.

For each target projection, rows t of the batch whose request uses slot s get
    out[t, cols] += (x[t] @ A[s]^T) @ B[s]^T        (the scale is folded into B at load time)
Rows are grouped by slot into segments (`LoraBatch`), cut into tiles of at most TILE_ROWS rows of
one slot for the Triton kernels (`pdserve/kernels/triton_lora.py`).

Folded (the model's weights adopted, and at most FOLD_MAX_ROW_SLOTS rows x slots: every decode
step): `LoraBatch.linear` runs one matmul over the fused weight [W; A of every slot], whose first
`out` columns are the base output and the rest every slot's shrink, then one expand launch adds
each row's slot's part times B into the first columns in place; the result is that row-strided
[T, out] view (every consumer takes row strides). On CPU the same matmul runs, and
`folded_expand_ref` is the expand.
Split (`weights.fold` False, or a long prefill): the base matmul, then shrink and expand launches per projection, or
`segmented_lora_ref` per sub-module: x [T, in], out [T, out] (a column slice of the fused output,
updated in place), a [S, R, in], b [S, out, R], sorted_rows [T_lora] int64, seg_starts / seg_slots
(host lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.worker.device_copy import to_device
from pdserve.worker.lora.lora_weights import LoraWeights, fused_slices

if TYPE_CHECKING:
    from pdserve.kernels.triton_lora import LoraTiles

Tensor = torch.Tensor

TILE_ROWS = 16  # rows of one slot per kernel tile (the kernels' BLOCK_M)
# Folded only while rows x slots stays below this: the fused matmul computes every slot's shrink
# for every row, free while the matmul is bound by reading weights (decode), wasted compute for a
# long prefill, where the split path's two launches per projection cost little beside the matmul.
FOLD_MAX_ROW_SLOTS = 16384

__all__ = ["LoraBatch", "LoraGraphInputs", "LoraWeights", "fused_slices"]


@dataclass
class LoraBatch:
    """One forward pass's rows grouped by adapter slot; rows of the base model are left out."""

    weights: LoraWeights
    rows: list[int]  # [T_lora]: row indices in T, grouped by slot
    seg_starts: list[int]  # [num_segments + 1]: segment k is rows[seg_starts[k]:..[k+1]]
    seg_slots: list[int]  # [num_segments]: the slot of each segment
    device: torch.device
    # The kernels' index on CUDA: built on first use, or a CUDA graph's static one.
    tiles: LoraTiles | None = None
    sorted_rows: Tensor | None = None  # [T_lora] int64, device: the reference's, on first use
    use_kernels: bool = True  # False: the torch reference even on CUDA (checks, benchmarks)

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
        return cls(weights, rows, starts, slots, device)

    def linear(self, layer_idx: int, proj: str, module: nn.Linear, x: Tensor) -> Tensor:
        """module(x) [T, out] with the adapters' deltas of every target module fused into
        projection `proj` added; x: [T, in]. Folded: a row-strided view of the fused output."""
        w = self.weights
        if not w.slices[proj]:
            return module(x)
        if not w.fold or x.shape[0] * w.num_slots > FOLD_MAX_ROW_SLOTS:
            out = module(x)
            self.apply(layer_idx, proj, x, out)
            return out
        fused = F.linear(x, w.fused_w[proj][layer_idx], w.fused_bias[proj][layer_idx])
        n_out = w.out_features[proj]
        out, shrunk = fused[:, :n_out], fused[:, n_out:]  # [T, out], [T, S n_sub R]
        b = w.fused_b[proj][layer_idx]  # [S, out, R]
        if self.use_kernels and self.device.type == "cuda":
            from pdserve.kernels.triton_lora import lora_expand_folded

            lora_expand_folded(shrunk, b, out, self._tiles(), w.bounds[proj], TILE_ROWS)
        else:
            rows = self._sorted_rows()
            folded_expand_ref(shrunk, out, b, w.bounds[proj], rows, self.seg_starts, self.seg_slots)
        return out

    def apply(self, layer_idx: int, proj: str, x: Tensor, out: Tensor) -> None:
        """Add the adapters' deltas to `out` ([T, out_total], the projection's output) in place
        for every target module fused into projection `proj`; x: [T, in] its input."""
        w = self.weights
        if not w.slices[proj]:
            return
        if self.use_kernels and self.device.type == "cuda":
            from pdserve.kernels.triton_lora import segmented_lora

            x = x if x.stride(-1) == 1 else x.contiguous()
            a, b = w.fused_a[proj][layer_idx], w.fused_b[proj][layer_idx]
            segmented_lora(x, out, a, b, self._tiles(), w.bounds[proj], TILE_ROWS)
            return
        rows = self._sorted_rows()
        for module, col, size in w.slices[proj]:
            segmented_lora_ref(
                x,
                out[:, col : col + size],
                w.a[module][layer_idx],
                w.b[module][layer_idx],
                rows,
                self.seg_starts,
                self.seg_slots,
            )

    def _sorted_rows(self) -> Tensor:
        if self.sorted_rows is None:
            self.sorted_rows = to_device(torch.tensor(self.rows, dtype=torch.int64), self.device)
        return self.sorted_rows

    def _tiles(self) -> LoraTiles:
        if self.tiles is None:
            num_tiles = len(tile_list(self.seg_starts, self.seg_slots))
            packed = to_device(pack_tiles(self, len(self.rows), num_tiles), self.device)
            self.tiles = tiles_view(packed, len(self.rows), num_tiles, num_tiles)
        return self.tiles


def tile_list(seg_starts: list[int], seg_slots: list[int]) -> list[tuple[int, int, int]]:
    """(start in rows, length, slot) of each tile: every segment cut into TILE_ROWS pieces."""
    return [
        (start, min(TILE_ROWS, seg_starts[k + 1] - start), slot)
        for k, slot in enumerate(seg_slots)
        for start in range(seg_starts[k], seg_starts[k + 1], TILE_ROWS)
    ]


def max_tiles(num_rows: int, num_slots: int) -> int:
    """The most tiles `num_rows` rows in at most `num_slots` segments can make."""
    return min(num_rows, -(-num_rows // TILE_ROWS) + num_slots)


def pack_tiles(lora: LoraBatch | None, rows_cap: int, tiles_cap: int) -> Tensor:
    """[rows_cap + 3 tiles_cap] int32, cpu: rows, then tile starts, lengths and slots; tiles
    past the batch's have slot -1 (their programs return at once)."""
    tiles = tile_list(lora.seg_starts, lora.seg_slots) if lora is not None else []
    rows = lora.rows if lora is not None else []
    if len(rows) > rows_cap or len(tiles) > tiles_cap:
        raise ValueError(
            f"{len(rows)} LoRA rows in {len(tiles)} tiles do not fit a buffer of {rows_cap} "
            f"rows and {tiles_cap} tiles"
        )
    packed = torch.zeros(rows_cap + 3 * tiles_cap, dtype=torch.int32)
    packed[: len(rows)] = torch.tensor(rows, dtype=torch.int32)
    table = packed[rows_cap:].view(3, tiles_cap)  # starts, lengths, slots
    table[2].fill_(-1)
    if tiles:
        table[:, : len(tiles)] = torch.tensor(tiles, dtype=torch.int32).T
    return packed


def tiles_view(packed: Tensor, rows_cap: int, tiles_cap: int, num_tiles: int) -> LoraTiles:
    """The kernels' LoraTiles inside a packed buffer (on the device), covering its first
    `num_tiles` tiles: the launch grid."""
    from pdserve.kernels.triton_lora import LoraTiles

    table = packed[rows_cap:].view(3, tiles_cap)[:, :num_tiles]
    return LoraTiles(packed[:rows_cap], table[0], table[1], table[2])


class LoraGraphInputs:
    """The static LoRA index CUDA graphs read: the largest bucket's rows and tiles. A graph of
    batch size bs launches max_tiles(bs, S) tiles; `load` writes a batch's tiles at the front
    and marks the rest empty."""

    def __init__(self, weights: LoraWeights, max_batch: int, device: torch.device) -> None:
        self.weights = weights
        self.device = device
        self.rows_cap = max_batch
        self.tiles_cap = max_tiles(max_batch, weights.num_slots)
        self.packed = pack_tiles(None, self.rows_cap, self.tiles_cap).to(device)

    def batch(self, bs: int) -> LoraBatch:
        """What a graph of batch size bs is captured on (every tile empty until `load`)."""
        num_tiles = max_tiles(bs, self.weights.num_slots)
        tiles = tiles_view(self.packed, self.rows_cap, self.tiles_cap, num_tiles)
        return LoraBatch(self.weights, [], [0], [], self.device, tiles=tiles)

    def load(self, lora: LoraBatch) -> None:
        self.packed.copy_(pack_tiles(lora, self.rows_cap, self.tiles_cap))


def lora_shrink_ref(
    x: Tensor,  # [T, in]
    a: Tensor,  # [S, R, in]
    sorted_rows: Tensor,  # [T_lora] int64
    seg_starts: list[int],  # [num_segments + 1]
    seg_slots: list[int],  # [num_segments]
) -> Tensor:  # [T, R] in x's dtype: x[t] @ a[slot(t)]^T; zero on rows in no segment
    y = x.new_zeros(x.shape[0], a.shape[1])
    for k, slot in enumerate(seg_slots):
        rows = sorted_rows[seg_starts[k] : seg_starts[k + 1]]  # [n]
        y.index_copy_(0, rows, x.index_select(0, rows) @ a[slot].T)  # [n, R]
    return y


def lora_expand_ref(
    y: Tensor,  # [T, R]
    out: Tensor,  # [T, out], may be a column slice; updated in place
    b: Tensor,  # [S, out, R]
    sorted_rows: Tensor,
    seg_starts: list[int],
    seg_slots: list[int],
) -> None:
    """out[t] += y[t] @ b[slot(t)]^T on every row of a segment."""
    for k, slot in enumerate(seg_slots):
        rows = sorted_rows[seg_starts[k] : seg_starts[k + 1]]  # [n]
        delta = y.index_select(0, rows) @ b[slot].T  # [n, out]
        out.index_add_(0, rows, delta.to(out.dtype))


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
    y = lora_shrink_ref(x, a, sorted_rows, seg_starts, seg_slots)
    lora_expand_ref(y, out, b, sorted_rows, seg_starts, seg_slots)


def folded_expand_ref(
    shrunk: Tensor,  # [T, S n_sub R]: every slot's x @ A^T, a column slice of the fused output
    out: Tensor,  # [T, out]: the fused output's first columns, updated in place
    b: Tensor,  # [S, out, R]
    bounds: tuple[int, ...],  # first output column of sub-modules 1..n_sub-1
    sorted_rows: Tensor,  # [T_lora] int64
    seg_starts: list[int],  # [num_segments + 1]
    seg_slots: list[int],  # [num_segments]
) -> None:
    """The torch reference of `lora_expand_folded`: out[t, cols_k] += (row t's slot's shrink of
    sub-module k) @ B_k[slot]^T for every row of a segment."""
    num_slots, n_out, rank = b.shape
    n_sub = len(bounds) + 1
    cols = (0, *bounds, n_out)
    for k, slot in enumerate(seg_slots):
        rows = sorted_rows[seg_starts[k] : seg_starts[k + 1]]  # [n]
        ys = shrunk.index_select(0, rows).view(-1, num_slots, n_sub, rank)[:, slot]  # [n, n_sub, R]
        delta = torch.cat(
            [ys[:, j] @ b[slot, cols[j] : cols[j + 1]].T for j in range(n_sub)], dim=1
        )  # [n, out]
        out.index_add_(0, rows, delta.to(out.dtype))
