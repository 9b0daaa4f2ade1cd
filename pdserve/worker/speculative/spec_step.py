"""One speculative decode step: draft tokens for every row, one target forward pass over each row's
last token and its drafts (a causal extend over the paged KV: a chain needs no tree mask), then
acceptance position by position (verify.py): every accepted token goes through the scheduler's
`process_sampled` (FinishChecker: stop ids and strings, lengths, the grammar) in order, so a row
stops where the plain loop would. The KV of rejected positions is left as garbage past
`num_computed` and the pages holding only such positions go back (`Scheduler.trim_pages`).

A step speculates when some row decodes an output token its drafter can serve; prefill chunks
(and decodes an EAGLE head has no state for yet) are fed in the same pass as scheduled and sampled
as in the plain loop.

Where the worker captures CUDA graphs, a chain verify pass (NGRAM, EAGLE with topk 1) replays one
(`verify_graphs`, a CudaGraphRunner of 1 + k tokens a row) when every row feeds at most 1 + k
tokens and no row uses a LoRA adapter: each row is padded after its real tokens
(verify_batch.build_padded_chain_batch), which its real tokens never attend to, so the logits at
the real tokens are those of the eager pass. Tree verify passes (topk > 1), steps with adapters
and longer prefill chunks riding along run eagerly. (The EAGLE head's chain drafting has graphs
of its own: eagle_chain.py.)

A row that wants hidden states or prompt logprobs (read per fed token) makes the whole step a
plain one (`can_run`). Speculation never preempts: a row gets drafts only for the
pages free now (`Scheduler.reserve_positions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.protocol import KVReady
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch, Scheduler
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.sampler import (
    SamplingRow,
    build_skipping_bad_rows,
    is_plain_greedy,
    sample_on_device,
)
from pdserve.worker.speculative.draft_tree import DraftTree
from pdserve.worker.speculative.ngram import ngram_draft
from pdserve.worker.speculative.prompt_hidden import PROMPT_HIDDEN_ROWS, decode_prompt_hidden
from pdserve.worker.speculative.verify_batch import (
    PaddedBatch,
    build_extend_batch,
    build_padded_chain_batch,
    build_tree_batch,
    slot_of,
)

if TYPE_CHECKING:
    from pdserve.worker.cuda_graph_runner import CudaGraphRunner

logger = logging.getLogger(__name__)


@dataclass
class SpecRow:
    """One request's part of a verify pass."""

    item: BatchItem  # as scheduled: a decode (one token), or a prefill chunk fed as is
    drafts: list[int]  # draft tokens fed after the item's tokens (a tree's in node order)
    offset: int = 0  # its first row among the verify pass's tokens
    tree: DraftTree | None = None  # None: the drafts are a chain
    speculates: bool = True  # False: a prefill chunk, or a decode its drafter cannot serve yet

    @property
    def num_tokens(self) -> int:
        return self.item.num_tokens + len(self.drafts)

    @property
    def root_row(self) -> int:
        """Its row, in the verify pass, of the item's last token (node 0)."""
        return self.offset + self.item.num_tokens - 1

    @property
    def fed_ids(self) -> list[int]:
        req, start = self.item.req, self.item.start
        return [*req.all_ids[start : start + self.item.num_tokens], *self.drafts]

    def next_node(self, node: int, token_id: int) -> int | None:
        """The draft node after `node` that holds token_id, if any (node 0: the last token)."""
        if self.tree is not None:
            return self.tree.children.get((node, token_id))
        return node + 1 if node < len(self.drafts) and self.drafts[node] == token_id else None


class Drafter(Protocol):
    """A model-based drafter (EagleDrafter; benchmarks plug in others)."""

    needs_hidden: bool  # plain steps and verify passes hand it the target's hidden states

    def has_state(self, req: Request) -> bool: ...  # whether it can draft for req now

    def draft(self, reqs: list[Request], num_drafts: list[int]) -> list[list[int]]: ...

    def draft_tree(  # speculative_eagle_topk > 1 only
        self, reqs: list[Request], budgets: list[int], depths: list[int], topk: int
    ) -> list[DraftTree]: ...

    def bootstrap(self, req: Request, rows: torch.Tensor) -> None: ...  # needs_hidden only

    def after_verify(
        self, rows: list[SpecRow], paths: list[list[int]], hidden: torch.Tensor | None
    ) -> None: ...  # paths: each row's accepted nodes, its last token's (0) first

    def observe(
        self, items: list[BatchItem], hidden: torch.Tensor, row_starts: list[int]
    ) -> None: ...


@dataclass
class SpecStats:
    """Cumulative counts for /metrics: accepted tokens per step = num_tokens / num_row_steps."""

    num_verify_steps: int = 0  # verify passes run
    num_row_steps: int = 0  # rows verified, summed over passes
    num_drafts: int = 0  # draft tokens proposed
    num_tokens: int = 0  # tokens emitted by verified rows (accepted drafts + one per row)
    num_graph_steps: int = 0  # verify passes replayed from a CUDA graph

    @property
    def accept_length(self) -> float:
        return self.num_tokens / self.num_row_steps if self.num_row_steps else 0.0


class SpeculativeDecoder:
    """Drafts and verifies decode steps for one worker (see the module docstring)."""

    def __init__(
        self,
        config: SpeculativeConfig,
        runner: ModelRunner,
        scheduler: Scheduler,
        sampling_row: Callable[[Request], SamplingRow],
        max_context_len: int,
        drafter: Drafter | None = None,
        verify_graphs: CudaGraphRunner | None = None,
    ) -> None:
        """drafter: an EAGLE drafter (eagle_drafter.py); None: prompt lookup (NGRAM).
        verify_graphs: the chain verify pass's CUDA graphs (factory.make_verify_graphs)."""
        self.config = config
        self.runner = runner
        self.scheduler = scheduler
        self.sampling_row = sampling_row
        self.max_context_len = max_context_len
        self.drafter = drafter
        self.verify_graphs = verify_graphs
        self.stats = SpecStats()

    # ------------------------------------------------------------------ which steps

    def can_speculate(self, req: Request) -> bool:
        """Rows that read something per fed token (hidden states, prompt logprobs) do not."""
        outputs = req.outputs
        if isinstance(outputs, ExtraOutputs) and outputs.wants_rows:
            return False
        return self.drafter is None or self.drafter.has_state(req)

    @property
    def wants_hidden(self) -> bool:
        """Whether plain steps must read every fed token's hidden state out for `observe`."""
        return self.drafter is not None and self.drafter.needs_hidden

    @property
    def prompt_hidden_rows(self) -> int:
        """Prompt positions whose hidden states a prefill worker should send (EAGLE)."""
        return PROMPT_HIDDEN_ROWS if self.wants_hidden else 0

    def bootstrap(self, req: Request, ready: KVReady) -> None:
        """Decode role: req's prompt KV came from a prefill worker, with the hidden states of
        its last positions when asked for: the drafter starts from them."""
        if self.wants_hidden and ready.spec_hidden:
            rows = decode_prompt_hidden(
                ready.spec_hidden, ready.spec_hidden_shape, ready.spec_hidden_dtype
            )
            self.drafter.bootstrap(req, rows)

    def observe(self, batch: ScheduledBatch, hidden: torch.Tensor, row_starts: list[int]) -> None:
        """After a plain step (hidden: [T, hidden], every fed token): the draft catches up."""
        if self.wants_hidden:
            self.drafter.observe(batch.items, hidden, row_starts)

    def can_run(self, batch: ScheduledBatch) -> bool:
        """Whether some row can speculate and every other one can ride along (prefill chunks
        and decodes without a drafter state are fed as they are, in the same pass)."""
        for item in batch.items:
            req = item.req
            if req.num_inflight or (
                isinstance(req.outputs, ExtraOutputs) and req.outputs.wants_rows
            ):
                return False
        return any(self._speculates(item) for item in batch.items)

    def _speculates(self, item: BatchItem) -> bool:
        """A decode of an output token that the drafter can serve."""
        req = item.req
        is_decode = item.num_tokens == 1 and item.samples and item.start >= len(req.prompt_ids)
        return is_decode and self.can_speculate(req)

    # ------------------------------------------------------------------ one step

    def run(self, batch: ScheduledBatch) -> list[Request]:
        """Draft, verify and record one step; returns the requests that got tokens or ended."""
        rows = self._plan(batch)
        hidden, logits = self._verify_forward(rows, all_hidden=self.wants_hidden)
        touched, paths = self._accept(rows, logits)
        self._compact_tree_kv(rows, paths)
        if self.wants_hidden:
            spec = [i for i, row in enumerate(rows) if row.speculates]
            fed = [i for i, row in enumerate(rows) if not row.speculates]
            self.drafter.after_verify([rows[i] for i in spec], [paths[i] for i in spec], hidden)
            if fed:  # the head follows the rows it did not draft for, as after a plain step
                items = [rows[i].item for i in fed]
                self.drafter.observe(items, hidden, [rows[i].offset for i in fed])
        for row in rows:
            req = row.item.req
            if req.finish is None:
                self.scheduler.trim_pages(req)
        return touched

    def _plan(self, batch: ScheduledBatch) -> list[SpecRow]:
        """Each row's drafts, within its token limits and the pages free now."""
        items = batch.items
        speculates = [self._speculates(it) for it in items]
        rooms = [self._room(it) if s else 0 for it, s in zip(items, speculates)]
        trees: list[DraftTree | None] = [None] * len(items)
        if self.config.speculative_eagle_topk > 1 and self.drafter is not None:
            trees = [
                t if spec else None for t, spec in zip(self._draft_trees(items, rooms), speculates)
            ]
            drafts = [t.tokens if t is not None else [] for t in trees]
        elif self.drafter is not None:  # the head writes KV at the draft positions: pages first
            rooms = [self._reserve(it, room) for it, room in zip(items, rooms)]
            drafts = self.drafter.draft([it.req for it in items], rooms)
        else:
            drafts = [self._ngram(it.req, room) for it, room in zip(items, rooms)]
            drafts = [d[: self._reserve(it, len(d))] for it, d in zip(items, drafts)]
        rows, offset = [], 0
        for item, row_drafts, tree, spec in zip(items, drafts, trees, speculates):
            rows.append(SpecRow(item, row_drafts, offset, tree, spec))
            offset += rows[-1].num_tokens
        return rows

    def _draft_trees(self, items: list[BatchItem], rooms: list[int]) -> list[DraftTree]:
        """EAGLE trees: up to num_draft_tokens - 1 nodes, at most `room` deep; the head's
        expansion rows and the tree's nodes take the positions after each row's last token."""
        cfg = self.config
        topk, steps = cfg.speculative_eagle_topk, cfg.speculative_num_steps
        budgets, depths = [], []
        for item, room in zip(items, rooms):
            nodes = cfg.speculative_num_draft_tokens - 1 if room > 0 else 0
            need = max(nodes, topk * (min(steps, room) - 1))
            fits = self._reserve(item, need) == need
            budgets.append(nodes if fits else 0)
            depths.append(min(steps, room) if fits else 0)
        return self.drafter.draft_tree([it.req for it in items], budgets, depths, topk)

    def _room(self, item: BatchItem) -> int:
        """Most drafts worth feeding: the last token of a request is sampled, never drafted."""
        req = item.req
        room = min(
            self.config.num_drafts,
            req.sampling.max_new_tokens - len(req.output_ids) - 1,
            self.max_context_len - req.seq_len,
        )
        return max(room, 0)

    def _reserve(self, item: BatchItem, num_drafts: int) -> int:
        """Pages for the drafts' positions, as far as free pages go; returns how many fit."""
        if num_drafts == 0:
            return 0
        have = self.scheduler.reserve_positions(item.req, item.start + 1 + num_drafts)
        return max(min(num_drafts, have - item.start - 1), 0)

    def _ngram(self, req: Request, num_drafts: int) -> list[int]:
        cfg = self.config
        return ngram_draft(
            req.all_ids,
            num_drafts,
            cfg.speculative_ngram_min_match_window_size,
            cfg.speculative_ngram_max_match_window_size,
        )

    @torch.inference_mode()
    def _verify_forward(
        self, rows: list[SpecRow], all_hidden: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The target's logits at every fed token ([T, V] float32), and its final-normed hidden
        states there ([T, hidden]) when all_hidden."""
        runner = self.runner
        items = [BatchItem(r.item.req, r.item.start, r.num_tokens) for r in rows]
        lora = runner._lora_batch(ScheduledBatch(items))
        vision = runner.model_config.vision is not None  # image rows, M-RoPE: no graphs
        padded = self._graph_batch(rows) if lora is None and not vision else None
        if padded is None:
            fb = build_verify_batch(rows, runner.page_size, runner.device)
            fb.lora = lora
            if vision:  # a chain's fed tokens sit at consecutive positions, as a step's do
                fb.mm = runner.model.multimodal_batch(items, runner.device)
        # Prefill chunks are done once fed (their prompt pages go to the prefix cache as in
        # the plain loop); decodes' num_computed moves as their tokens are accepted.
        self.scheduler.advance(ScheduledBatch([r.item for r in rows if not r.speculates]))
        if padded is not None:
            hidden = self.verify_graphs.replay(padded.batch)  # [B * n, hidden], padding too
            hidden = hidden[torch.tensor(padded.real_rows, device=hidden.device)]  # [T, hidden]
            self.stats.num_graph_steps += 1
        else:
            hidden = runner.model.forward_hidden(fb, runner.kv_pool, all_rows=True)  # [T, hidden]
        logits = runner.model.compute_logits(hidden)  # [T, V] float32
        return (hidden if all_hidden else None), logits

    def _graph_batch(self, rows: list[SpecRow]) -> PaddedBatch | None:
        """The pass padded to the verify graphs' 1 + k tokens a row, when they can replay it: a
        chain, no row feeding more (a longer prefill chunk riding along), a captured size."""
        graphs = self.verify_graphs
        if graphs is None or not graphs.batch_sizes or any(r.tree is not None for r in rows):
            return None
        if any(r.num_tokens > graphs.tokens_per_row for r in rows):
            return None
        entries = [(r.item.req.page_ids, r.item.start, r.fed_ids) for r in rows]
        padded = build_padded_chain_batch(entries, graphs.tokens_per_row, self.runner.page_size)
        return padded if graphs.can_run(padded.batch) else None

    def _accept(
        self, rows: list[SpecRow], logits: torch.Tensor
    ) -> tuple[list[Request], list[list[int]]]:
        """Walk the positions: sample each live row's token from the target there, record it,
        go on while a draft node holds it. Returns the touched requests and, per row, the nodes
        whose tokens were fed and kept: 0 (its last token), then the accepted drafts."""
        start = time.perf_counter()
        paths = [[0] for _ in rows]
        live = [i for i, row in enumerate(rows) if row.item.samples]
        touched = [rows[i].item.req for i in live]
        greedy_ids = None
        if all(is_plain_greedy(self.sampling_row(rows[i].item.req)) for i in live):
            greedy_ids = logits.argmax(dim=-1).tolist()  # [T]: one read for the whole pass
        depth = 0
        while live:
            picks = [rows[i].root_row + paths[i][-1] for i in live]
            if greedy_ids is not None:
                results = [(greedy_ids[p], None, None) for p in picks]
            else:
                results = self._sample(logits, picks, [rows[i].item.req for i in live])
            next_live = []
            for i, result in zip(live, results):
                if result is None:  # the row's parameters could not be sampled with: ended
                    continue
                row = rows[i]
                req = row.item.req
                token_id, logprob, top = result
                if row.speculates:  # KV up to the fed token
                    req.num_computed = row.item.start + 1 + depth
                self.scheduler.process_sampled(row.item, token_id, logprob, top)
                node = row.next_node(paths[i][-1], token_id)
                if req.finish is None and node is not None:
                    paths[i].append(node)
                    next_live.append(i)
            live = next_live
            depth += 1
        spec = [i for i, row in enumerate(rows) if row.speculates]
        self._count([rows[i] for i in spec], [len(paths[i]) - 1 for i in spec])
        logger.debug("verify of %d rows: %.2f ms", len(rows), (time.perf_counter() - start) * 1e3)
        return touched, paths

    def _compact_tree_kv(self, rows: list[SpecRow], paths: list[list[int]]) -> None:
        """Move the target's KV of each tree's accepted nodes to the positions they now hold
        (node at depth d: from position start + node to start + d), every layer at once."""
        src, dst = [], []
        page_size = self.runner.page_size
        for row, path in zip(rows, paths):
            req = row.item.req
            if row.tree is None or req.finish is not None:
                continue
            for depth, node in enumerate(path):
                if node != depth:
                    src.append(slot_of(req.page_ids, row.item.start + node, page_size))
                    dst.append(slot_of(req.page_ids, row.item.start + depth, page_size))
        if src:
            buf = self.runner.kv_pool.buffer  # [L, 2, P, page, H, D]
            flat = buf.view(buf.shape[0], 2, -1, *buf.shape[4:])  # [L, 2, P * page, H, D]
            device = buf.device
            flat[:, :, torch.tensor(dst, device=device)] = flat[
                :, :, torch.tensor(src, device=device)
            ]

    def _sample(
        self, logits: torch.Tensor, picks: list[int], reqs: list[Request]
    ) -> list[tuple[int, float | None, list[list[float]] | None] | None]:
        """The plain loop's sampler on logits[picks] (one row per request, in order)."""
        rows = [self.sampling_row(req) for req in reqs]
        device = logits.device
        partial = build_skipping_bad_rows(rows, logits.shape[-1], device)
        for bad in partial.bad_rows:
            rid = reqs[bad.row_idx].rid
            logger.warning("request %s: cannot sample: %s", rid, bad.message)
            self.scheduler.abort(rid, f"cannot sample: {bad.message}")
        results: list[tuple[int, float | None, list[list[float]] | None] | None] = [None] * len(
            reqs
        )
        if partial.batch is None:
            return results
        index = torch.tensor([picks[i] for i in partial.row_indices], device=device)
        out = sample_on_device(logits.index_select(0, index), partial.batch).to_host()
        for k, i in enumerate(partial.row_indices):
            req = reqs[i]
            logprob = out.logprobs[k] if out.logprobs is not None and req.return_logprob else None
            top = None
            if out.top_logprobs is not None and req.top_logprobs_num > 0:
                ids, lps = out.top_logprobs[k]
                top = [[tid, lp] for tid, lp in zip(ids, lps)]
            results[i] = (out.token_ids[k], logprob, top)
        return results

    def _count(self, rows: list[SpecRow], accepted: list[int]) -> None:
        stats = self.stats
        stats.num_verify_steps += 1
        stats.num_row_steps += len(rows)
        stats.num_drafts += sum(len(r.drafts) for r in rows)
        stats.num_tokens += sum(accepted) + len(rows)
        for row in rows:
            row.item.req.spec_verify_ct += 1


def build_verify_batch(rows: list[SpecRow], page_size: int, device: torch.device) -> ForwardBatch:
    """A ragged extend batch of each row's fed tokens and drafts at positions start.. ."""
    if any(r.tree is not None for r in rows):
        return build_tree_batch(
            [
                (
                    r.item.req.page_ids,
                    r.item.start,
                    r.fed_ids,
                    r.tree or DraftTree.chain(r.fed_ids[1:]),
                )
                for r in rows
            ],
            page_size,
            device,
        )
    return build_extend_batch(
        [(r.item.req.page_ids, r.item.start, r.fed_ids) for r in rows], page_size, device
    )
