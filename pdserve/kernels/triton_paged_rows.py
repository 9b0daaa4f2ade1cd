"""Loading BLOCK_N token rows of one head from a paged KV cache: shared by the attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(
    base_ptr, row_off, offs_d, mask_n, mask_d, MASK_N: tl.constexpr, EVEN_D: tl.constexpr
):
    """[BLOCK_N, BLOCK_D] rows at base_ptr + row_off; masks only where they can be false."""
    ptrs = base_ptr + row_off[:, None] + offs_d[None, :]
    if MASK_N:
        rows = tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        rows = tl.load(ptrs)
    else:
        rows = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return rows
