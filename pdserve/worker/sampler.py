"""Batched next-token sampling: logit bias, penalties, min_new_tokens masking, greedy or
temperature/top-k/top-p/min-p sampling, and logprobs, with torch ops only (CPU or CUDA).

Order, as in HF transformers and vLLM:
  1. logit_bias                      (added to the raw logits)
  2. repetition_penalty (HF/CTRL)    tokens seen in prompt + output: logit > 0 -> logit / p,
                                     else logit * p
  3. frequency/presence (OpenAI)     logit -= count_in_output * f + (count_in_output > 0) * p
  4. min_new_tokens                  EOS (unless ignore_eos) and stop_token_ids -> -inf until
                                     enough tokens exist (unless the row's grammar allows
                                     nothing else)
  5. grammar                         tokens the row's grammar does not allow next -> -inf
  6. greedy rows: argmax. Other rows: / temperature, top-k, top-p (renormalized after top-k),
     min-p, then one draw.

Logprobs are log_softmax of the logits after steps 1-4 and before the grammar, temperature and
truncation (vLLM's default is the raw model logprobs instead; ours match what greedy decoding
ranks, and a constrained row's alternatives keep finite logprobs).

Randomness: a row with a seed draws its noise from a counter-based hash of
(seed, step = len(output_ids), token id), so the same request with the same seed gives the same
tokens whatever else is in the batch and on whichever device (on CUDA, batches without top-k /
top-p draw in one Triton kernel, kernels/triton_sampling.py, from the same noise: only two nearly
tied tokens may come out in another order). Unseeded rows use one torch generator for the batch
(the caller's, or torch's default for the device).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from pdserve.config.sampling_params import SamplingParams
from pdserve.worker.grammar_mask import allows_other_than, apply_bitmask, fill_bitmask
from pdserve.worker.sampling_checks import (
    BadRow,
    SamplingRowError,
    find_bad_rows,
    is_int,
)
from pdserve.worker.sampling_noise import seed_keys, seeded_exponential


@dataclass(frozen=True, eq=False)
class SamplingRow:
    """What the sampler needs to know about one request for one step.

    Seeded rows draw from (seed, len(output_ids)), so the n samples of one request must carry
    different seeds (e.g. seed + sample index) to differ.
    """

    params: SamplingParams
    prompt_ids: Sequence[int]  # read only when repetition_penalty != 1
    output_ids: Sequence[int]  # generated so far; len() is the step for seeds and min_new_tokens
    eos_token_ids: Sequence[int] = ()  # masked (with stop_token_ids) before min_new_tokens
    return_logprob: bool = False
    top_logprobs_num: int = 0  # 0..MAX_TOP_LOGPROBS
    grammar: Any = None  # the request's RequestGrammar (worker/grammar.py); None: unconstrained


class PartialBatch(NamedTuple):
    """A batch of the good rows, and the rows left out."""

    batch: SamplingBatch | None  # None when no row was good
    row_indices: list[int]  # the rows the batch holds, in order (select these logits' rows)
    bad_rows: list[BadRow]


class SampleOutput(NamedTuple):
    token_ids: list[int]  # [B]
    logprobs: list[float] | None  # [B] chosen token's logprob; None when no row asked
    top_logprobs: list[tuple[list[int], list[float]]] | None  # per row, top_logprobs_num long


class _SparseAdd(NamedTuple):
    """Values added at (row, token) positions of a [B, V] tensor."""

    rows: torch.Tensor  # [N] int64, device
    token_ids: torch.Tensor  # [N] int64, device
    values: torch.Tensor  # [N] float32, device


@dataclass
class SamplingBatch:
    """Per-step sampling state for B rows, built once by `build` and passed to `sample`."""

    vocab_size: int
    temperatures: torch.Tensor  # [B, 1] float32, device; 1.0 for greedy rows
    top_ks: torch.Tensor  # [B, 1] int64, device; vocab_size when off
    top_ps: torch.Tensor  # [B, 1] float32, device
    min_ps: torch.Tensor  # [B, 1] float32, device
    is_greedy: torch.Tensor  # [B] bool, device
    is_all_greedy: bool
    needs_sort: bool  # some sampled row uses top-k or top-p
    seeded_rows: torch.Tensor  # [S] int64, device
    seed_keys: torch.Tensor  # [S, 2] int64, device: two 32-bit keys from (seed, step)
    logit_bias: _SparseAdd | None
    banned: _SparseAdd | None  # min_new_tokens: values are -inf
    repetition_penalties: torch.Tensor | None  # [B, 1] float32, device
    is_seen: torch.Tensor | None  # [B, V] bool, device: token in prompt or output
    frequency_penalties: torch.Tensor | None  # [B, 1] float32, device
    presence_penalties: torch.Tensor | None  # [B, 1] float32, device
    output_counts: torch.Tensor | None  # [B, V] float32, device: occurrences in output
    return_logprob: bool  # some row asked for logprobs or top logprobs
    top_logprobs_nums: list[int]  # [B]
    grammar_bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32, device; None: free

    @property
    def batch_size(self) -> int:
        return len(self.top_logprobs_nums)

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        checked: bool = False,
    ) -> SamplingBatch:
        """Raises SamplingRowError naming every row whose own parameters are bad. checked: every
        row passed `row_problem` when its request was admitted (parameters do not change after),
        so only a grammar whose compile failed since is looked for."""
        if not rows:
            raise ValueError("SamplingBatch.build got no rows: expected at least one")
        bad_rows = find_bad_rows(rows, vocab_size, checked)
        if bad_rows:
            raise SamplingRowError(bad_rows)
        # First, before anything waits for the device: the forward pass may still be running.
        is_cuda = torch.device(device).type == "cuda"
        bitmask = fill_bitmask([row.grammar for row in rows], vocab_size, pin_memory=is_cuda)
        params = [row.params for row in rows]
        sampled = [p for p in params if not p.is_greedy]

        return cls(
            vocab_size=vocab_size,
            temperatures=_column([1.0 if p.is_greedy else p.temperature for p in params], device),
            top_ks=_column(
                [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params],
                device,
                torch.int64,
            ),
            top_ps=_column([p.top_p for p in params], device),
            min_ps=_column([p.min_p for p in params], device),
            is_greedy=torch.tensor([p.is_greedy for p in params], dtype=torch.bool).to(device),
            is_all_greedy=not sampled,
            needs_sort=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            **_seed_fields(rows, device),
            logit_bias=_logit_bias(rows, vocab_size, device),
            banned=_banned_before_min_new_tokens(rows, vocab_size, device, bitmask),
            **_repetition_fields(rows, vocab_size, device),
            **_frequency_presence_fields(rows, vocab_size, device),
            return_logprob=any(r.return_logprob or r.top_logprobs_num > 0 for r in rows),
            top_logprobs_nums=[row.top_logprobs_num for row in rows],
            grammar_bitmask=None if bitmask is None else bitmask.to(device, non_blocking=True),
        )


def build_skipping_bad_rows(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str, checked: bool = False
) -> PartialBatch:
    """`SamplingBatch.build` over the rows that can be sampled: one request's bad parameter
    never fails the others. Sample `logits[row_indices]` with the batch; end `bad_rows`.
    checked: as `SamplingBatch.build`'s."""
    kept = list(range(len(rows)))
    bad: list[BadRow] = []
    while kept:
        try:
            batch = SamplingBatch.build([rows[i] for i in kept], vocab_size, device, checked)
        except SamplingRowError as e:  # each round drops at least one row
            dropped = {kept[r.row_idx] for r in e.bad_rows}
            bad += [BadRow(kept[r.row_idx], r.message) for r in e.bad_rows]
            kept = [i for i in kept if i not in dropped]
        else:
            return PartialBatch(batch, kept, sorted(bad))
    return PartialBatch(None, [], sorted(bad))


# ---- building the batch ------------------------------------------------------------------


def _ids_by_row(
    id_lists: Sequence[Sequence[int]], vocab_size: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) pairs, CPU int64 [N] each, for the ids id_lists[row] of every row;
    token ids are checked against the vocab (SamplingRowError names the rows with bad ones).
    numpy reads Python ints ~6x faster than torch.tensor, which matters for long prompts under
    repetition_penalty."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int64)  # [B]
    try:
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, int(lengths.sum()))
    except (OverflowError, TypeError, ValueError):  # not an int64: find the rows, id by id
        return _ids_by_row(_ints_or_minus_one(id_lists), vocab_size, what)
    token_ids = torch.from_numpy(flat)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)  # [N]
    if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        is_bad = (token_ids < 0) | (token_ids >= vocab_size)  # [N] bool
        bad_rows = [
            BadRow(int(r), f"{what} has token id {int(t)}: expected 0 <= id < {vocab_size}")
            for r, t in _first_per_row(rows[is_bad], token_ids[is_bad])
        ]
        raise SamplingRowError(bad_rows)
    return rows, token_ids


def _first_per_row(rows: torch.Tensor, token_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(row, its first token id) for each distinct row of the (row, token id) pairs."""
    first: dict[int, int] = {}
    for r, t in zip(rows.tolist(), token_ids.tolist()):
        first.setdefault(r, t)
    return sorted(first.items())


def _ints_or_minus_one(id_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each id that is no int64 (a huge int, a float) replaced by -1, so it reads as out of range."""
    return [[t if is_int(t) and -(2**63) <= t < 2**63 else -1 for t in ids] for ids in id_lists]


def _column(
    values: Sequence[float], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(-1, 1).to(device)  # [B, 1]


def _logit_bias(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
) -> _SparseAdd | None:
    if not any(row.params.logit_bias for row in rows):
        return None
    biases = [row.params.logit_bias for row in rows]
    row_idx, token_ids = _ids_by_row([list(bias) for bias in biases], vocab_size, "logit_bias")
    values = torch.tensor([v for bias in biases for v in bias.values()], dtype=torch.float32)
    return _SparseAdd(row_idx.to(device), token_ids.to(device), values.to(device))


def _banned_before_min_new_tokens(
    rows: Sequence[SamplingRow],
    vocab_size: int,
    device: torch.device | str,
    grammar_bitmask: torch.Tensor | None = None,
) -> _SparseAdd | None:
    """EOS (unless ignore_eos) and stop_token_ids of the rows short of min_new_tokens, except
    where the row's grammar (bitmask [B, ceil(V / 32)] int32, host) allows nothing else: a
    complete grammar ends the request."""
    banned = [
        sorted(
            set(() if row.params.ignore_eos else row.eos_token_ids) | set(row.params.stop_token_ids)
        )
        if len(row.output_ids) < row.params.min_new_tokens
        else []
        for row in rows
    ]
    if grammar_bitmask is not None:
        for i, row in enumerate(rows):
            if banned[i] and row.grammar is not None:
                if not allows_other_than(grammar_bitmask[i], banned[i], vocab_size):
                    banned[i] = []
    if not any(banned):
        return None
    row_idx, token_ids = _ids_by_row(banned, vocab_size, "eos/stop_token_ids")
    values = torch.full(token_ids.shape, float("-inf"), device=device)
    return _SparseAdd(row_idx.to(device), token_ids.to(device), values)


def _repetition_fields(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
) -> dict[str, torch.Tensor | None]:
    if all(row.params.repetition_penalty == 1.0 for row in rows):
        return {"repetition_penalties": None, "is_seen": None}
    seen = [
        [*row.prompt_ids, *row.output_ids] if row.params.repetition_penalty != 1.0 else []
        for row in rows
    ]
    row_idx, token_ids = _ids_by_row(seen, vocab_size, "prompt/output ids")
    is_seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)  # [B, V]
    is_seen[row_idx.to(device), token_ids.to(device)] = True
    penalties = [row.params.repetition_penalty for row in rows]
    return {"repetition_penalties": _column(penalties, device), "is_seen": is_seen}


def _frequency_presence_fields(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
) -> dict[str, torch.Tensor | None]:
    params = [row.params for row in rows]
    if all(p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 for p in params):
        return {"frequency_penalties": None, "presence_penalties": None, "output_counts": None}
    row_idx, token_ids = _ids_by_row([row.output_ids for row in rows], vocab_size, "output ids")
    flat_idx = (row_idx * vocab_size + token_ids).to(device)  # [N]
    counts = torch.zeros(len(rows) * vocab_size, dtype=torch.float32, device=device)
    counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=torch.float32))
    return {
        "frequency_penalties": _column([p.frequency_penalty for p in params], device),
        "presence_penalties": _column([p.presence_penalty for p in params], device),
        "output_counts": counts.view(len(rows), vocab_size),  # [B, V]
    }


def _seed_fields(
    rows: Sequence[SamplingRow], device: torch.device | str
) -> dict[str, torch.Tensor]:
    seeded = [
        i for i, row in enumerate(rows) if row.params.seed is not None and not row.params.is_greedy
    ]
    keys = seed_keys(
        [rows[i].params.seed for i in seeded], [len(rows[i].output_ids) for i in seeded]
    )
    return {
        "seeded_rows": torch.tensor(seeded, dtype=torch.int64).to(device),
        "seed_keys": torch.from_numpy(keys).view(-1, 2).to(device),
    }


# ---- sampling ----------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-4: logit bias, repetition, frequency/presence, min_new_tokens. Returns a new
    [B, V] float32 tensor; `logits` is not modified."""
    logits = logits.to(torch.float32, copy=True)  # [B, V]
    if batch.logit_bias is not None:
        bias = batch.logit_bias
        logits.index_put_((bias.rows, bias.token_ids), bias.values, accumulate=True)
    if batch.repetition_penalties is not None:
        penalty = batch.repetition_penalties  # [B, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.is_seen, penalized, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts  # [B, V]
        logits -= counts * batch.frequency_penalties
        logits -= (counts > 0).to(torch.float32) * batch.presence_penalties
    if batch.banned is not None:
        logits.index_put_((batch.banned.rows, batch.banned.token_ids), batch.banned.values)
    return logits


def _truncation_mask(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] bool: tokens that survive top-k, top-p (on the top-k renormalized probs) and
    min-p. The most likely token always survives."""
    keep = probs >= batch.min_ps * probs.max(dim=-1, keepdim=True).values  # [B, V]
    if not batch.needs_sort:
        return keep
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
    ranks = torch.arange(probs.shape[-1], device=probs.device)  # [V]
    sorted_keep = ranks < batch.top_ks  # [B, V]
    sorted_probs = sorted_probs * sorted_keep
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    sorted_keep &= mass_before < batch.top_ps  # rank 0 has mass_before 0 < top_p: kept
    return keep & torch.zeros_like(keep).scatter_(-1, sorted_ids, sorted_keep)


def _sample_from(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    """[B] int64: one draw per row from the truncated, temperature-scaled distribution,
    by the exponential race argmax(p / E), E ~ Exp(1)."""
    probs = torch.softmax(logits / batch.temperatures, dim=-1)  # [B, V]
    probs = probs * _truncation_mask(probs, batch)
    num_seeded = batch.seeded_rows.numel()
    if num_seeded == batch.batch_size:
        noise = seeded_exponential(batch.seed_keys, batch.vocab_size)
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)  # [B, V]
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # a 0 would make 0 / 0 = NaN win argmax
        if num_seeded:
            noise[batch.seeded_rows] = seeded_exponential(batch.seed_keys, batch.vocab_size)
    return (probs / noise).argmax(dim=-1)


def _race_on_gpu(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    """`_sample_from` (and argmax for the greedy rows) as one Triton kernel, for batches without
    top-k / top-p: seeded rows use their keys, the others keys drawn from `generator`."""
    from pdserve.kernels.triton_sampling import race_sample

    keys = torch.randint(
        0, 1 << 32, (batch.batch_size, 2), dtype=torch.int64, device=logits.device,
        generator=generator,
    )  # fmt: skip
    if batch.seeded_rows.numel():
        keys[batch.seeded_rows] = batch.seed_keys
    return race_sample(logits, batch.temperatures, batch.min_ps, batch.is_greedy, keys)


def _logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device: [B, 1 + max_k] float32 (the chosen token's logprob, then the top ones,
    descending) and [B, max_k] int64 (the top tokens)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    chosen = logprobs.gather(-1, token_ids.view(-1, 1))  # [B, 1]
    max_k = min(max(batch.top_logprobs_nums), batch.vocab_size)
    top = logprobs.topk(max_k, dim=-1)  # values, indices: [B, max_k], sorted descending
    return torch.cat([chosen, top.values], dim=-1), top.indices


def _logprob_lists(
    values: torch.Tensor, top_ids: torch.Tensor, top_logprobs_nums: list[int]
) -> tuple[list[float], list[tuple[list[int], list[float]]]]:
    """_logprob_tensors' results (on the host) as each row's chosen logprob and its top ones."""
    value_rows = values.tolist()  # [B, 1 + max_k]
    top_logprobs = [
        (ids[:k], row_values[1 : 1 + k])
        for ids, row_values, k in zip(top_ids.tolist(), value_rows, top_logprobs_nums, strict=True)
    ]
    return [row_values[0] for row_values in value_rows], top_logprobs


def is_plain_greedy(row: SamplingRow) -> bool:
    """True when `sample` would return argmax(logits) for this row and nothing else: the caller
    may then skip building a SamplingBatch."""
    return is_plain_greedy_request(
        row.params, len(row.output_ids), row.return_logprob, row.top_logprobs_num, row.grammar
    )


def is_plain_greedy_request(
    params: SamplingParams,
    num_output: int,
    return_logprob: bool,
    top_logprobs_num: int,
    grammar: Any,
) -> bool:
    """`is_plain_greedy` from a request's fields, without building its SamplingRow (the worker's
    per-step fast path). num_output: tokens generated so far, those still being sampled too."""
    return (
        params.is_greedy
        and not params.has_penalties
        and not params.logit_bias
        and not return_logprob
        and top_logprobs_num == 0
        and (num_output >= params.min_new_tokens or not params.min_new_tokens_bans)
        and grammar is None
    )


class DeviceSample(NamedTuple):
    """`sample_on_device`'s results, still on the device (nothing waited for)."""

    token_ids: torch.Tensor  # [B] int64
    logprob_values: torch.Tensor | None  # [B, 1 + max_k] float32; None when no row asked
    top_ids: torch.Tensor | None  # [B, max_k] int64
    top_logprobs_nums: list[int]  # [B]

    def to_host(self) -> SampleOutput:
        """Read the results back (waits for the device)."""
        if self.logprob_values is None or self.top_ids is None:
            return SampleOutput(self.token_ids.tolist(), None, None)
        logprobs, top = _logprob_lists(
            self.logprob_values.cpu(), self.top_ids.cpu(), self.top_logprobs_nums
        )
        return SampleOutput(self.token_ids.tolist(), logprobs, top)


def sample_on_device(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> DeviceSample:
    """Next token for each row of `logits` [B, V] (any float dtype, on the batch's device),
    left on the device: the overlapped worker loop reads it back one step later.

    `generator` drives the unseeded rows and must live on the logits' device; None means
    torch's default generator for that device.
    """
    if logits.dim() != 2 or tuple(logits.shape) != (batch.batch_size, batch.vocab_size):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} is invalid: expected "
            f"({batch.batch_size}, {batch.vocab_size})"
        )
    logits = process_logits(logits, batch)  # [B, V] float32
    allowed = logits  # the grammar's tokens only (step 5); logprobs come from `logits`
    if batch.grammar_bitmask is not None:
        allowed = apply_bitmask(logits, batch.grammar_bitmask)
    if batch.is_all_greedy:
        token_ids = allowed.argmax(dim=-1)  # [B] int64
    elif allowed.is_cuda and not batch.needs_sort:  # one Triton kernel: kernels/triton_sampling.py
        token_ids = _race_on_gpu(allowed, batch, generator)
    else:
        sampled = _sample_from(allowed, batch, generator)
        token_ids = torch.where(batch.is_greedy, allowed.argmax(dim=-1), sampled)
    if not batch.return_logprob:
        return DeviceSample(token_ids, None, None, batch.top_logprobs_nums)
    values, top_ids = _logprob_tensors(logits, token_ids, batch)
    return DeviceSample(token_ids, values, top_ids, batch.top_logprobs_nums)


def sample(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> SampleOutput:
    """Next token for each row of `logits` [B, V], read back to the host (see
    `sample_on_device`)."""
    return sample_on_device(logits, batch, generator).to_host()
