"""A worker core's warm-up before it serves: a few requests run through its loop so the Triton
kernels' first specializations compile then, not on the first clients' steps (a process's first
offline run measured 27k output tokens/s against 32k warm, docs/BENCHMARKS.md sixth session).

The requests are a prompt alone, decodes, then decodes beside a prefill chunk (the mixed step of
every burst), short and then long enough for the decode kernel to split the context. Nothing of
them stays: their cached pages are freed and the counters they moved are reset. CUDA only
(WorkerCore calls it); not for an embedding model (no loop) nor with speculative decoding (its
steps run their own graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request

if TYPE_CHECKING:
    from pdserve.worker.worker_core import WorkerCore

_MAX_CHUNK = 256  # the later prompt's tokens: one chunk beside the decodes
_LONG_DECODE = 300  # a context the decode kernel splits at small batches (> 2 steps of 64)


def warm_up(core: WorkerCore) -> None:
    if core.model_config.is_embedding or core.spec is not None:
        return  # no loop to warm; speculative steps keep their own graphs and counts
    vocab = core.model_config.vocab_size
    sched = core.config.scheduler
    # Each request fits a quarter of the pool and its context limit, with room for its tokens.
    pool_tokens = core.scheduler.allocator.num_total * sched.page_size
    limit = min(core.max_context_len, pool_tokens // 4) - 8
    if limit < 16:
        return  # a pool or context this small has nothing worth compiling ahead
    chunk = min(sched.chunk_size, limit, _MAX_CHUNK)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.0)

    def request(i: int, length: int) -> Request:
        prompt = [(7 * i + 13 * j + 1) % vocab for j in range(length)]
        return Request(rid=f"warm-up-{i}", prompt_ids=prompt, sampling=params)

    first = [request(0, 16), request(1, min(33, limit))]
    for req in first:
        core.add(req)
    while not all(len(r.output_ids) >= 2 or r.finish is not None for r in first):
        core.step()
    core.add(request(2, chunk))  # its chunk runs beside the first ones' decodes
    while core.has_work():
        core.step()
    # Then a decode long enough to be split beside another chunk: the eager decode kernel's
    # split-and-merge variant, which nothing above runs (the first concurrent long prompts after
    # startup compiled a decode kernel variant, benchmarks/gpu/compile_watch.py; likely this one).
    long = request(3, min(limit, _LONG_DECODE))
    core.add(long)
    while len(long.output_ids) < 2 and long.finish is None:
        core.step()
    core.add(request(4, chunk))
    while core.has_work():
        core.step()
    cache = core.scheduler.cache
    cache.reset()
    cache.num_queried_tokens = cache.num_matched_tokens = 0  # the hit rate counts clients only
    core.num_steps = core.num_overlapped_steps = 0
    core.last_step_ms = 0.0
    if core.runner.graph_runner is not None:
        core.runner.graph_runner.num_replays = 0
    if core.runner.piecewise is not None:
        core.runner.piecewise.num_runs = 0
