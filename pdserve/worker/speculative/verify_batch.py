"""The ForwardBatch of a speculative pass: ragged sequences of fed tokens at explicit positions,
causal (a chain, a prefill chunk) or under a tree mask (a draft tree; the EAGLE head's expansion
rows), over the paged KV."""

from __future__ import annotations

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
