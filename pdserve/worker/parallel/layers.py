"""The sharded layers of a tensor-parallel decoder (Megatron-LM's split, as vLLM and SGLang do it).

| layer | weight on each rank | forward |
|---|---|---|
| MergedColumnLinear (qkv, gate_up) | each merged part's rows split per rank | local matmul, no communication |
| RowParallelLinear (o_proj, down_proj) | input columns split per rank | local matmul, all-reduce, bias |
| VocabParallelEmbedding | ceil(V / tp) vocab rows | rows this rank owns, zeros elsewhere, all-reduce |
| ParallelLMHead | the same vocab rows (tied: the same tensor) | local logits, all-gather over vocab |

Every layer says which slice of which checkpoint tensor fills each of its parameters
(`checkpoint_slices`), so the weight loader reads only this rank's bytes (safetensors get_slice).
With tp 1 each slice is the whole tensor and each collective the identity.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.worker.parallel.tp_group import SINGLE, Shard, TPGroup


class CheckpointSlice(NamedTuple):
    """Fill param.narrow(dim, dest_start, shard.size) from the checkpoint tensor `<prefix><name>`
    narrowed to `shard` along `dim`; that tensor must have `src_total` elements along `dim`."""

    name: str  # the checkpoint tensor's name relative to the module's parent ("q_proj.weight")
    dim: int
    dest_start: int
    shard: Shard
    src_total: int
    zero_rest: bool = False  # zero the param's rows after the slice (vocab padding)


class MergedPart(NamedTuple):
    """One projection of a merged linear: its rows in the checkpoint, and this rank's share."""

    total: int
    shard: Shard


class MergedColumnLinear(nn.Linear):
    """Several projections of one input stacked along the output dim and run as one matmul,
    column-parallel: each rank holds its share of every part (q heads, KV heads, gate, up).

    `parts` names each projection as the checkpoint does (`q_proj`), in order.
    """

    def __init__(
        self, in_features: int, parts: dict[str, MergedPart], bias: bool, dtype: torch.dtype
    ) -> None:
        super().__init__(in_features, sum(p.shard.size for p in parts.values()), bias, dtype=dtype)
        self.parts = dict(parts)
        self.shards = {name: p.shard.size for name, p in parts.items()}  # local rows per part

    def checkpoint_slices(self, param_name: str, module_name: str) -> list[CheckpointSlice]:
        out, dest = [], 0
        for name, part in self.parts.items():
            out.append(CheckpointSlice(f"{name}.{param_name}", 0, dest, part.shard, part.total))
            dest += part.shard.size
        return out


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W's input columns split across ranks: x arrives split the same way
    (the heads or intermediate rows this rank computed), so the partial products are summed."""

    def __init__(
        self, in_total: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPGroup
    ) -> None:
        self.tp = tp
        self.in_shard = tp.split(in_total, "in_features")
        self.in_total = in_total
        super().__init__(self.in_shard.size, out_features, bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        if not self.tp.is_parallel:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias  # the bias once, after the sum

    def checkpoint_slices(self, param_name: str, module_name: str) -> list[CheckpointSlice]:
        name = f"{module_name}.{param_name}"
        if param_name == "bias":
            rows = self.out_features
            return [CheckpointSlice(name, 0, 0, Shard(0, rows), rows)]
        return [CheckpointSlice(name, 1, 0, self.in_shard, self.in_total)]


class VocabParallelEmbedding(nn.Embedding):
    """The token embedding with its vocab rows split across ranks (ceil(V / tp) rows each)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TPGroup) -> None:
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_shard = tp.vocab(vocab_size)
        self.num_local_rows = -(-vocab_size // tp.size)  # padded: every rank the same size
        super().__init__(self.num_local_rows, hidden_size, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden]
        if not self.tp.is_parallel:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_shard.start  # [T]
        is_mine = (local >= 0) & (local < self.vocab_shard.size)  # [T] bool
        out = F.embedding(torch.where(is_mine, local, 0), self.weight)  # [T, hidden]
        out = out * is_mine.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)

    def checkpoint_slices(self, param_name: str, module_name: str) -> list[CheckpointSlice]:
        name = f"{module_name}.{param_name}"
        return [CheckpointSlice(name, 0, 0, self.vocab_shard, self.vocab_size, zero_rest=True)]


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h E^T over this rank's vocab rows, gathered to the full vocab on every rank (so
    every rank samples the same tokens from the same logits)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V]
        """In float32 when one GEMM can write it from 16-bit operands (CUDA, one rank): the
        float32 accumulator is kept instead of rounded to 16 bits and widened again by a separate
        pass over [N, V] (at batch 256 and a 128k vocabulary, ~260 MB of traffic a step)."""
        if not self.tp.is_parallel and _writes_float32(hidden):
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        local = F.linear(hidden, self.weight)  # [N, ceil(V / tp)]
        if not self.tp.is_parallel:
            return local
        return self.tp.all_gather_last_dim(local)[:, : self.vocab_size]


_FLOAT32_MM: dict[torch.device, bool] = {}


def _writes_float32(x: torch.Tensor) -> bool:
    """Whether torch.mm(x, w, out_dtype=float32) runs for x's dtype and device (16-bit CUDA
    operands on a torch that has the op; probed once per device, outside any graph capture)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    known = _FLOAT32_MM.get(x.device)
    if known is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # not probed inside a capture: the plain path, this once
        try:
            probe = torch.ones(2, 8, dtype=x.dtype, device=x.device)
            known = torch.mm(probe, probe.t(), out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            known = False
        _FLOAT32_MM[x.device] = known
    return known


__all__ = [
    "SINGLE",
    "CheckpointSlice",
    "MergedColumnLinear",
    "MergedPart",
    "ParallelLMHead",
    "RowParallelLinear",
    "VocabParallelEmbedding",
]
