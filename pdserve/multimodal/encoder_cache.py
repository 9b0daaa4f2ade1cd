"""The prefill worker's cache of encoded images, by image hash, least recently used out first.

A request whose image was encoded before (the same image in another request, or a request
recomputed after preemption) skips the vision tower. Bounded by the rows (image tokens) it holds.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_tokens: int = 16384) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens} is invalid: expected >= 0")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()  # hash -> [n, hidden]
        self.num_tokens = 0
        self.num_hits = 0
        self.num_misses = 0

    def get(self, image_hash: int) -> torch.Tensor | None:
        embeds = self._entries.get(image_hash)
        if embeds is None:
            self.num_misses += 1
            return None
        self._entries.move_to_end(image_hash)
        self.num_hits += 1
        return embeds

    def put(self, image_hash: int, embeds: torch.Tensor) -> None:
        """Keep `embeds` ([n, hidden]); an entry larger than the whole cache is not kept."""
        if image_hash in self._entries or embeds.shape[0] > self.max_tokens:
            return
        self._entries[image_hash] = embeds
        self.num_tokens += embeds.shape[0]
        while self.num_tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self.num_tokens -= old.shape[0]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.num_tokens = 0
