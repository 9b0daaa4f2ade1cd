"""The worker's fast sampling path for "light" rows: greedy or temperature (with min-p and a seed),
under a grammar or not, and nothing else (no top-k / top-p, penalties, logit bias, logprobs, or
min_new_tokens bans still pending). No SamplingBatch is built: the host writes each row's
temperature, min-p and greedy flag, its two noise keys, and the rows' grammar bitmask straight
into pinned memory (one device copy each, not waited for), and the device draws every row's token
in one race kernel that reads the bitmask beside the logits (worker/race_sampling.py).

A seeded row's keys come from (seed, step) as the SamplingBatch's do, so it draws the same token
on either path (up to float rounding between two nearly tied tokens); unseeded rows take keys
from the worker's own generator.
"""

from __future__ import annotations

import random

import torch

from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.device_copy import host_buffer
from pdserve.worker.grammar_mask import bitmask_words, fill_bitmask
from pdserve.worker.race_sampling import race_draw
from pdserve.worker.sampling_noise import MASK32, MASK64, splitmix64


def is_light(req: Request) -> bool:
    """Whether req's next token can be drawn on the fast path."""
    p = req.sampling
    if req.return_logprob or req.top_logprobs_num > 0 or p.has_penalties or p.logit_bias:
        return False
    if req.checked_sampling is not p:  # its numbers were not validated at admission
        return False
    if len(req.output_ids) + req.num_inflight < p.min_new_tokens:
        return False  # EOS and stop ids are banned this step
    return p.is_greedy or (p.top_k <= 0 and p.top_p >= 1.0)


class LightSampler:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)  # the unseeded rows' keys

    def sample(self, logits: torch.Tensor, items: list[BatchItem]) -> torch.Tensor | None:
        """[R] int64 on the device: one token per row of logits [R, V]; every item is light
        (`is_light`). None when some row's grammar failed to compile: the general path ends that
        request alone."""
        grammars = [item.req.grammar for item in items]
        if any(g is not None and g.problem() is not None for g in grammars):
            return None
        device = logits.device
        num_rows, vocab_size = logits.shape
        bitmask = None
        if any(g is not None for g in grammars):
            host_mask, send_mask = host_buffer(
                (num_rows, bitmask_words(vocab_size)), torch.int32, device
            )
            fill_bitmask(grammars, vocab_size, out=host_mask)
            bitmask = send_mask()
        # One copy for the rows' keys [R, 2] int64, then temperature, min-p, greedy [3, R] float32.
        host, send = host_buffer((num_rows * 28,), torch.uint8, device)
        temps, min_ps, greedy = [], [], []
        keys = []
        for item in items:
            req = item.req
            p = req.sampling
            temps.append(1.0 if p.is_greedy else p.temperature)
            min_ps.append(p.min_p)
            greedy.append(1.0 if p.is_greedy else 0.0)
            if p.seed is not None and not p.is_greedy:
                step = len(req.output_ids) + req.num_inflight
                key = splitmix64(splitmix64(p.seed & MASK64) ^ step)
            else:
                key = self._rng.getrandbits(64)
            keys.append((key & MASK32, key >> 32))
        split = num_rows * 16
        host[:split].view(torch.int64).copy_(torch.tensor(keys, dtype=torch.int64).view(-1))
        host[split:].view(torch.float32).copy_(
            torch.tensor((temps, min_ps, greedy), dtype=torch.float32).view(-1)
        )
        packed = send()
        keys_d = packed[:split].view(torch.int64).view(num_rows, 2)
        params = packed[split:].view(torch.float32).view(3, num_rows)
        return race_draw(
            logits.float(), params[0], params[1], params[2], keys_d, bitmask,
            any_min_p=any(m > 0.0 for m in min_ps), all_greedy=all(greedy),
        )  # fmt: skip
