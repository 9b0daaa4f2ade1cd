"""The offline Engine: SGLang's `Engine` API over pdserve's engine core.

`Engine(model_path, **options)` starts the server's own processes (`process_engine.py`) and drives
them over `/generate`; `Engine(model_path, in_process=True, **options)` steps one mixed worker in
this process. Either way `generate` takes one prompt or a list (text or token ids) and returns the
same SGLang-shaped dicts: the in-process engine turns ids into text with the tokenizer process's
detokenizer and shapes results with the router's `generate_result`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.config.engine_config import EngineConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.generate_result import generate_result
from pdserve.scheduler.request import Request
from pdserve.tokenizer_proc.incremental_detokenizer import (
    IncrementalDetokenizer,
    token_texts,
    top_token_texts,
)

if TYPE_CHECKING:
    from pdserve.entrypoints.process_engine import ProcessEngine

logger = logging.getLogger(__name__)

_PROGRESS_MIN_PROMPTS = 8  # a tqdm bar for batches at least this large


def Engine(  # noqa: N802 - a factory named like SGLang's class, so its users' code runs as is
    model_path: str, *, in_process: bool = False, topology: Any = None, **options: Any
) -> InProcessEngine | ProcessEngine:
    """SGLang's `Engine(model_path=..., **options)`.

    By default it starts the server's own processes (one mixed worker, or `topology=` a YAML path
    or a Topology) and talks to them; `in_process=True` runs the engine core inside this process
    (no child processes, no HTTP: the quickest start, used by the correctness tests).
    """
    if in_process:
        if topology is not None:
            raise ValueError("topology= needs processes: drop in_process=True")
        return InProcessEngine(model_path, **options)
    from pdserve.entrypoints.process_engine import ProcessEngine

    return ProcessEngine(model_path, topology=topology, **options)


@dataclass
class _Tracked:
    """One request of the in-process engine, and what has been turned into its result so far."""

    req: Request
    detok: IncrementalDetokenizer
    choice: ChoiceState  # the router's record of a request's outputs, filled the same way
    started: float  # time.perf_counter() at submission
    num_fed: int = 0  # output ids already given to `choice`


class InProcessEngine:
    """One mixed worker's engine core, stepped in the caller's thread."""

    def __init__(self, model_path: str, **options: Any) -> None:
        from transformers import AutoTokenizer

        from pdserve.worker.worker_core import WorkerCore

        self.config = EngineConfig.from_options(model_path, **options).resolved()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.core = WorkerCore(self.config, decode=self._decode)
        self._closed = False

    def _decode(self, ids: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """SGLang's Engine.generate: one prompt gives a dict, a list gives a list of dicts.
        stream=True (one prompt) gives an iterator of dicts whose text is cumulative."""
        self._check_open()
        is_batch, prompts_ids, params = self._normalize(prompt, input_ids, sampling_params)
        if stream and is_batch:
            raise ValueError("stream=True takes one prompt, not a list")
        tracked = [
            self._new_request(ids, p, return_logprob, top_logprobs_num)
            for ids, p in zip(prompts_ids, params)
        ]
        if stream:
            return self._stream(tracked[0])
        self._run([t.req for t in tracked], progress=len(tracked) >= _PROGRESS_MIN_PROMPTS)
        results = []
        for t in tracked:
            self._feed(t)
            results.append(self._result(t))
        return results if is_batch else results[0]

    def shutdown(self) -> None:
        self._closed = True

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine was shut down")

    def _normalize(
        self,
        prompt: Any,
        input_ids: Any,
        sampling_params: Any,
    ) -> tuple[bool, list[list[int]], list[SamplingParams]]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if prompt is not None:
            is_batch = isinstance(prompt, list)
            texts = prompt if is_batch else [prompt]
            ids = [self.tokenizer.encode(t) for t in texts]
        else:
            is_batch = bool(input_ids) and isinstance(input_ids[0], list)
            ids = [list(map(int, x)) for x in (input_ids if is_batch else [input_ids])]
        if any(not x for x in ids):
            raise ValueError("a prompt is empty: expected at least one token")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(ids):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(ids)} prompts"
                )
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(ids)
        return is_batch, ids, params

    def _new_request(
        self, ids: list[int], params: SamplingParams, return_logprob: bool, top_logprobs_num: int
    ) -> _Tracked:
        req = Request(
            rid=uuid.uuid4().hex,
            prompt_ids=ids,
            sampling=params,
            return_logprob=return_logprob or top_logprobs_num > 0,
            top_logprobs_num=top_logprobs_num,
        )
        self.core.add(req)
        detok = IncrementalDetokenizer.for_request(self.tokenizer, ids, params)
        return _Tracked(req, detok, ChoiceState(0, req.rid), time.perf_counter())

    def _run(self, reqs: list[Request], progress: bool) -> None:
        pending = {r.rid for r in reqs}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        while pending:
            for req in self.core.step():
                if req.is_finished and req.rid in pending:
                    pending.discard(req.rid)
                    if bar is not None:
                        bar.update(1)
            if pending and not self.core.has_work():
                raise RuntimeError(f"engine stalled with {len(pending)} unfinished requests")
        if bar is not None:
            bar.close()

    def _stream(self, t: _Tracked) -> Iterator[dict[str, Any]]:
        while True:
            touched = self.core.step()
            if t.req in touched and self._feed(t):
                yield self._result(t)
            if t.req.is_finished:
                return
            if not self.core.has_work():
                raise RuntimeError("engine stalled while streaming")

    def _feed(self, t: _Tracked) -> bool:
        """Give `t.choice` the output the tokenizer process would send for the ids (and finish)
        produced since the last call; False if there was nothing new."""
        req, start = t.req, t.num_fed
        end = len(req.output_ids)
        ids = req.output_ids[start:end]
        if t.choice.finish is not None or (not ids and req.finish is None):
            return False
        t.num_fed = end
        top = req.output_top_logprobs[start:end] if req.top_logprobs_num else None
        t.choice.add(
            ReqOutput(
                rid=req.rid,
                text_delta=t.detok.add_output(ids, req.finish),
                output_ids=ids,
                finish=req.finish,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=end,
                cached_tokens=req.num_cached_tokens,
                logprobs=req.output_logprobs[start:end] if req.return_logprob else None,
                top_logprobs=top,
                token_texts=token_texts(self.tokenizer, ids) if req.return_logprob else None,
                top_token_texts=top_token_texts(self.tokenizer, top) if top is not None else None,
            )
        )
        return True

    def _result(self, t: _Tracked) -> dict[str, Any]:
        return generate_result(
            t.choice,
            e2e_latency=time.perf_counter() - t.started,
            return_logprob=t.req.return_logprob,
            top_logprobs_num=t.req.top_logprobs_num,
        )
