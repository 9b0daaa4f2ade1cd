"""Triton segmented LoRA matmuls (S-LoRA / Punica SGMV): "shrink" x @ A^T to the rank, then
"expand" by B^T added into the projection's output, for a batch whose rows use different adapters.

Rows are grouped by adapter slot (`rows`, sorted by slot) and cut into tiles of at most
`tile_rows` rows of one slot; a tile is (start in `rows`, length, slot) and slot -1 is an empty
tile whose programs return at once. The grid covers a fixed number of tiles, so a CUDA graph can
capture it with the tiles as a static input. One launch covers every sub-module of a fused
projection (q/k/v or gate/up): A is stacked along the rank ([S, n_sub R, in]), B along the fused
output columns ([S, out, R]); sub-module k owns columns [bounds[k], bounds[k+1]) and ranks
[k R, (k+1) R). Shrink splits the reduction over `in` into partial sums that expand adds up, so a
decode step of a few rows per adapter still fills the GPU without atomics.

Folded projections (pdserve/worker/lora/lora_weights.py) need no shrink: the projection's own
matmul over [W; every slot's A] gives each row every slot's shrink in its columns past `out`, and
`lora_expand_folded` adds the row's slot's part times B into the first columns in place, so a
LoRA'd projection costs one launch beside its matmul instead of two.

The torch references are in `pdserve.worker.lora.lora_layers`: `segmented_lora_ref` (its halves
`lora_shrink_ref` and `lora_expand_ref`), applied per sub-module, and `folded_expand_ref`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import cdiv, next_power_of_2

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK_K = 128
# Shrink's reduction per program and its most splits (the split path; a sweep in lora_bench.py
# found them fastest on the H200).
_K_PER_SPLIT_TARGET = 512
_MAX_SPLITS = 16
_EXPAND_BLOCK_N = 128


class LoraTiles(NamedTuple):
    """Which rows each program handles; int32, on the device of x."""

    rows: torch.Tensor  # [>= T_lora]: row indices of x/out, grouped by slot
    tile_start: torch.Tensor  # [num_tiles]: a tile's first entry in `rows`
    tile_len: torch.Tensor  # [num_tiles]: 1..tile_rows
    tile_slot: torch.Tensor  # [num_tiles]: adapter slot; -1: empty tile


@triton.jit
def _load_tile(rows_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M: tl.constexpr):
    """The tile's row indices [BLOCK_M] int64 and their mask."""
    start = tl.load(tile_start_ptr + tile)
    num = tl.load(tile_len_ptr + tile)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < num
    rows = tl.load(rows_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    return rows, mask_m


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [S, NY, K]
    y_ptr,  # [num_splits, T, NY] float32
    rows_ptr,
    tile_start_ptr,
    tile_len_ptr,
    tile_slot_ptr,
    K,
    NY,
    k_per_split,
    stride_xt,
    stride_as,
    stride_an,
    stride_ys,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile)
    if slot < 0:
        return
    rows, mask_m = _load_tile(rows_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NY
    split = tl.program_id(2)
    k_lo = split * k_per_split
    x_rows = x_ptr + rows[:, None] * stride_xt  # [BLOCK_M, 1]
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_n[:, None] * stride_an  # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):  # the last split's tail is masked off
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xb = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ab = tl.load(a_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(xb, tl.trans(ab), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + split * stride_ys + rows[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _expand_kernel(
    y_ptr,  # [num_splits, T, N_SUB * R] float32 (split), or [T, S N_SUB R] (folded)
    b_ptr,  # [S, N, R]
    out_ptr,  # [T, N], updated in place
    rows_ptr,
    tile_start_ptr,
    tile_len_ptr,
    tile_slot_ptr,
    N,
    R,
    bound1,  # sub-module 1's first column (N when N_SUB == 1)
    bound2,  # sub-module 2's first column (N when N_SUB <= 2)
    stride_ys,
    stride_yt,
    stride_yslot,  # 0: y holds each row's own slot (split); N_SUB R: every slot's (folded)
    stride_bs,
    stride_bn,
    stride_ot,
    NUM_SPLITS: tl.constexpr,
    N_SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile)
    if slot < 0:
        return
    rows, mask_m = _load_tile(rows_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None]
    bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
    y_mask = mask_m[:, None] & mask_r[None, :]
    y_ptr += slot.to(tl.int64) * stride_yslot
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(N_SUB):
        lo = 0
        hi = bound1
        if k == 1:
            lo = bound1
            hi = bound2
        if k == 2:
            lo = bound2
            hi = N
        y_ptrs = y_ptr + rows[:, None] * stride_yt + (k * R + offs_r)[None, :]
        ys = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            ys += tl.load(y_ptrs + s * stride_ys, mask=y_mask, other=0.0)
        in_k = (offs_n >= lo) & (offs_n < hi)
        bk = tl.where(in_k[None, :], bt, 0.0).to(bt.dtype)  # [BLOCK_R, BLOCK_N], sub k's columns
        acc += tl.dot(ys.to(bt.dtype), bk, input_precision=DOT_PRECISION)
    o_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :]
    o_mask = mask_m[:, None] & mask_n[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + acc).to(o.dtype), mask=o_mask)


def _check_tiles(tiles: LoraTiles, device: torch.device) -> None:
    n = tiles.tile_start.shape[0]
    for name, t in tiles._asdict().items():
        if t.dtype != torch.int32 or t.dim() != 1 or t.stride(0) != 1 or t.device != device:
            raise ValueError(
                f"{name} must be a contiguous 1-D int32 tensor on {device}, got "
                f"{tuple(t.shape)} {t.dtype} on {t.device}"
            )
        if name != "rows" and t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} tiles, tile_start {n}")


def _check(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for t in (out, a, b)):
        raise ValueError(
            f"x, out, a, b must share one of {_DTYPES}: got {x.dtype}, {out.dtype}, "
            f"{a.dtype}, {b.dtype}"
        )
    if x.dim() != 2 or out.dim() != 2 or a.dim() != 3 or b.dim() != 3:
        raise ValueError(
            f"expected x [T, in], out [T, out], a [S, n_sub R, in], b [S, out, R]: got "
            f"{tuple(x.shape)}, {tuple(out.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    num_slots, ny, in_f = a.shape
    if (
        out.shape[0] != x.shape[0]
        or in_f != x.shape[1]
        or b.shape[:2] != (num_slots, out.shape[1])
        or ny % b.shape[2] != 0
    ):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, out {tuple(out.shape)}, "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    for name, t in (("x", x), ("out", out), ("a", a), ("b", b)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous: strides {t.stride()}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _num_splits(in_f: int) -> tuple[int, int]:
    """(num_splits, k_per_split) of shrink's reduction over in_f (k_per_split a BLOCK_K multiple)."""
    splits = max(1, min(_MAX_SPLITS, cdiv(in_f, _K_PER_SPLIT_TARGET)))
    k_per_split = cdiv(cdiv(in_f, splits), _BLOCK_K) * _BLOCK_K
    return cdiv(in_f, k_per_split), k_per_split


def lora_shrink(x: torch.Tensor, a: torch.Tensor, tiles: LoraTiles, tile_rows: int) -> torch.Tensor:
    """y[s, t] with sum over s = x[t] @ a[slot(t)]^T for every row t of a tile, float32
    [num_splits, T, NY]; rows outside the tiles are left unwritten. x [T, in], a [S, NY, in]."""
    num_tokens, in_f = x.shape
    ny = a.shape[1]
    num_splits, k_per_split = _num_splits(in_f)
    y = torch.empty(num_splits, num_tokens, ny, dtype=torch.float32, device=x.device)
    block_n = min(64, max(16, next_power_of_2(ny)))
    grid = (tiles.tile_start.shape[0], cdiv(ny, block_n), num_splits)
    if grid[0] == 0 or num_tokens == 0:
        return y
    _shrink_kernel[grid](
        x, a, y, *tiles, in_f, ny, k_per_split,
        x.stride(0), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=tile_rows, BLOCK_N=block_n, BLOCK_K=_BLOCK_K,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    return y


def lora_expand(
    y: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    tiles: LoraTiles,
    bounds: tuple[int, ...],
    tile_rows: int,
) -> None:
    """out[t, cols of sub k] += (sum over splits of y[:, t, k R:(k+1) R]) @ b[slot(t), cols]^T
    for every row t of a tile. bounds: the first column of sub-modules 1.. (empty for one)."""
    num_splits, _, ny = y.shape
    n_out, rank = b.shape[1], b.shape[2]
    n_sub = len(bounds) + 1
    if n_sub > 3 or ny != n_sub * rank or list(bounds) != sorted(bounds):
        raise ValueError(f"y [.., {ny}] and bounds {bounds} do not fit b {tuple(b.shape)}")
    b1, b2 = (*bounds, n_out, n_out)[:2]
    grid = (tiles.tile_start.shape[0], cdiv(n_out, _EXPAND_BLOCK_N))
    if grid[0] == 0 or out.shape[0] == 0:
        return
    _expand_kernel[grid](
        y, b, out, *tiles, n_out, rank, b1, b2,
        y.stride(0), y.stride(1), 0, b.stride(0), b.stride(1), out.stride(0),
        NUM_SPLITS=num_splits, N_SUB=n_sub, BLOCK_M=tile_rows, BLOCK_N=_EXPAND_BLOCK_N,
        BLOCK_R=max(16, next_power_of_2(rank)),
        DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip


def _check_folded(
    shrunk: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bounds: tuple[int, ...]
) -> None:
    if shrunk.dtype not in _DTYPES or b.dtype != shrunk.dtype or out.dtype != shrunk.dtype:
        raise ValueError(
            f"shrunk, b, out must share one of {_DTYPES}: got {shrunk.dtype}, {b.dtype}, "
            f"{out.dtype}"
        )
    n_sub = len(bounds) + 1
    if (
        shrunk.dim() != 2
        or b.dim() != 3
        or out.dim() != 2
        or shrunk.shape[0] != out.shape[0]
        or b.shape[1] != out.shape[1]
        or shrunk.shape[1] != b.shape[0] * n_sub * b.shape[2]
        or n_sub > 3
        or list(bounds) != sorted(bounds)
    ):
        raise ValueError(
            f"expected shrunk [T, S n_sub R], b [S, out, R], out [T, out] with {n_sub} "
            f"sub-modules (bounds {bounds}): got {tuple(shrunk.shape)}, {tuple(b.shape)}, "
            f"{tuple(out.shape)}"
        )
    for name, t in (("shrunk", shrunk), ("b", b), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous: strides {t.stride()}")
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device}, out on {out.device}")


def lora_expand_folded(
    shrunk: torch.Tensor,  # [T, S n_sub R]: every slot's x @ A^T (any row stride)
    b: torch.Tensor,  # [S, out, R]: the sub-modules' B stacked along the output columns
    out: torch.Tensor,  # [T, out] (any row stride), updated in place
    tiles: LoraTiles,
    bounds: tuple[int, ...] = (),  # first output column of sub-modules 1..n_sub-1
    tile_rows: int = 16,
) -> None:
    """out[t, cols_k] += shrunk[t, (slot n_sub + k) R : (slot n_sub + k + 1) R] @ B_k[slot]^T for
    each sub-module k and each row t in a tile of `slot`; rows in no tile are untouched.

    The expand of a folded projection: its one matmul over [W; A of every slot] gave the base
    output (`out`, the first columns) and every slot's shrink (`shrunk`, the columns after)."""
    _check_folded(shrunk, b, out, bounds)
    _check_tiles(tiles, out.device)
    if tile_rows not in (16, 32, 64, 128):
        raise ValueError(f"tile_rows={tile_rows} is invalid: expected 16, 32, 64 or 128")
    n_out, rank = b.shape[1], b.shape[2]
    n_sub = len(bounds) + 1
    b1, b2 = (*bounds, n_out, n_out)[:2]
    grid = (tiles.tile_start.shape[0], cdiv(n_out, _EXPAND_BLOCK_N))
    if grid[0] == 0 or out.shape[0] == 0:
        return
    _expand_kernel[grid](
        shrunk, b, out, *tiles, n_out, rank, b1, b2,
        0, shrunk.stride(0), n_sub * rank, b.stride(0), b.stride(1), out.stride(0),
        NUM_SPLITS=1, N_SUB=n_sub, BLOCK_M=tile_rows, BLOCK_N=_EXPAND_BLOCK_N,
        BLOCK_R=max(16, next_power_of_2(rank)),
        DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip


def segmented_lora(
    x: torch.Tensor,  # [T, in]
    out: torch.Tensor,  # [T, out], updated in place
    a: torch.Tensor,  # [S, n_sub R, in]: the sub-modules' A stacked along the rank
    b: torch.Tensor,  # [S, out, R]: the sub-modules' B stacked along the output columns
    tiles: LoraTiles,
    bounds: tuple[int, ...] = (),  # first output column of sub-modules 1..n_sub-1
    tile_rows: int = 16,  # the most rows of a tile: a power of two, 16..128
) -> None:
    """out[t, cols_k] += (x[t] @ A_k[slot]^T) @ B_k[slot]^T for each sub-module k and each row t
    in a tile of `slot`; rows in no tile are untouched."""
    _check(x, out, a, b)
    _check_tiles(tiles, x.device)
    if tile_rows not in (16, 32, 64, 128):
        raise ValueError(f"tile_rows={tile_rows} is invalid: expected 16, 32, 64 or 128")
    y = lora_shrink(x, a, tiles, tile_rows)  # [num_splits, T, n_sub R] float32
    lora_expand(y, b, out, tiles, bounds, tile_rows)
