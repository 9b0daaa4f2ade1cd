"""The ForwardBatch of a speculative pass: ragged sequences of fed tokens at explicit positions,
causal (a chain, a prefill chunk) or under a tree mask (a draft tree; the EAGLE head's expansion
rows), over the paged KV; and a chain pass padded to a fixed number of tokens a row, the shape
its CUDA graphs are captured on (worker/cuda_graph_runner.py)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.speculative.draft_tree import DraftTree


def slot_of(page_ids: list[int], position: int, page_size: int) -> int:
    return page_ids[position // page_size] * page_size + position % page_size


def build_extend_batch(
    entries: list[tuple[list[int], int, list[int]]],
    page_size: int,
    device: torch.device,
    is_decode: bool = False,
) -> ForwardBatch:
    """A ragged batch over (page ids, first position, input ids) per sequence: each sequence's
    tokens at positions start.., attending causally over its KV before them and themselves."""
    bsz = len(entries)
    ext_lens = np.array([len(ids) for _, _, ids in entries], dtype=np.int64)  # [B]
    starts = np.array([start for _, start, _ in entries], dtype=np.int64)  # [B]
    ends = np.cumsum(ext_lens)  # [B]
    max_pages = max(len(pages) for pages, _, _ in entries)
    table = np.zeros((bsz, max_pages), dtype=np.int32)  # [B, P]
    for b, (pages, _, _) in enumerate(entries):
        table[b, : len(pages)] = pages
    input_ids = [t for _, _, ids in entries for t in ids]  # [T]
    row_of = np.repeat(np.arange(bsz), ext_lens)  # [T]
    positions = np.arange(int(ends[-1])) - (ends - ext_lens)[row_of] + starts[row_of]  # [T]
    slots = table[row_of, positions // page_size].astype(np.int64) * page_size
    slots += positions % page_size
    seq_lens = starts + ext_lens

    def dev(a: np.ndarray | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

    return ForwardBatch(
        input_ids=dev(input_ids, torch.int64),
        positions=dev(positions, torch.int64),
        slots=dev(slots, torch.int64),
        page_table=dev(table, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        seq_lens_cpu=seq_lens.tolist(),
        extend_lens_cpu=ext_lens.tolist(),
        logit_idx=dev(ends - 1, torch.int64),
        is_decode=is_decode,
        page_table_cpu=torch.from_numpy(table),
    )


class PaddedBatch(NamedTuple):
    batch: ForwardBatch  # every sequence exactly tokens_per_row tokens, its padding after them
    real_rows: list[int]  # [T]: the row in batch of each real token, in build_extend_batch's order


def build_padded_chain_batch(
    entries: list[tuple[list[int], int, list[int]]],
    tokens_per_row: int,
    page_size: int,
    device: torch.device | str = "cpu",
) -> PaddedBatch:
    """build_extend_batch's causal batch with each sequence padded to tokens_per_row tokens, so
    every row is an extend of exactly that many (a verify graph's shape). Padding tokens come
    after a row's real ones, which never see them (causal); they feed token 0 at position 0 into
    slot 0 (page 0, never allocated), and the row's seq_len counts them. On the host by default:
    a graph's `GraphInputs.load` copies each array once into its static buffer."""
    n, bsz = tokens_per_row, len(entries)
    ext_lens = np.array([len(ids) for _, _, ids in entries], dtype=np.int64)  # [B]
    if bsz == 0 or ext_lens.min() < 1 or ext_lens.max() > n:
        raise ValueError(f"sequences of {ext_lens.tolist()} tokens: expected 1..{n} each")
    starts = np.array([start for _, start, _ in entries], dtype=np.int64)  # [B]
    table = np.zeros((bsz, max(len(pages) for pages, _, _ in entries)), dtype=np.int32)  # [B, P]
    input_ids = np.zeros((bsz, n), dtype=np.int64)  # [B, n]
    for b, (pages, _, ids) in enumerate(entries):
        table[b, : len(pages)] = pages
        input_ids[b, : len(ids)] = ids
    offsets = np.arange(n)  # [n]
    is_real = offsets[None, :] < ext_lens[:, None]  # [B, n]
    positions = np.where(is_real, starts[:, None] + offsets[None, :], 0)  # [B, n]
    rows = np.arange(bsz)[:, None]  # [B, 1]
    slots = table[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
    slots = np.where(is_real, slots, 0)  # [B, n]
    seq_lens = starts + n  # [B]

    def dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype).to(device)

    batch = ForwardBatch(
        input_ids=dev(input_ids.reshape(-1), torch.int64),  # [B * n]
        positions=dev(positions.reshape(-1), torch.int64),  # [B * n]
        slots=dev(slots.reshape(-1), torch.int64),  # [B * n]
        page_table=dev(table, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        seq_lens_cpu=seq_lens.tolist(),
        extend_lens_cpu=[n] * bsz,
        logit_idx=dev(np.arange(bsz) * n + ext_lens - 1, torch.int64),
        is_decode=False,
        max_extend_len=n,
        page_table_cpu=torch.from_numpy(table),
    )
    return PaddedBatch(batch, np.flatnonzero(is_real.reshape(-1)).tolist())


def build_tree_batch(
    entries: list[tuple[list[int], int, list[int], DraftTree]],
    page_size: int,
    device: torch.device,
) -> ForwardBatch:
    """Each sequence's tree (page ids, start, [root token, *node tokens], tree): node i at
    rotary position start + depth(i) and KV slot position start + i, seeing its ancestors."""
    return build_masked_batch(
        [
            (
                pages,
                start,
                ids,
                [tree.depth(i) for i in range(len(ids))],
                list(range(len(ids))),
                tree.ancestor_mask(),
            )  # fmt: skip
            for pages, start, ids, tree in entries
        ],
        page_size,
        device,
    )


def build_masked_batch(
    entries: list[tuple[list[int], int, list[int], list[int], list[int], torch.Tensor]],
    page_size: int,
    device: torch.device,
) -> ForwardBatch:
    """Per sequence (page ids, tree start, input ids, rotary offsets, slot offsets, mask [n, W]):
    token i at rotary position start + rotary_offsets[i] and KV position start +
    slot_offsets[i], seeing every position below start and start + w where mask[i, w]."""
    width = max(mask.shape[1] for *_, mask in entries)
    tree_mask = torch.zeros(sum(len(ids) for _, _, ids, *_ in entries), width, dtype=torch.bool)
    input_ids, positions, slots, row = [], [], [], 0
    for pages, start, ids, rotary, offsets, mask in entries:
        tree_mask[row : row + len(ids), : mask.shape[1]] = mask
        row += len(ids)
        input_ids += ids
        positions += [start + r for r in rotary]
        slots += [slot_of(pages, start + o, page_size) for o in offsets]
    fb = build_extend_batch([(p, s, ids) for p, s, ids, *_ in entries], page_size, device)
    fb.positions = torch.tensor(positions, dtype=torch.int64, device=device)
    fb.slots = torch.tensor(slots, dtype=torch.int64, device=device)
    fb.tree_mask = tree_mask.to(device)
    fb.tree_starts = [start for _, start, *_ in entries]
    widths = [mask.shape[1] for *_, mask in entries]
    fb.seq_lens_cpu = [start + w for (_, start, *_), w in zip(entries, widths)]
    fb.seq_lens = torch.tensor(fb.seq_lens_cpu, dtype=torch.int32, device=device)
    fb.max_seq_len = max(fb.seq_lens_cpu)
    return fb
