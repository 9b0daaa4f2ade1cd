"""What the worker core asks of a step's rows before sampling them: whether they are plain greedy
(one argmax; worker/light_sampling.py has the next fast path), which rows need their tokens on
the host first, and the small device copies the overlapped loop makes without waiting."""

from __future__ import annotations

import dataclasses

import torch

from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.device_copy import to_device
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.sampler import SamplingBatch, is_plain_greedy_request


def is_plain_greedy(req: Request) -> bool:
    p = req.sampling
    num_output = len(req.output_ids) + req.num_inflight if p.min_new_tokens else 0
    return is_plain_greedy_request(
        p, num_output, req.return_logprob, req.top_logprobs_num, req.grammar
    )


def needs_host_tokens(req: Request) -> bool:
    """Whether sampling req's next token reads its earlier tokens on the host (a grammar
    matcher's state, penalty counts): the overlapped loop samples it after they are recorded."""
    return req.grammar is not None or req.sampling.has_penalties


def wants_rows(req: Request) -> bool:
    return isinstance(req.outputs, ExtraOutputs) and req.outputs.wants_rows


def device_index(rows: list[int], device: torch.device) -> torch.Tensor:
    """[len(rows)] int64 on the device, copied without waiting for the device."""
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def on_device(batch: SamplingBatch, device: torch.device) -> SamplingBatch:
    """A sampling batch built on the host, with its tensors copied to `device` (not waited for)."""
    changes: dict[str, object] = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = to_device(value, device)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            changes[f.name] = type(value)(*(to_device(v, device) for v in value))
    return dataclasses.replace(batch, **changes)


def live_rows(items: list[BatchItem], logits: torch.Tensor) -> tuple[list[BatchItem], torch.Tensor]:
    """The items whose requests have not ended, and their rows of logits [len(items), V]."""
    live = [i for i, item in enumerate(items) if item.req.finish is None]
    if len(live) == len(items):
        return items, logits
    return [items[i] for i in live], logits.index_select(0, device_index(live, logits.device))
