"""The offline Engine: SGLang's `Engine` API over pdserve's engine core.

`Engine(model_path, **options)` starts the server's own processes (`process_engine.py`) and drives
them over `/generate`; `Engine(model_path, in_process=True, **options)` steps one mixed worker in
this process. Either way `generate` takes one prompt or a list (text or token ids) and returns the
same SGLang-shaped dicts: the in-process engine turns ids into text with the tokenizer process's
detokenizer and shapes results with the router's `generate_result`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pdserve
from pdserve.config.engine_config import EngineConfig, EngineOptions
from pdserve.config.lora_config import lora_names_for, lora_reply
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.generate_result import encode_result, generate_result
from pdserve.scheduler.request import Request
from pdserve.tokenizer_proc.incremental_detokenizer import (
    IncrementalDetokenizer,
    token_texts,
    top_token_texts,
)
from pdserve.worker.extra_outputs import ExtraOutputs

if TYPE_CHECKING:
    from pdserve.entrypoints.process_engine import ProcessEngine
    from pdserve.worker.parallel.tp_group import TPGroup

logger = logging.getLogger(__name__)

_PROGRESS_MIN_PROMPTS = 8  # a tqdm bar for batches at least this large
_POOLED_SAMPLING = SamplingParams(max_new_tokens=0)  # an embedding: one forward pass, no token
# The offline Engine favours throughput, as vLLM's `LLM` class does over its server: a step beside
# decodes may add more prompt tokens than the server's default (512, which keeps streamed tokens
# evenly paced; no client watches the pace of an offline batch). 1,024 keeps a step of 256 decodes
# and its prompt tokens inside the piecewise CUDA graphs' default 2,048 tokens (at 2,048 such steps
# ran eagerly and were slower). Given as an option, or in a topology, the setting is kept.
OFFLINE_DECODE_STEP_PREFILL_TOKENS = 1024


def Engine(  # noqa: N802 - a factory named like SGLang's class, so its users' code runs as is
    model_path: str | None = None,
    *,
    in_process: bool = False,
    topology: Any = None,
    **options: Any,
) -> InProcessEngine | ProcessEngine:
    """SGLang's `Engine(model_path=..., **options)`.

    By default it starts the server's own processes (one mixed worker, or `topology=` a YAML path
    or a Topology) and talks to them; `in_process=True` runs the engine core inside this process
    (no child processes, no HTTP: the quickest start, used by the correctness tests). Options take
    pdserve's names or SGLang's for the same setting (`engine_config.SGLANG_ALIASES`), plus
    `skip_tokenizer_init` and `log_level` (`EngineOptions`). Without a topology,
    `decode_step_prefill_tokens` defaults to OFFLINE_DECODE_STEP_PREFILL_TOKENS (throughput).
    """
    if topology is None and options.get("decode_step_prefill_tokens") is None:
        options = {**options, "decode_step_prefill_tokens": OFFLINE_DECODE_STEP_PREFILL_TOKENS}
    if in_process:
        if topology is not None or model_path is None:
            raise ValueError(
                "in_process=True takes model_path, not topology= (that needs processes)"
            )
        return InProcessEngine(model_path, **options)
    from pdserve.entrypoints.process_engine import ProcessEngine

    return ProcessEngine(model_path, topology=topology, **options)


@dataclass
class _Tracked:
    """One request of the in-process engine, and what has been turned into its result so far."""

    req: Request
    detok: IncrementalDetokenizer | None  # None: the tokenizer is skipped (ids only)
    choice: ChoiceState  # the router's record of a request's outputs, filled the same way
    started: float  # time.perf_counter() at submission
    num_fed: int = 0  # output ids already given to `choice`


class InProcessEngine:
    """One mixed worker's engine core, stepped in the caller's thread."""

    def __init__(self, model_path: str, tp_group: TPGroup | None = None, **options: Any) -> None:
        """tp_group: this engine is rank 0 of that tensor-parallel group (EngineFragment)."""
        from transformers import AutoTokenizer

        from pdserve.worker.worker_core import WorkerCore

        self.options, config_options = EngineOptions.split(options)
        if self.options.log_level is not None:
            logging.getLogger("pdserve").setLevel(self.options.log_level.upper())
        self.config = EngineConfig.from_options(model_path, **config_options).resolved()
        self.tokenizer: Any = None
        if not self.options.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.core = WorkerCore(
            self.config, decode=self._decode if self.tokenizer else None, tp=tp_group
        )
        self._closed = False
        self._image_processor: Any = None  # a vision-language model's, made on first use

    def _decode(self, ids: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _images_per_prompt(
        self,
        image_data: Any,
        prompts_ids: list[list[int]],
        is_batch: bool,
        video_data: Any = None,
    ) -> list[tuple[list[int], Any]]:
        """Each prompt's ids with its image (and video) placeholders expanded, and its
        MultimodalInputs (None without any), as the tokenizer process makes them. ValueError
        naming a bad image or video, a limit or a placeholder count that does not fit."""
        if image_data is None and video_data is None:
            return [(ids, None) for ids in prompts_ids]
        if self._image_processor is None:
            from pdserve.multimodal.processor import ImageProcessor

            if self.tokenizer is not None:
                self._image_processor = ImageProcessor.for_model(
                    self.config.model_path, self.tokenizer
                )
            if self._image_processor is None:
                name = "image_data" if image_data is not None else "video_data"
                raise ValueError(f"{name}: this model takes text only (it has no vision tower)")
        per_prompt = _per_prompt("image_data", image_data, len(prompts_ids), is_batch)
        videos_per_prompt = _per_prompt("video_data", video_data, len(prompts_ids), is_batch)
        out = []
        for ids, sources, videos in zip(prompts_ids, per_prompt, videos_per_prompt):
            if not sources and not videos:
                out.append((ids, None))
                continue
            processor = self._image_processor
            images = processor.preprocess_media(
                sources if isinstance(sources, list) or not sources else [sources],
                videos if isinstance(videos, list) or not videos else [videos],
            )
            ids = processor.expand_ids(ids, images)
            out.append((ids, processor.inputs(ids, images)))
        return out

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """SGLang's Engine.generate: one prompt gives a dict, a list gives a list of dicts.
        stream=True (one prompt) gives an iterator of dicts whose text is cumulative.
        return_hidden_states: `meta_info.hidden_states`, the prompt's final-layer rows first.
        lora_path: a loaded adapter's name for every prompt, or a list aligned with them (None:
        the base model). image_data (a vision-language model): an image (data URL, path, URL
        or base64) or a list of them for one prompt; for a list of prompts, one such entry per
        prompt. Each image needs its placeholder in the prompt, as the chat template writes.
        video_data: the same for videos, a video being a file (data URL, path, URL or base64)
        or a list of frames (each as an image); it needs its video placeholder."""
        self._check_open()
        self.options.check_inputs(prompt, sampling_params)
        is_batch, prompts_ids, params = self._normalize(prompt, input_ids, sampling_params)
        if stream and is_batch:
            raise ValueError("stream=True takes one prompt, not a list")
        loras = lora_names_for(lora_path, len(prompts_ids))
        images = self._images_per_prompt(image_data, prompts_ids, is_batch, video_data)
        tracked = [
            self._new_request(
                ids, p, return_logprob, top_logprobs_num, return_hidden_states, lora, mm
            )
            for (ids, mm), p, lora in zip(images, params, loras)
        ]
        if stream:
            return self._stream(tracked[0])
        self._run([t.req for t in tracked], progress=len(tracked) >= _PROGRESS_MIN_PROMPTS)
        results = []
        for t in tracked:
            self._feed(t)
            results.append(self._result(t))
        return results if is_batch else results[0]

    def encode(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """SGLang's Engine.encode on an embedding or reward model: `{"embedding": [...],
        "meta_info": {...}}` for one prompt, a list of them for a list."""
        self._check_open()
        self.options.check_inputs(prompt, None)
        is_batch, prompts_ids, _ = self._normalize(prompt, input_ids, None)
        started = time.perf_counter()
        reqs = []
        for ids in prompts_ids:
            req = Request(rid=uuid.uuid4().hex, prompt_ids=ids, sampling=_POOLED_SAMPLING)
            self.core.add_pooled(req)
            reqs.append(req)
        self._run(reqs, progress=len(reqs) >= _PROGRESS_MIN_PROMPTS)
        results = [_encode_result(req, time.perf_counter() - started) for req in reqs]
        return results if is_batch else results[0]

    def get_server_info(self) -> dict[str, Any]:
        """What the server's `/server_info` reports, answered from this engine's core: the model,
        the context length, requests in flight, and the one (mixed) worker's load and pages."""
        stats = self.core.scheduler.stats()
        worker = {
            "name": "mixed0",
            "role": "mixed",
            "idx": 0,
            "healthy": True,
            "num_running_reqs": stats["num_running"],
            "num_queue_reqs": stats["num_queued"],
            "num_free_pages": stats["num_free_pages"],
            "num_total_pages": stats["num_total_pages"],
            "num_cached_pages": stats["num_cached_pages"],
            "cache_hit_rate": self.core.scheduler.cache.hit_rate,
            "step_time_ms": self.core.last_step_ms,
            "num_preemptions": stats["num_preemptions"],
        }
        return {
            "model_name": Path(self.config.model_path).resolve().name,
            "model_path": self.config.model_path,
            "max_context_len": self.core.max_context_len,
            "num_requests_in_flight": stats["num_running"] + stats["num_queued"],
            "engine_config": dataclasses.asdict(self.config),
            "workers": [worker],
            "version": pdserve.__version__,
        }

    def flush_cache(self) -> bool:
        """Drop every prefix-cache page no running request holds (the server's `/flush_cache`).
        True when done, as SGLang's `flush_cache().success`."""
        self._check_open()
        self.core.scheduler.cache.reset()
        return True

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        """Load a PEFT adapter under `lora_name`: `{success, error_message, loaded_adapters}`."""
        self._check_open()
        try:
            self.core.load_lora(lora_name, lora_path)
        except ValueError as e:
            return lora_reply(False, str(e), self.core.lora_names)
        return lora_reply(True, "", self.core.lora_names)

    def unload_lora_adapter(self, lora_name: str) -> dict[str, Any]:
        """Unload an adapter (refused while requests use it): SGLang's reply shape."""
        self._check_open()
        try:
            self.core.unload_lora(lora_name)
        except ValueError as e:
            return lora_reply(False, str(e), self.core.lora_names)
        return lora_reply(True, "", self.core.lora_names)

    def shutdown(self) -> None:
        if not self._closed:
            self.core.close()  # stops tensor-parallel followers, if any
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
        if prompt is not None:  # check_inputs refused it without a tokenizer
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
        self,
        ids: list[int],
        params: SamplingParams,
        return_logprob: bool,
        top_logprobs_num: int,
        return_hidden_states: bool = False,
        lora_name: str | None = None,
        mm: Any = None,
    ) -> _Tracked:
        req = Request(
            rid=uuid.uuid4().hex,
            prompt_ids=ids,
            sampling=params,
            return_logprob=return_logprob or top_logprobs_num > 0,
            top_logprobs_num=top_logprobs_num,
            lora_name=lora_name,
        )
        req.mm = mm
        if return_hidden_states:
            req.outputs = ExtraOutputs(return_hidden_states=True)
        self.core.add(req)
        detok = None
        if self.tokenizer is not None:
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
        with_texts = req.return_logprob and self.tokenizer is not None
        hidden = None
        if isinstance(req.outputs, ExtraOutputs):
            hidden = req.outputs.take_hidden(req.num_computed)
        t.choice.add(
            ReqOutput(
                hidden_states=hidden,
                rid=req.rid,
                text_delta=t.detok.add_output(ids, req.finish) if t.detok is not None else "",
                output_ids=ids,
                finish=req.finish,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=end,
                cached_tokens=req.num_cached_tokens,
                spec_verify_ct=req.spec_verify_ct,
                logprobs=req.output_logprobs[start:end] if req.return_logprob else None,
                top_logprobs=top,
                token_texts=token_texts(self.tokenizer, ids) if with_texts else None,
                top_token_texts=(
                    top_token_texts(self.tokenizer, top) if top is not None and with_texts else None
                ),
            )
        )
        return True

    def _result(self, t: _Tracked) -> dict[str, Any]:
        result = generate_result(
            t.choice,
            e2e_latency=time.perf_counter() - t.started,
            return_logprob=t.req.return_logprob,
            top_logprobs_num=t.req.top_logprobs_num,
            return_hidden_states=isinstance(t.req.outputs, ExtraOutputs),
        )
        if self.tokenizer is None:  # SGLang leaves `text` out when the tokenizer is skipped
            del result["text"]
        return result


def _encode_result(req: Request, e2e_latency: float) -> dict[str, Any]:
    """A finished pooled request as the server's /encode shapes it."""
    choice = ChoiceState(0, req.rid)
    if req.finish is not None and req.finish.is_abort:
        raise ValueError(f"request {req.rid} failed: {req.finish.message}")
    choice.add(
        ReqOutput(
            rid=req.rid,
            text_delta="",
            output_ids=[],
            finish=req.finish,
            prompt_tokens=len(req.prompt_ids),
            cached_tokens=req.num_cached_tokens,
            embedding=req.outputs.embedding,
        )
    )
    return encode_result(choice, e2e_latency)


def _per_prompt(name: str, data: Any, num_prompts: int, is_batch: bool) -> list[Any]:
    """SGLang's image_data / video_data: one entry per prompt for a batch, else the entry."""
    if data is None:
        return [None] * num_prompts
    entries = data if is_batch else [data]
    if not isinstance(entries, list) or len(entries) != num_prompts:
        raise ValueError(f"{name} is invalid: expected one entry per prompt ({num_prompts})")
    return entries
