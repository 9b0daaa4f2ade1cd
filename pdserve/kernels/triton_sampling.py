"""Triton next-token draw for rows without top-k / top-p: greedy, temperature and min-p, each
row's vocabulary split into chunks drawn side by side, then one small kernel picking each row's
token (min-p batches first find each row's max: one more launch).

The torch sampler (worker/sampler.py `_sample_from`) draws by the exponential race
argmax(p / E), E ~ Exp(1), over p = softmax(logits / T) masked by min-p: about thirty [B, V]
element-wise kernels (softmax, the counter-based hash of the seeded noise, log, division),
~2.5 ms at batch 64 over a 128k vocabulary on an H200. The same race in log space,
argmax(logits / T - log E), needs no softmax: min-p keeps token j when
p_j >= min_p * p_max, i.e. (l_j - l_max) / T >= log(min_p). Each row's noise comes from the same
hash of (its keys, token id) as the torch path's seeded noise, so a seeded row draws the same
token on either path (up to float rounding between two nearly tied tokens); unseeded rows get
keys drawn from the caller's generator each step.

Disallowed tokens arrive as -inf logits (min_new_tokens' bans, a grammar applied beforehand) or
as a grammar's bitmask (xgrammar's [B, ceil(V / 32)] int32, bit j of word w allowing token
32 w + j) that the kernel reads beside the logits, so a constrained step needs no masked copy of
its logits; either way they never win, greedy rows included. A row with nothing allowed returns
token 0, as torch's argmax does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import cdiv, next_power_of_2

_BLOCK = 2048


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (worker/sampling_noise.py `hash32` on int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32)  # mod 2**32, whatever width the product promoted to
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _allowed_logits(base, mask_row, ids, vocab_size, HAS_MASK: tl.constexpr):
    """The logits at `ids`, -inf past the vocabulary and where the row's bitmask forbids."""
    x = tl.load(base + ids, mask=ids < vocab_size, other=float("-inf"))
    if HAS_MASK:
        words = tl.load(mask_row + (ids >> 5), mask=ids < vocab_size, other=0)
        x = tl.where(((words >> (ids & 31)) & 1) != 0, x, float("-inf"))
    return x


# num_chunks changes with the batch size: not specialized on (one compile serves every batch).
@triton.jit(do_not_specialize=["num_chunks"])
def _chunk_kernel(
    logits_ptr,  # [B, V] float32
    temps_ptr,  # [B] float32 (greedy rows: ignored)
    min_ps_ptr,  # [B] float32, 0: no floor
    keys_ptr,  # [B, 2] int64 holding 32-bit values
    mask_ptr,  # [B, W] int32 grammar bitmask (HAS_MASK), else unused
    part_max_ptr,  # [B, S] float32: each chunk's largest allowed logit (written by MAX_ONLY)
    part_max_id_ptr,  # [B, S] int32: its first index
    part_score_ptr,  # [B, S] float32: each chunk's best race score
    part_id_ptr,  # [B, S] int32: its first index
    greedy_ptr,  # [B] any number type: nonzero = argmax
    out_ptr,  # [B] int64: each row's token
    count_ptr,  # [B] int32, zeros: how many of a row's chunks are done (reset to 0 after)
    vocab_size,
    stride_row,
    stride_mask,
    num_chunks,
    chunk_len,  # a multiple of BLOCK
    BLOCK: tl.constexpr,
    CHUNKS_P2: tl.constexpr,  # a power of two >= num_chunks (fixed by the vocabulary)
    HAS_MASK: tl.constexpr,
    MAX_ONLY: tl.constexpr,  # first launch of a min-p batch: the chunk maxima only
    USE_FLOOR: tl.constexpr,  # min-p: read the row's max from part_max (the first launch)
    RACE: tl.constexpr,  # False when every row is greedy
):
    """Each chunk's best allowed logit and best race score; the row's last chunk to finish then
    picks the row's token from all of them (`_pick_row`), so one launch draws (two with min-p)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = logits_ptr + row * stride_row
    mask_row = mask_ptr + row * stride_mask
    offs = tl.arange(0, BLOCK)
    if RACE and not MAX_ONLY:  # greedy-only batches pass no temperatures or keys
        inv_t = 1.0 / tl.load(temps_ptr + row)
        key0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
        key1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    if USE_FLOOR:  # min-p keeps token j when (l_j - l_max) / T >= log(min_p)
        parts = tl.arange(0, CHUNKS_P2)
        maxima = tl.load(
            part_max_ptr + row * num_chunks + parts, mask=parts < num_chunks, other=float("-inf")
        )
        row_max = tl.max(maxima, axis=0)
        floor = tl.log(tl.load(min_ps_ptr + row))
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    race = tl.full([BLOCK], float("-inf"), tl.float32)
    race_id = tl.zeros([BLOCK], tl.int32)
    lo = chunk * chunk_len
    for start in range(lo, lo + chunk_len, BLOCK):
        ids = start + offs
        x = _allowed_logits(base, mask_row, ids, vocab_size, HAS_MASK)
        take = x > best
        best = tl.where(take, x, best)
        best_id = tl.where(take, ids, best_id)
        if RACE and not MAX_ONLY:
            bits = _hash32(_hash32(ids.to(tl.uint32) ^ key0) ^ key1)
            uniform = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (0, 1)
            score = x * inv_t - tl.log(-tl.log(uniform))  # log p - log E, up to a row constant
            keep = x > float("-inf")
            if USE_FLOOR:
                keep = keep & ((x - row_max) * inv_t >= floor)
            score = tl.where(keep, score, float("-inf"))
            take = score > race
            race = tl.where(take, score, race)
            race_id = tl.where(take, ids, race_id)
    top = tl.max(best, axis=0)
    out = row * num_chunks + chunk
    if not USE_FLOOR:  # a min-p batch's second launch reads these
        tl.store(part_max_ptr + out, top)
        tl.store(part_max_id_ptr + out, tl.min(tl.where(best == top, best_id, vocab_size), axis=0))
    if RACE and not MAX_ONLY:
        top = tl.max(race, axis=0)
        tl.store(part_score_ptr + out, top)
        tl.store(part_id_ptr + out, tl.min(tl.where(race == top, race_id, vocab_size), axis=0))
    if not MAX_ONLY:
        # Release this chunk's results, acquire the others' (acq_rel, GPU scope): the last one in
        # sees them all.
        finished = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if finished == num_chunks - 1:
            _pick_row(
                row, part_max_ptr, part_max_id_ptr, part_score_ptr, part_id_ptr, greedy_ptr,
                out_ptr, vocab_size, num_chunks, CHUNKS_P2, RACE,
            )  # fmt: skip
            tl.store(count_ptr + row, 0)  # ready for the next launch


@triton.jit
def _pick_row(
    row,
    part_max_ptr,
    part_max_id_ptr,
    part_score_ptr,
    part_id_ptr,
    greedy_ptr,  # [B] any number type: nonzero = argmax
    out_ptr,  # [B] int64
    vocab_size,
    num_chunks,
    CHUNKS_P2: tl.constexpr,
    RACE: tl.constexpr,
):
    """A row's token from its chunks' partial results; the first index wins ties, as in
    torch.argmax (chunks are in vocabulary order). The partial results come from other programs:
    read past the L1 cache (.cg)."""
    parts = tl.arange(0, CHUNKS_P2)
    live = parts < num_chunks
    at = row * num_chunks + parts
    maxima = tl.load(part_max_ptr + at, mask=live, other=float("-inf"), cache_modifier=".cg")
    max_ids = tl.load(part_max_id_ptr + at, mask=live, other=vocab_size, cache_modifier=".cg")
    top = tl.max(maxima, axis=0)
    greedy_id = tl.min(tl.where(maxima == top, max_ids, vocab_size), axis=0)
    drawn = greedy_id
    if RACE:
        scores = tl.load(part_score_ptr + at, mask=live, other=float("-inf"), cache_modifier=".cg")
        ids = tl.load(part_id_ptr + at, mask=live, other=vocab_size, cache_modifier=".cg")
        best = tl.max(scores, axis=0)
        raced = tl.min(tl.where(scores == best, ids, vocab_size), axis=0)
        # Every allowed token lost to -inf only if none was allowed: the greedy token then.
        raced = tl.where(best > float("-inf"), raced, greedy_id)
        drawn = tl.where(tl.load(greedy_ptr + row) != 0, greedy_id, raced)
    tl.store(out_ptr + row, tl.where(drawn < vocab_size, drawn, 0).to(tl.int64))


_TARGET_PROGRAMS = 1024  # chunks of all rows together: enough to keep every SM's loads in flight


def race_sample(
    logits: torch.Tensor,  # [B, V] float32, disallowed tokens at -inf
    temperatures: torch.Tensor | None,  # [B] or [B, 1] float32
    min_ps: torch.Tensor | None,  # [B] or [B, 1] float32
    is_greedy: torch.Tensor | None,  # [B] bool (or any number type: nonzero = greedy)
    keys: torch.Tensor | None,  # [B, 2] int64, 32-bit values
    bitmask: torch.Tensor | None = None,  # [B, ceil(V / 32)] int32: allowed tokens; None: all
    any_min_p: bool = True,  # False: the caller knows every min_p is 0 (one launch fewer)
    all_greedy: bool = False,  # True: every row is greedy (the four above may then be None)
    out: torch.Tensor | None = None,  # [B] int64 to write the tokens into
) -> torch.Tensor:  # [B] int64
    """One token per row: argmax for greedy rows, else a draw from softmax(logits / T) after
    min-p, over the tokens the bitmask allows (module docstring). Nothing is read back to the
    host. Each row's vocabulary is split into chunks run side by side (one program per row
    walked 128k tokens serially on 64 of the H200's 132 SMs at batch 64; the chunked draw took
    36 us there, profile_decode --temperature 1 --schema); the last chunk of each row to finish
    picks the row's token from its chunks' results (a second launch cost the host ~30-80 us)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be [B, V] float32 with contiguous rows, got {tuple(logits.shape)} "
            f"{logits.dtype} strides {logits.stride()}"
        )
    batch, vocab_size = logits.shape
    if all_greedy:  # unread: any tensor serves as their pointer
        temperatures = min_ps = is_greedy = keys = logits
    elif temperatures is None or min_ps is None or is_greedy is None or keys is None:
        raise ValueError("temperatures, min_ps, is_greedy and keys are needed unless all_greedy")
    elif keys.shape != (batch, 2):
        raise ValueError(f"keys must be [{batch}, 2], got {tuple(keys.shape)}")
    if bitmask is not None and (
        bitmask.dtype != torch.int32 or bitmask.shape != (batch, (vocab_size + 31) // 32)
    ):
        raise ValueError(
            f"bitmask must be [{batch}, {(vocab_size + 31) // 32}] int32, got "
            f"{tuple(bitmask.shape)} {bitmask.dtype}"
        )
    device = logits.device
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=device)
    elif out.shape != (batch,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"out must be [{batch}] int64, got {tuple(out.shape)} {out.dtype}")
    if not batch:
        return out
    if not all_greedy:  # each launch costs host time: convert only what needs it
        temperatures, min_ps = _flat_float(temperatures, batch), _flat_float(min_ps, batch)
        if is_greedy.dim() != 1 or not is_greedy.is_contiguous():
            is_greedy = is_greedy.reshape(batch).contiguous()
        if not keys.is_contiguous():
            keys = keys.contiguous()
    blocks = cdiv(vocab_size, _BLOCK)
    num_chunks = max(1, min(blocks, cdiv(_TARGET_PROGRAMS, batch)))
    chunk_len = cdiv(blocks, num_chunks) * _BLOCK
    num_chunks = cdiv(vocab_size, chunk_len)
    # Each part starts 64 bytes into the next, whatever batch x num_chunks is: a pointer's
    # alignment is part of what Triton specializes on, so an unaligned part was a new compile the
    # first time a batch size of its class came (benchmarks/gpu/compile_watch.py).
    stride = -(-batch * num_chunks // 16) * 16
    parts = _kept_zeros(device, 4 * stride, torch.float32).view(4, stride)[:, : batch * num_chunks]
    parts = parts.unflatten(1, (batch, num_chunks))  # [4, B, S] views, rows contiguous
    part_max, part_score = parts[0], parts[1]
    part_max_id, part_id = parts[2].view(torch.int32), parts[3].view(torch.int32)
    mask = out  # unread without a mask
    if bitmask is not None:
        mask = bitmask if bitmask.is_contiguous() else bitmask.contiguous()
    race = not all_greedy
    floor = race and any_min_p
    # From the vocabulary alone, not the batch: each new value was a new compile (~1 s of a
    # serving step the first time a batch of that size came).
    chunks_p2 = next_power_of_2(blocks)
    count = _kept_zeros(device, batch, torch.int32)
    common = (
        logits, temperatures, min_ps, keys, mask, part_max, part_max_id, part_score, part_id,
        is_greedy, out, count, vocab_size, logits.stride(0), mask.stride(0), num_chunks,
        chunk_len,
    )  # fmt: skip
    grid = (batch, num_chunks)
    if floor:
        _chunk_kernel[grid](
            *common, BLOCK=_BLOCK, CHUNKS_P2=chunks_p2, HAS_MASK=bitmask is not None,
            MAX_ONLY=True, USE_FLOOR=False, RACE=race,
        )  # fmt: skip
    _chunk_kernel[grid](
        *common, BLOCK=_BLOCK, CHUNKS_P2=chunks_p2, HAS_MASK=bitmask is not None,
        MAX_ONLY=False, USE_FLOOR=floor, RACE=race,
    )  # fmt: skip
    return out


_kept: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# Outgrown buffers stay allocated: a CUDA graph of a draw (worker/draw_graphs.py) reads the
# buffer it was captured with for as long as it lives.
_outgrown: list[torch.Tensor] = []


def _flat_float(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch] float32 contiguous: `t` itself when it already is."""
    if t.dim() == 1 and t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.reshape(batch).to(torch.float32).contiguous()


def _kept_zeros(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """[numel] of `dtype` on `device`, zeros when first made, kept between draws: the chunks'
    partial results (float32, each draw reads only what it wrote) and the per-row chunk counters
    (int32, each draw leaves them zero). Draws run on one stream: two at once would share them."""
    buf = _kept.get((device, dtype))
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _outgrown.append(buf)
        buf = _kept[device, dtype] = torch.zeros(max(numel, 1 << 16), dtype=dtype, device=device)
    return buf[:numel]
