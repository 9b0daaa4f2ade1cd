"""How rank 0 of a tensor-parallel worker tells the other ranks what to run: a fixed header of
ints, then the step's packed batch buffer (model_runner._HostBatch, the same bytes rank 0 copies
to its device) or a hidden-state tensor. Plain tensors over torch.distributed broadcast, never a
pickled object: a follower only ever runs the forward pass the header names.

| command | payload | the follower runs |
|---|---|---|
| FORWARD | packed batch (+ images) | the model, logits at each sequence's last token |
| FORWARD_ROWS | packed batch | the model reading out every new token (+ logits unless pooling) |
| LOGITS | [N, hidden] model dtype | the LM head on those rows (prompt logprobs) |
| KV | [n] uint8: a msgpack op | its own part of the KV transfer (kv_direct.py: open, send, poll) |
| YIELD | none | nothing: it returns to its caller (EngineFragment: a generate call ended) |
| STOP | none | nothing: it exits |

A vision-language model's batch is followed by what its images add (`send_multimodal`): rank 0
runs the vision tower and sends the step's M-RoPE positions and image rows' embeddings, so the
followers' decoders take the same input rows without the pixels.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

import torch

from pdserve.worker.parallel.tp_group import TPGroup


class Command(IntEnum):
    STOP = 0
    FORWARD = 1
    FORWARD_ROWS = 2
    LOGITS = 3
    # 4, 5: the relay of KV pages through rank 0 (GATHER_KV, SCATTER_KV), replaced by KV
    YIELD = 6
    KV = 7


class Header(NamedTuple):
    """What comes next. For a batch: its layout sizes (model_runner._layout); for LOGITS:
    num_tokens is the number of hidden rows; for KV, of payload bytes."""

    command: Command
    num_tokens: int = 0
    batch_size: int = 0
    max_pages: int = 0
    num_fills: int = 0
    is_decode: bool = False


_HEADER_LEN = len(Header._fields)


def send_header(tp: TPGroup, header: Header, device: torch.device) -> None:
    """Rank 0: announce the next command to every rank."""
    values = torch.tensor([int(v) for v in header], dtype=torch.int64, device=device)
    tp.broadcast_from_first(values)


def receive_header(tp: TPGroup, device: torch.device) -> Header:
    """A follower: wait for rank 0's next command (blocks while the worker is idle)."""
    values = torch.empty(_HEADER_LEN, dtype=torch.int64, device=device)
    fields = tp.broadcast_from_first(values).tolist()
    return Header(Command(fields[0]), *fields[1:5], bool(fields[5]))


def send_multimodal(tp: TPGroup, mm: Any, device: torch.device) -> None:
    """Rank 0, after a vision-language model's batch: its MultimodalBatch (M-RoPE positions
    [3, T] or none, image rows [R] and their embeddings [R, hidden])."""
    rope, rows, embeds = mm.rope_positions, mm.embed_rows, mm.embeds
    sizes = [rope.shape[1] if rope is not None else 0, rows.shape[0] if rows is not None else 0]
    tp.broadcast_from_first(torch.tensor(sizes, dtype=torch.int64, device=device))
    if rope is not None:
        tp.broadcast_from_first(rope.contiguous())
    if rows is not None and embeds is not None:
        tp.broadcast_from_first(rows.contiguous())
        tp.broadcast_from_first(embeds.contiguous())


def receive_multimodal(
    tp: TPGroup, device: torch.device, dtype: torch.dtype, hidden_size: int, make: Any
) -> Any:
    """A follower: what `send_multimodal` sent, as `make(rope, rows, embeds)`."""
    num_rope, num_rows = receive_tensor(tp, (2,), torch.int64, device).tolist()
    rope = receive_tensor(tp, (3, num_rope), torch.int64, device) if num_rope else None
    if not num_rows:
        return make(rope)
    rows = receive_tensor(tp, (num_rows,), torch.int64, device)
    embeds = receive_tensor(tp, (num_rows, hidden_size), dtype, device)
    return make(rope, rows, embeds)


def receive_tensor(
    tp: TPGroup, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A follower: the payload rank 0 broadcasts after a header."""
    return tp.broadcast_from_first(torch.empty(shape, dtype=dtype, device=device))
