"""A draft tree for one request's verify pass (EAGLE with speculative_eagle_topk > 1): node 0 is
the request's last token, nodes 1..M the draft tokens in breadth-first order. Node i sits at
rotary position start + depth(i) and KV slot position start + i during the verify pass, and sees
its ancestors and itself (`ancestor_mask`); after acceptance the accepted path's KV moves to the
positions start + 1.. (`spec_step.py`). A chain is the tree whose node i has parent i - 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [M] token of node i + 1
    parents: list[int]  # [M] parent of node i + 1, in 0..i (0: the root)
    depths: list[int] = field(init=False)  # [M] depth of node i + 1 (>= 1)
    children: dict[tuple[int, int], int] = field(init=False)  # (node, token) -> child

    def __post_init__(self) -> None:
        self.depths = []
        self.children = {}
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents), start=1):
            if not 0 <= parent < i:
                raise ValueError(f"node {i}: parent {parent} is invalid: expected 0..{i - 1}")
            if (parent, token) in self.children:
                raise ValueError(f"node {i}: token {token} twice under node {parent}")
            self.depths.append(1 + (self.depths[parent - 1] if parent else 0))
            self.children[(parent, token)] = i

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(list(tokens), list(range(len(tokens))))

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return 1 + len(self.tokens)

    def depth(self, node: int) -> int:
        return self.depths[node - 1] if node else 0

    def ancestor_mask(self) -> torch.Tensor:  # [M + 1, M + 1] bool: row sees column
        n = self.num_nodes
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[0, 0] = True
        for i, parent in enumerate(self.parents, start=1):
            mask[i] = mask[parent]
            mask[i, i] = True
        return mask
