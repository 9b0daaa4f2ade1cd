"""A worker's adapters: every loaded adapter on the host, the device slots they are swapped into
(least recently used out first), and the per-batch `LoraBatch` the model applies.

Who holds an adapter's weights:
| state                 | host (`adapters`)  | device slot (`LoraWeights`)            |
|-----------------------|--------------------|----------------------------------------|
| `load`                | yes                | no (written on first use)              |
| `prepare` for a batch | yes                | yes; may evict the LRU adapter not in  |
|                       |                    | this batch (the scheduler admits at    |
|                       |                    | most num_slots distinct adapters)      |
| `unload`              | dropped            | slot freed and zeroed                  |

Given the model, the slots' A matrices are folded into its projection weights (lora_weights.py):
the manager is built once, after the weights are loaded and before any CUDA graph is captured.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

import torch
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.config.lora_config import LORA_TARGET_MODULES, LoraConfig
from pdserve.worker.lora.adapter import LoraAdapter, load_adapter
from pdserve.worker.lora.lora_layers import LoraBatch
from pdserve.worker.lora.lora_weights import LoraWeights, model_linears

logger = logging.getLogger(__name__)

_DEFAULT_MAX_RANK = 16


class LoraManager:
    def __init__(
        self,
        config: LoraConfig,
        model_config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        model: nn.Module | None = None,  # its projections get the slots folded in
    ) -> None:
        self.model_config = model_config
        self.device = device
        initial = [load_adapter(ref.name, ref.path, model_config) for ref in config.lora_paths]
        targets = config.lora_target_modules
        if targets is None:
            used = {m for adapter in initial for m in adapter.target_modules}
            targets = tuple(m for m in LORA_TARGET_MODULES if m in used) or LORA_TARGET_MODULES
        max_rank = config.max_lora_rank or max((a.rank for a in initial), default=_DEFAULT_MAX_RANK)
        self.num_slots = config.max_loras_per_batch
        linears = model_linears(model) if model is not None else None
        self.weights = LoraWeights(
            model_config, targets, self.num_slots, max_rank, dtype, device, linears
        )
        self.adapters: dict[str, LoraAdapter] = {}
        # The prefix cache's namespace of each adapter; never reused, so a name loaded again
        # with other weights never matches KV computed under the old ones.
        self.cache_keys: dict[str, int] = {}
        self._next_key = itertools.count(1)
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        for adapter in initial:
            self._register(adapter)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, name: str, path: str) -> None:
        """Load a PEFT adapter under `name`; ValueError naming the problem."""
        if name in self.adapters:
            raise ValueError(f"LoRA adapter {name!r} is already loaded (unload it first)")
        self._register(load_adapter(name, path, self.model_config))

    def unload(self, name: str) -> None:
        """Forget `name`; the caller has made sure no request uses it."""
        self.check_known(name)
        del self.adapters[name]
        del self.cache_keys[name]
        slot = self._slots.pop(name, None)
        if slot is not None:
            self.weights.clear(slot)
        logger.info("LoRA adapter %s unloaded", name)

    def check_known(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(
                f"LoRA adapter {name!r} is not loaded: expected one of {sorted(self.adapters)}"
            )

    def prepare(self, row_names: list[str | None]) -> LoraBatch | None:
        """The batch's LoRA rows (one adapter name or None per token row), swapping adapters
        into slots as needed; None when every row is the base model's."""
        distinct = list(dict.fromkeys(n for n in row_names if n is not None))
        if not distinct:
            return None
        if len(distinct) > self.num_slots:
            raise ValueError(
                f"{len(distinct)} distinct LoRA adapters in one batch: at most "
                f"max_loras_per_batch={self.num_slots}"
            )
        slot_of = {name: self._acquire(name, set(distinct)) for name in distinct}
        row_slots = [-1 if n is None else slot_of[n] for n in row_names]
        return LoraBatch.build(self.weights, row_slots, self.device)

    def _register(self, adapter: LoraAdapter) -> None:
        w = self.weights
        if adapter.rank > w.max_rank:
            raise ValueError(
                f"LoRA adapter {adapter.name!r} has rank {adapter.rank}: above "
                f"max_lora_rank={w.max_rank}"
            )
        extra = sorted(adapter.target_modules - set(w.target_modules))
        if extra:
            raise ValueError(
                f"LoRA adapter {adapter.name!r} adapts {extra}, outside lora_target_modules="
                f"{list(w.target_modules)}"
            )
        self.adapters[adapter.name] = adapter
        self.cache_keys[adapter.name] = next(self._next_key)
        logger.info(
            "LoRA adapter %s loaded from %s (rank %d)", adapter.name, adapter.path, adapter.rank
        )

    def _acquire(self, name: str, pinned: set[str]) -> int:
        """The slot holding `name`, writing it into a free or least recently used slot."""
        self.check_known(name)
        if name in self._slots:
            self._slots.move_to_end(name)
            return self._slots[name]
        used = set(self._slots.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(n for n in self._slots if n not in pinned)
            slot = self._slots.pop(victim)
        self.weights.write(slot, self.adapters[name])
        self._slots[name] = slot
        return slot
