"""Builds a worker's speculative decoder from its config (None when speculation is off)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.config.engine_config import EngineConfig
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import Scheduler
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.sampler import SamplingRow
from pdserve.worker.speculative.spec_step import SpeculativeDecoder

if TYPE_CHECKING:
    from pdserve.worker.cuda_graph_runner import CudaGraphRunner


def make_speculative_decoder(
    config: EngineConfig,
    runner: ModelRunner,
    scheduler: Scheduler,
    sampling_row: Callable[[Request], SamplingRow],
    max_context_len: int,
) -> SpeculativeDecoder | None:
    spec = config.speculative
    if not spec.enabled:
        return None
    if runner.model_config.is_embedding:
        raise ValueError(
            f"speculative_algorithm={spec.speculative_algorithm!r} is invalid for an embedding "
            "model: it decodes nothing"
        )
    if runner.model_config.vision is not None and spec.speculative_algorithm != "NGRAM":
        raise ValueError(
            f"speculative_algorithm={spec.speculative_algorithm!r} is not supported with a "
            "vision-language model yet: NGRAM is"
        )
    drafter = None
    if spec.speculative_algorithm == "EAGLE":
        from pdserve.worker.speculative.eagle_drafter import EagleDrafter

        drafter = EagleDrafter.load(spec, runner)
    graphs = make_verify_graphs(spec, runner)
    return SpeculativeDecoder(
        spec, runner, scheduler, sampling_row, max_context_len, drafter, graphs
    )


def make_verify_graphs(spec: SpeculativeConfig, runner: ModelRunner) -> CudaGraphRunner | None:
    """CUDA graphs of the chain verify pass (1 + num_drafts tokens a row), where the runner
    captured its decode steps' (CUDA, a capturable attention backend, no tensor parallelism);
    None for draft trees (speculative_eagle_topk > 1), whose verify passes run eagerly."""
    decode_graphs = runner.graph_runner
    if decode_graphs is None or not decode_graphs.batch_sizes or spec.speculative_eagle_topk > 1:
        return None
    from pdserve.worker.cuda_graph_runner import CudaGraphRunner

    return CudaGraphRunner(runner, tokens_per_row=spec.num_drafts + 1)
