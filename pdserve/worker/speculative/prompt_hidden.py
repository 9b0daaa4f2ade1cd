"""What a prefill worker hands an EAGLE decode worker beside the KV: the target's final-normed
hidden states at the prompt's last positions (`PrefillTask.spec_hidden_rows` asks for them,
`KVReady.spec_hidden` carries them as raw bytes with dtype and shape, a few KiB per request: the
prompt's KV goes over the KV transfer). The decode worker's head re-runs over those positions
(`EagleDrafter.bootstrap`), so its first decode step speculates with the prompt's end in view."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import ScheduledBatch

# Prompt positions whose hidden states the decode worker asks for (EAGLE): the head's KV is
# rebuilt for these; earlier positions read zeros.
PROMPT_HIDDEN_ROWS = 16

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PromptHiddenCapture:
    """Prefill side, in `Request.spec_state`: the rows of the prompt's last positions."""

    first_position: int  # the prompt position of rows[0]
    rows: torch.Tensor | None = None  # [n, H] cpu, model dtype, filled as chunks are computed
    filled: set[int] | None = None  # row indices computed (a recomputed chunk fills them again)

    @classmethod
    def for_request(cls, req: Request, num_rows: int) -> PromptHiddenCapture:
        """Attach a capture to req and keep its last num_rows positions out of prefix reuse."""
        first = max(len(req.prompt_ids) - num_rows, 0)
        capture = cls(first)
        req.spec_state = capture
        req.max_reused_tokens = first
        return capture

    def encode(self) -> tuple[bytes, list[int], str]:
        """(raw bytes, shape, dtype name) for KVReady; empty when some row was never computed."""
        if self.rows is None or len(self.filled or ()) < self.rows.shape[0]:
            return b"", [], ""
        dtype = next(k for k, v in _DTYPES.items() if v == self.rows.dtype)
        raw = self.rows.contiguous().view(torch.uint8).numpy().tobytes()
        return raw, list(self.rows.shape), dtype


def needs_prompt_hidden(batch: ScheduledBatch) -> bool:
    return any(isinstance(it.req.spec_state, PromptHiddenCapture) for it in batch.items)


def record_prompt_hidden(
    batch: ScheduledBatch, hidden: torch.Tensor, row_starts: list[int]
) -> None:
    """After a prefill step (hidden: [T, H], every fed token): keep the captured positions."""
    for item, row_start in zip(batch.items, row_starts):
        capture = item.req.spec_state
        if not isinstance(capture, PromptHiddenCapture):
            continue
        prompt_len = len(item.req.prompt_ids)
        lo = max(item.start, capture.first_position)
        hi = min(item.start + item.num_tokens, prompt_len)
        if lo >= hi:
            continue
        if capture.rows is None:
            shape = (prompt_len - capture.first_position, hidden.shape[-1])
            capture.rows = torch.empty(shape, dtype=hidden.dtype)
        src = hidden[row_start + lo - item.start : row_start + hi - item.start]
        capture.rows[lo - capture.first_position : hi - capture.first_position] = src.cpu()
        capture.filled = (capture.filled or set()) | set(
            range(lo - capture.first_position, hi - capture.first_position)
        )


def decode_prompt_hidden(raw: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    """KVReady's bytes back into a [n, H] tensor (cpu); ValueError for a malformed payload."""
    if dtype not in _DTYPES or len(shape) != 2:
        raise ValueError(f"spec_hidden of dtype {dtype!r}, shape {shape}: expected [n, H]")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    itemsize = torch.tensor([], dtype=_DTYPES[dtype]).element_size()
    if flat.numel() != shape[0] * shape[1] * itemsize:
        raise ValueError(f"spec_hidden has {flat.numel()} bytes: expected shape {shape} {dtype}")
    return flat.view(_DTYPES[dtype]).view(shape)
