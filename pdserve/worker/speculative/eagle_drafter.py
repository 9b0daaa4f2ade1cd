"""EAGLE drafting with a chain (topk = 1): the head (eagle_head.py) proposes tokens greedily, one
head step per draft, from its last output (all steps on the device, replayed from a CUDA graph
where the worker captures them: eagle_chain.py); after each verify pass it is re-run over the
accepted tokens with the target's hidden states, which overwrites the KV it wrote at rejected
guesses. Tree drafting (topk > 1) and the catch-up passes run eagerly.

A request's draft state (`Request.spec_state`, an `EagleState`) is the head's output at position
num_valid - 1 (it predicts the token after the pending one) with its KV valid below num_valid. A
request has a usable state when num_valid equals its num_computed; one without (a preempted
request being recomputed, a decode worker's request whose prompt was computed elsewhere) runs
plain steps, during which `observe` builds the state from the step's hidden states. On a decode
worker the head never saw the prompt: its KV for the prompt positions is zeroed, so its first
drafts are worse (the verify pass keeps the output exact either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.speculative.draft_tree import DraftTree
from pdserve.worker.speculative.eagle_chain import DraftChain, DraftGraphs, page_table_of
from pdserve.worker.speculative.eagle_head import EagleHead, eagle_model_config
from pdserve.worker.speculative.spec_step import SpecRow
from pdserve.worker.speculative.verify_batch import build_extend_batch, build_masked_batch


@dataclass
class EagleState:
    feature: torch.Tensor  # [hidden] model dtype, device: the head's output at num_valid - 1
    num_valid: int  # the head's KV holds positions < num_valid


@dataclass
class _Cand:
    """A candidate node of a draft tree being grown."""

    token: int
    parent: int  # index among the request's candidates; -1: the root
    score: float  # sum of the head's log-probabilities along the path
    depth: int  # >= 1
    feature: torch.Tensor | None  # [H]: the head's output at this node once expanded (the
    #                               root's feature for depth-1 nodes until then)
    head_row: int = -1  # its head row's slot offset after the root's position, once expanded


def _select(cands: list[_Cand], budget: int) -> DraftTree:
    """The budget best candidates (a parent scores at least its child, and ties go to the
    shallower node, so the set holds every kept node's parent), in breadth-first order."""
    best = sorted(range(len(cands)), key=lambda i: (-cands[i].score, cands[i].depth, i))[:budget]
    order = sorted(best, key=lambda i: (cands[i].depth, i))
    node_of = {c: n for n, c in enumerate(order, start=1)}
    parents = [node_of[cands[c].parent] if cands[c].parent >= 0 else 0 for c in order]
    return DraftTree([cands[c].token for c in order], parents)


class EagleDrafter:
    needs_hidden = True

    def __init__(self, head: EagleHead, pool: KVPool, runner: ModelRunner) -> None:
        self.head = head
        self.pool = pool  # one layer, the target's page ids
        self.runner = runner
        self.chain = DraftChain(head, runner.model, pool, runner.page_size)
        self.graphs: DraftGraphs | None = None  # the chain's CUDA graphs (capture_graphs)

    def capture_graphs(self, num_steps: int) -> None:
        """Capture the chain's drafting of up to num_steps tokens a row where the runner
        captured its decode steps (same batch sizes and contexts)."""
        decode = self.runner.graph_runner
        if decode is None or not decode.batch_sizes:
            return
        config = self.head.config
        self.graphs = DraftGraphs(
            self.chain, num_steps, decode.batch_sizes[-1], decode.max_pages,
            decode.max_context_len, config.hidden_size, self.runner.dtype, self.runner.device,
        )  # fmt: skip

    @classmethod
    def load(cls, spec: SpeculativeConfig, runner: ModelRunner) -> EagleDrafter:
        path = spec.speculative_draft_model_path
        config = eagle_model_config(path)
        target = runner.model_config
        mine = (config.hidden_size, config.vocab_size, config.head_dim)
        theirs = (target.hidden_size, target.vocab_size, target.head_dim)
        if mine != theirs:
            raise ValueError(
                f"speculative_draft_model_path={path!r}: (hidden_size, vocab_size, head_dim)="
                f"{mine} is invalid: expected the target's {theirs}"
            )
        head = EagleHead(config, runner.model.attention, runner.dtype, runner.device)
        head.load_weights(path)
        pool = KVPool(config, runner.num_pages, runner.page_size, runner.dtype, runner.device)
        drafter = cls(head, pool, runner)
        if spec.speculative_eagle_topk == 1:  # trees are drafted eagerly
            drafter.capture_graphs(spec.num_drafts)
        return drafter

    def has_state(self, req: Request) -> bool:
        state = req.spec_state
        return isinstance(state, EagleState) and state.num_valid == req.num_computed

    # ------------------------------------------------------------------ drafting

    @torch.inference_mode()
    def draft(self, reqs: list[Request], num_drafts: list[int]) -> list[list[int]]:
        """Up to num_drafts[b] greedy draft tokens for each request (all have a state): the
        head's chain on the device (eagle_chain.py), replayed from a CUDA graph when captured."""
        drafts: list[list[int]] = [[] for _ in reqs]
        live = [b for b, n in enumerate(num_drafts) if n > 0]
        if not live:
            return drafts
        feature = torch.stack([reqs[b].spec_state.feature for b in live])  # [B', H]
        # The head's first step writes at num_valid: the position after its state's.
        starts = [reqs[b].spec_state.num_valid for b in live]
        wanted = [num_drafts[b] for b in live]
        pages = [reqs[b].page_ids for b in live]
        graphs = self.graphs
        if graphs is not None and graphs.can_run(len(live), max(map(len, pages)), max(wanted)):
            tokens = graphs.replay(feature, starts, wanted, pages)  # [B', num_steps]
        else:
            device, steps = self.runner.device, max(wanted)
            tokens = self.chain(
                feature,
                torch.tensor(starts, device=device),
                torch.tensor(wanted, device=device),
                page_table_of(pages, max(map(len, pages))).to(device),
                steps,
                max(starts) + steps,
                host_rows=(starts, wanted),
            )  # [B', steps]
        for b, row, n in zip(live, tokens.tolist(), wanted):  # one read for the whole chain
            drafts[b] = row[:n]
        return drafts

    @torch.inference_mode()
    def draft_tree(
        self, reqs: list[Request], budgets: list[int], depths: list[int], topk: int
    ) -> list[DraftTree]:
        """EAGLE-2 trees: each step expands the `topk` best leaves (by the product of the head's
        probabilities along the path) into their `topk` likeliest tokens; the tree keeps the
        budgets[b] best nodes of all, at most depths[b] deep."""
        cands: dict[int, list[_Cand]] = {}
        frontier: dict[int, list[int]] = {}
        live = [b for b in range(len(reqs)) if budgets[b] > 0 and depths[b] > 0]
        if live:
            feature = torch.stack([reqs[b].spec_state.feature for b in live])  # [B', H]
            top = self._topk(feature, topk)
            for k, b in enumerate(live):
                cands[b] = [_Cand(t, -1, s, 1, feature[k]) for t, s in top[k]]
                frontier[b] = list(range(len(cands[b])))
        head_rows = dict.fromkeys(live, 0)
        for step in range(2, max(depths, default=0) + 1):
            expand = [b for b in live if depths[b] >= step]
            if not expand:
                break
            out = self._expand(reqs, expand, cands, frontier, head_rows)  # [T, H]
            top = self._topk(out, topk)
            row = 0
            for b in expand:
                new = []
                for c in frontier[b]:
                    parent = cands[b][c]
                    parent.feature = out[row]
                    for t, s in top[row]:
                        new.append(len(cands[b]))
                        cands[b].append(_Cand(t, c, parent.score + s, step, None))
                    row += 1
                frontier[b] = sorted(new, key=lambda i: -cands[b][i].score)[:topk]
        return [_select(cands.get(b, []), budgets[b]) for b in range(len(reqs))]

    def _topk(self, feature: torch.Tensor, topk: int) -> list[list[tuple[int, float]]]:
        """Per row of feature [N, H]: the head's topk (token, log-probability) pairs."""
        logp = torch.log_softmax(self.runner.model.compute_logits(feature), dim=-1)  # [N, V]
        top = logp.topk(topk, dim=-1)
        return [
            list(zip(ids, vals)) for ids, vals in zip(top.indices.tolist(), top.values.tolist())
        ]

    def _expand(
        self,
        reqs: list[Request],
        expand: list[int],
        cands: dict[int, list[_Cand]],
        frontier: dict[int, list[int]],
        head_rows: dict[int, int],
    ) -> torch.Tensor:  # [T, H]: the head's output for each frontier node, in order
        """One head pass over every frontier node: its token with its parent's feature, at
        its parent's position, seeing the head's rows of its ancestors (tree attention)."""
        entries, tokens, features = [], [], []
        for b in expand:
            req, nodes = reqs[b], frontier[b]
            for c in nodes:
                cands[b][c].head_row = head_rows[b]
                head_rows[b] += 1
            width = head_rows[b]
            mask = torch.zeros(len(nodes), width, dtype=torch.bool)
            for r, c in enumerate(nodes):
                a = c
                while a >= 0:  # itself and its ancestors: each ran a head row earlier
                    mask[r, cands[b][a].head_row] = True
                    a = cands[b][a].parent
            node_list = [cands[b][c] for c in nodes]
            entries.append(
                (req.page_ids, req.spec_state.num_valid, [n.token for n in node_list],
                 [n.depth - 1 for n in node_list], [n.head_row for n in node_list], mask)
            )  # fmt: skip
            tokens += [n.token for n in node_list]
            features += [
                cands[b][n.parent].feature if n.parent >= 0 else n.feature for n in node_list
            ]
        fb = build_masked_batch(entries, self.runner.page_size, self.runner.device)
        model = self.runner.model
        embeds = model.model.embed_tokens(torch.tensor(tokens, device=self.runner.device))
        return self.head(embeds, torch.stack(features), fb, self.pool, model.cos_sin_cache)

    def _run(
        self,
        entries: list[tuple[list[int], int, list[int]]],
        token_ids: torch.Tensor,  # [T] int64: each row's next token
        features: torch.Tensor,  # [T, H]
        is_decode: bool = False,
    ) -> torch.Tensor:  # [B, H]: the head's output at each sequence's last row
        fb = build_extend_batch(entries, self.runner.page_size, self.runner.device, is_decode)
        model = self.runner.model
        embeds = model.model.embed_tokens(token_ids.to(self.runner.device))  # [T, H]
        out = self.head(embeds, features, fb, self.pool, model.cos_sin_cache)  # [T, H]
        return out[fb.logit_idx]

    # ------------------------------------------------------------------ catching up

    @torch.inference_mode()
    def after_verify(
        self, rows: list[SpecRow], paths: list[list[int]], hidden: torch.Tensor
    ) -> None:
        """Re-run the head over each live row's accepted nodes (paths: node 0, then the
        accepted drafts) with the target's hidden states there (hidden: [T, H] of the verify
        pass), at the positions the accepted tokens now hold."""
        entries, tokens, index, reqs = [], [], [], []
        for row, path in zip(rows, paths):
            req = row.item.req
            if req.finish is not None:
                req.spec_state = None
                continue
            new = req.output_ids[-len(path) :]  # the accepted drafts and the target's token
            entries.append((req.page_ids, row.item.start, new))
            tokens += new
            index += [row.root_row + node for node in path]
            reqs.append(req)
        if entries:
            self._catch_up(entries, tokens, hidden[torch.tensor(index, device=hidden.device)], reqs)

    @torch.inference_mode()
    def observe(self, items: list[BatchItem], hidden: torch.Tensor, row_starts: list[int]) -> None:
        """After a plain step: run the head over each item's fed positions, paired with the
        tokens after them, so its state follows the target (hidden: [T, H], every fed token)."""
        entries, tokens, index, reqs = [], [], [], []
        for item, row_start in zip(items, row_starts):
            req = item.req
            if req.finish is not None or req.prefill_only or item.num_tokens == 0:
                req.spec_state = None
                continue
            nxt = req.all_ids[item.start + 1 : item.start + item.num_tokens + 1]
            if len(nxt) != item.num_tokens:  # the token after the last is not known yet
                req.spec_state = None
                continue
            state = req.spec_state
            if item.start > 0 and not (
                isinstance(state, EagleState) and state.num_valid == item.start
            ):
                self._zero_prefix(req, item.start)
            entries.append((req.page_ids, item.start, nxt))
            tokens += nxt
            index += range(row_start, row_start + item.num_tokens)
            reqs.append(req)
        if entries:
            self._catch_up(entries, tokens, hidden[torch.tensor(index, device=hidden.device)], reqs)

    def _catch_up(
        self,
        entries: list[tuple[list[int], int, list[int]]],
        tokens: list[int],
        features: torch.Tensor,  # [T, H]
        reqs: list[Request],
    ) -> None:
        token_ids = torch.tensor(tokens, dtype=torch.int64)
        out = self._run(entries, token_ids, features)  # [B, H]
        for k, ((_, start, ids), req) in enumerate(zip(entries, reqs)):
            req.spec_state = EagleState(out[k].clone(), start + len(ids))

    @torch.inference_mode()
    def bootstrap(self, req: Request, rows: torch.Tensor) -> None:
        """Decode role: the target's hidden states at the prompt's last positions (rows: [n, H],
        from the prefill worker): run the head over them, paired with the tokens after them."""
        prompt_len = len(req.prompt_ids)
        first = prompt_len - rows.shape[0]
        if first < 0 or rows.shape[1] != self.head.config.hidden_size or not req.output_ids:
            return  # not what was asked for: the first plain step starts the head instead
        self._zero_prefix(req, first)
        tokens = req.all_ids[first + 1 : prompt_len + 1]  # the last is the prefill's token
        features = rows.to(self.runner.device, self.runner.dtype)
        self._catch_up([(req.page_ids, first, tokens)], tokens, features, [req])

    def _zero_prefix(self, req: Request, num_positions: int) -> None:
        """The head has no KV for req's first positions (computed elsewhere): zero it, so its
        attention reads zeros there rather than another request's stale values. Pages shared
        through the prefix cache hold the KV of the request that computed them: kept."""
        page_size = self.runner.page_size
        num_pages = -(-num_positions // page_size)
        own = req.page_ids[req.num_shared_pages : num_pages]
        if own:
            self.pool.buffer[:, :, torch.tensor(own, device=self.pool.buffer.device)] = 0
