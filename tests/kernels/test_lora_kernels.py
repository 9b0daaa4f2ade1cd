"""The Triton segmented LoRA kernels (shrink + expand over a fused projection, and the folded
expand reading every slot's shrink from the fused matmul's columns) against the torch references
`segmented_lora_ref` and `folded_expand_ref`, and the tile index they read (CPU).

The kernel tests need CUDA and triton; they also run (slowly) on CPU under TRITON_INTERPRET=1.
Errors are max |out - ref| / max |ref|: at most 1e-2 for bf16, 1e-4 for fp32.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pdserve.worker.lora.lora_layers import (
    TILE_ROWS,
    LoraBatch,
    LoraGraphInputs,
    folded_expand_ref,
    max_tiles,
    pack_tiles,
    segmented_lora_ref,
    tile_list,
    tiles_view,
)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not _HAS_TRITON or not (torch.cuda.is_available() or _INTERPRET),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
)
BF16, FP32 = torch.bfloat16, torch.float32
_REL_TOL = {BF16: 1e-2, FP32: 1e-4}
# (input features, output columns of each sub-module): a fused q/k/v with awkward sizes (blocks
# straddle sub-module boundaries, in is no multiple of the K block) and a long-input one (split-K).
QKV = (200, (320, 96, 96))
DOWN = (2304, (272,))


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def skip_bf16_in_interpreter(dtype: torch.dtype) -> None:
    if dtype == BF16 and _INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton 3.6's CPU interpreter computes bf16 wrongly (fp32 runs; GPU runs both)")


def random_row_slots(num_rows: int, num_adapters: int, num_slots: int) -> list[int]:
    """Each row's slot: one of `num_adapters` distinct slots, or -1 (base) for about 1 in 5."""
    slots = torch.randperm(num_slots)[:num_adapters]
    picks = slots[torch.randint(0, num_adapters, (num_rows,))]
    base = torch.rand(num_rows) < 0.2
    picks[base] = -1
    picks[0] = slots[0]  # at least one adapter row
    return picks.tolist()


def run_case(
    shape: tuple[int, tuple[int, ...]],
    num_rows: int,
    num_adapters: int,
    rank: int,
    dtype: torch.dtype,
    extra_tiles: int = 0,
) -> None:
    """Kernel vs reference on random weights; rows of the base model must stay untouched."""
    from pdserve.kernels.triton_lora import segmented_lora

    in_f, sizes = shape
    num_slots = max(num_adapters, 4)
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]  # [0, b1, .., N]
    kw = {"dtype": dtype, "device": DEVICE}
    x = torch.randn(num_rows, in_f, **kw)
    a = torch.randn(num_slots, len(sizes) * rank, in_f, **kw) / in_f**0.5  # fused A
    b = torch.randn(num_slots, bounds[-1], rank, **kw) / rank**0.5  # fused B
    out0 = 0.1 * torch.randn(num_rows, bounds[-1], **kw)
    lora = LoraBatch.build(None, random_row_slots(num_rows, num_adapters, num_slots), DEVICE)  # type: ignore[arg-type]
    assert lora is not None
    num_tiles = len(tile_list(lora.seg_starts, lora.seg_slots))
    cap = num_tiles + extra_tiles  # extra tiles are empty (slot -1), as in a CUDA graph
    packed = pack_tiles(lora, num_rows, cap).to(DEVICE)
    out = out0.clone()
    segmented_lora(x, out, a, b, tiles_view(packed, num_rows, cap, cap), tuple(bounds[1:-1]))

    ref = out0.clone()
    rows = torch.tensor(lora.rows, dtype=torch.int64, device=DEVICE)
    for k in range(len(sizes)):
        lo, hi = bounds[k], bounds[k + 1]
        a_k, b_k = a[:, k * rank : (k + 1) * rank], b[:, lo:hi]
        segmented_lora_ref(x, ref[:, lo:hi], a_k, b_k, rows, lora.seg_starts, lora.seg_slots)
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= _REL_TOL[dtype] * scale, f"max abs err {err:.3e}, max |ref| {scale:.3e}"
    base = sorted(set(range(num_rows)) - set(lora.rows))
    assert torch.equal(out[base], out0[base]), "a base-model row was written"


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize(
    "num_rows,num_adapters", [(1, 1), (64, 1), (64, 8), (64, 32), (256, 8), (256, 32)]
)
@pytest.mark.parametrize("shape", [QKV, DOWN], ids=["qkv", "down"])
def test_segmented_lora_matches_reference(
    shape: tuple[int, tuple[int, ...]],
    num_rows: int,
    num_adapters: int,
    rank: int,
    dtype: torch.dtype,
) -> None:
    skip_bf16_in_interpreter(dtype)
    run_case(shape, num_rows, num_adapters, rank, dtype)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_long_segments_and_empty_tiles(dtype: torch.dtype) -> None:
    """Prefill-like: segments of many tiles, and trailing empty tiles a graph launches."""
    skip_bf16_in_interpreter(dtype)
    run_case(QKV, 300, 3, 16, dtype, extra_tiles=5)


def run_folded_case(
    sizes: tuple[int, ...], num_rows: int, num_adapters: int, rank: int, dtype: torch.dtype
) -> None:
    """lora_expand_folded on the column views of one fused matmul output (row stride wider than
    either) vs folded_expand_ref; base rows and the shrink columns stay untouched."""
    from pdserve.kernels.triton_lora import lora_expand_folded

    seed = torch.Generator().seed() % 2**31
    torch.manual_seed(seed)  # fresh inputs each run; the seed is in the failure message
    num_slots = max(num_adapters, 3)
    n_out, n_sub = sum(sizes), len(sizes)
    bounds = tuple(sum(sizes[:k]) for k in range(1, n_sub))
    kw = {"dtype": dtype, "device": DEVICE}
    extra = num_slots * n_sub * rank
    fused0 = torch.randn(num_rows, n_out + extra + 5, **kw)  # 5 spare columns: an odd stride
    fused0[:, :n_out] *= 0.1  # the base output, small beside the deltas (as in run_case)
    b = torch.randn(num_slots, n_out, rank, **kw) / rank**0.5
    row_slots = random_row_slots(num_rows, num_adapters, num_slots)
    lora = LoraBatch.build(None, row_slots, DEVICE)  # type: ignore[arg-type]
    assert lora is not None
    cap = len(tile_list(lora.seg_starts, lora.seg_slots)) + 3  # and 3 empty tiles
    tiles = tiles_view(pack_tiles(lora, num_rows, cap).to(DEVICE), num_rows, cap, cap)
    got, want = fused0.clone(), fused0.clone()
    lora_expand_folded(got[:, n_out : n_out + extra], b, got[:, :n_out], tiles, bounds)
    rows = torch.tensor(lora.rows, dtype=torch.int64, device=DEVICE)
    shrunk, out = want[:, n_out : n_out + extra], want[:, :n_out]
    folded_expand_ref(shrunk, out, b, bounds, rows, lora.seg_starts, lora.seg_slots)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert (want - fused0).float().abs().max().item() > 0.1, "the adapters add nothing"
    assert err <= _REL_TOL[dtype] * scale, (
        f"seed {seed}: max abs err {err:.3e}, max |ref| {scale:.3e}"
    )
    base = sorted(set(range(num_rows)) - set(lora.rows))
    assert torch.equal(got[base], fused0[base]), f"seed {seed}: a base-model row was written"
    assert torch.equal(got[:, n_out:], fused0[:, n_out:]), f"seed {seed}: shrink columns written"


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("num_rows,num_adapters", [(1, 1), (40, 3), (64, 8)])
@pytest.mark.parametrize(
    "sizes", [(320, 96, 96), (200, 200), (272,)], ids=["qkv", "gate_up", "down"]
)
def test_folded_expand_on_strided_views_matches_reference(
    sizes: tuple[int, ...], num_rows: int, num_adapters: int, rank: int, dtype: torch.dtype
) -> None:
    skip_bf16_in_interpreter(dtype)
    run_folded_case(sizes, num_rows, num_adapters, rank, dtype)


def test_tiles_cut_segments_and_pad_with_empty_tiles() -> None:
    lora = LoraBatch.build(None, [2, -1, 0, 2] + [0] * 20, torch.device("cpu"))  # type: ignore[arg-type]
    assert lora is not None
    assert lora.rows == [2, *range(4, 24), 0, 3] and lora.seg_slots == [0, 2]
    assert tile_list(lora.seg_starts, lora.seg_slots) == [(0, 16, 0), (16, 5, 0), (21, 2, 2)]
    packed = pack_tiles(lora, 30, 5)
    table = packed[30:].view(3, 5)
    assert packed[:23].tolist() == lora.rows
    assert table.tolist() == [[0, 16, 21, 0, 0], [16, 5, 2, 0, 0], [0, 0, 2, -1, -1]]
    with pytest.raises(ValueError, match="do not fit"):
        pack_tiles(lora, 30, 2)


def test_max_tiles_bounds_every_grouping() -> None:
    for num_rows in (1, 5, 16, 17, 64, 100):
        for num_slots in (1, 3, 8):
            for _ in range(20):
                row_slots = torch.randint(0, num_slots, (num_rows,)).tolist()
                lora = LoraBatch.build(None, row_slots, torch.device("cpu"))  # type: ignore[arg-type]
                tiles = tile_list(lora.seg_starts, lora.seg_slots)
                assert len(tiles) <= max_tiles(num_rows, num_slots)
    assert max_tiles(64, 32) == 64 // TILE_ROWS + 32


def test_graph_inputs_start_empty_and_load_a_batch() -> None:
    class _Weights:
        num_slots = 4

    inputs = LoraGraphInputs(_Weights(), 8, torch.device("cpu"))  # type: ignore[arg-type]
    assert (inputs.packed[8:].view(3, -1)[2] == -1).all()
    lora = LoraBatch.build(None, [1, -1, 3, 1], torch.device("cpu"))  # type: ignore[arg-type]
    inputs.load(lora)
    slots = inputs.packed[8:].view(3, -1)[2].tolist()
    assert slots[:2] == [1, 3] and set(slots[2:]) == {-1}
