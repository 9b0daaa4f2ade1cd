"""A request's extra outputs (hidden states, prompt logprobs, a pooled vector) into the TokenOut
that carries its tokens: each optional per-request list exists only when some request in the
message has something for it, padded with empty entries for the others."""

from __future__ import annotations

from typing import Any

from pdserve import protocol
from pdserve.scheduler.request import Request
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.pooler import PoolState


def append_extra_outputs(out: protocol.TokenOut, req: Request, index: int) -> None:
    """Add request `req`'s new extra outputs as entry `index` of out's optional lists."""
    outputs = req.outputs
    values: dict[str, Any] = {}
    if isinstance(outputs, PoolState) and outputs.embedding is not None:
        values["embeddings"] = outputs.embedding
    elif isinstance(outputs, ExtraOutputs):
        if outputs.return_hidden_states:
            values["hidden_states"] = outputs.take_hidden(req.num_computed)
        entries = outputs.take_input_logprobs(len(req.prompt_ids))
        if entries is not None:
            values["input_token_logprobs"] = [[e.token_id, e.logprob] for e in entries]
            values["input_top_logprobs"] = [e.top for e in entries]
    for name in ("hidden_states", "input_token_logprobs", "input_top_logprobs", "embeddings"):
        column = getattr(out, name)
        if column is None and name not in values:
            continue
        if column is None:
            column = [[] for _ in range(index)]
            setattr(out, name, column)
        column.append(values.get(name, []))
