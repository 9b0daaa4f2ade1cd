"""One request's state inside a worker's scheduler: its tokens, its pages, and how far its KV is."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish


class Status(enum.Enum):
    WAITING = "waiting"  # queued for admission (new, or preempted and to be recomputed), or
    #                      on a decode worker, waiting for its KV in the KV handoff
    RUNNING = "running"  # in Scheduler.running: holds pages; prefilling in chunks or decoding
    PREFILLED = "prefilled"  # prefill role: first token sampled, pages pinned until the KV is sent
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    prefill_only: bool = False  # prefill role: stop after the first token
    priority: int = 0  # higher is admitted first (scheduler/waiting_queue.py)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # Pages, in position order. page_ids[:num_shared_pages] belong to the radix cache (locked via
    # cache_node); the rest are owned by this request alone. Replaced by a new list on every
    # change, never changed in place: the model runner keeps a numpy copy of it (`page_row`)
    # for as long as this very list object is the request's.
    page_ids: list[int] = field(default_factory=list)
    page_row: Any = field(default=None, repr=False)  # np.ndarray int32: page_ids, see page_row()
    page_row_of: Any = field(default=None, repr=False)  # the page_ids list page_row copies
    num_shared_pages: int = 0
    cache_node: Any = None  # the prefix-cache node it holds a lock on while it runs
    num_computed: int = 0  # tokens of all_ids whose KV is in page_ids
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (reported to clients)
    admit_seq: int = 0  # admission order; the newest is preempted first
    finish: Finish | None = None
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[list[float]]] = field(default_factory=list)
    num_preemptions: int = 0
    user_data: Any = None  # the owner's bookkeeping (tokenizer index, peers), never read here
    # What the model side records beyond tokens (worker/extra_outputs.py, worker/pooler.py).
    outputs: Any = None
    max_reused_tokens: int | None = None  # cap on prefix-cache reuse (outputs needed from there)
    lora_name: str | None = None  # the LoRA adapter it runs under; None: the base model
    # The prefix cache's namespace for its adapter (0: the base model): KV computed under one
    # adapter is never reused for another (scheduler.py offsets token ids by it).
    lora_key: int = 0
    # Tokens sampled on the device by a step whose results are not read back yet (the overlapped
    # loop, worker_core.py): their positions are scheduled, their ids are known only there.
    num_inflight: int = 0
    # The sampling parameters the worker checked at admission (row_problem); per-step batches
    # skip that check while `sampling` is still this (frozen) object.
    checked_sampling: Any = None
    # Its grammar matcher when the output is constrained (worker/grammar.py); None: free text.
    grammar: Any = None
    # Speculative decoding (worker/speculative/): verify passes this request took part in, and the
    # draft's state between steps (EAGLE: the draft head's last hidden state).
    spec_verify_ct: int = 0
    spec_state: Any = None
    # Images (protocol.MultimodalInputs); None: text only. mm_state: what the model derived from
    # them (M-RoPE positions, encoded images), kept while the request lives.
    mm: Any = None
    mm_state: Any = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        """Tokens the KV will cover: prompt, output, and tokens still being sampled."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_inflight

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed before the next token can be sampled."""
        return self.seq_len - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.finish is not None
