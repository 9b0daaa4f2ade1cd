"""Piecewise CUDA graphs: the steps the decode graphs do not take (prefill chunks, mixed steps of
decodes beside a prompt, decode batches above cuda_graph_max_batch) replayed in pieces, so that
their host time is a few replays and the attention launches instead of ~10 launches a layer.

An eager mixed step of Llama-1B (64 decodes beside a 1,024-token chunk) spent ~9.5 ms of host
time against 5.1 ms of GPU time on the H200's host: every norm, rotary, activation and linear is a
launch from Python. The attention kernels' launches depend on the batch's shape (how many
sequences, their lengths), everything else only on the number of tokens. So a forward pass of L
layers is cut at its L attention calls into L + 1 segments:

  segment 0       the embedding; layer 0's input norm, q/k/v projection, rotary and KV store
  segment i       layer i-1's o_proj, post-attention norm and MLP; then layer i's input norm,
                  q/k/v projection, rotary and KV store
  segment L       layer L-1's o_proj, post-attention norm and MLP

Each segment is captured once per bucket of token counts, on static buffers padded to the bucket
(`token_buckets`); a step copies its tokens, positions and KV slots in, replays segment 0, runs
layer 0's attention eagerly on the real rows (reading q from, and writing its output to, static
buffers), replays segment 1, and so on; the final norm and the LM head run eagerly on the rows
that are read out. Segments hand each other the residual stream, q and the attention output
through those static buffers, so no graph's output stays alive and all share one memory pool.

Padding rows (a bucket's rows past the step's tokens) take KV slot 0, which is page 0: the
allocator never hands that page out (as for the decode graphs), so their KV writes land nowhere
that matters. Their other inputs are whatever an earlier step left: every op in a segment works
on rows independently, and the attention reads only the real rows.

Not taken by: LoRA rows, speculative tree passes, vision-language models (their own forward),
tensor parallelism (the followers would need the same replays), steps asking for every token's
hidden state (forward_rows), and steps of more tokens than the largest bucket (their GPU time
hides their host time).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from pdserve.worker.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from pdserve.worker.model_runner import ModelRunner
    from pdserve.worker.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_SMALL_BUCKETS = (8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def token_buckets(max_tokens: int) -> list[int]:
    """The captured token counts up to max_tokens, ascending, ending with max_tokens itself:
    fine steps for small steps, 128 apart up to 2,048, 256 apart above."""
    if max_tokens < 1:
        raise ValueError(f"piecewise_graph_max_tokens must be >= 1, got {max_tokens}")
    sizes = [s for s in _SMALL_BUCKETS if s < max_tokens]
    size = _SMALL_BUCKETS[-1]
    while True:
        size += 128 if size < 2048 else 256
        if size >= max_tokens:
            break
        sizes.append(size)
    return sizes + [max_tokens]


def build_piecewise(
    model_runner: ModelRunner, max_tokens: int, capture: bool = True
) -> PiecewiseGraphRunner | None:
    """The runner's piecewise graphs, or None (logged) when capturing them ran out of device
    memory: the worker then runs those steps eagerly rather than not start."""
    try:
        return PiecewiseGraphRunner(model_runner, max_tokens, capture)
    except torch.OutOfMemoryError as e:
        logger.warning(
            "piecewise CUDA graphs off: capturing them for up to %d tokens ran out of device "
            "memory (%s); prefill and mixed steps run eagerly (piecewise_graph_max_tokens sets "
            "the bound, 0 turns them off)",
            max_tokens,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def supports_piecewise(model: object) -> bool:
    """Whether `model` is the plain decoder whose layers this runner knows how to cut."""
    from pdserve.worker.models.llama import LlamaForCausalLM

    return type(model) is LlamaForCausalLM and model.tp.size == 1


class PiecewiseGraphRunner:
    """Runs a batch's forward pass segment by segment on static buffers (see the module
    docstring); `capture` False runs the segments eagerly (the CPU tests' path: the same
    buffers, padding and order, without graphs)."""

    def __init__(self, model_runner: ModelRunner, max_tokens: int, capture: bool = True) -> None:
        model: LlamaForCausalLM = model_runner.model  # type: ignore[assignment]
        if not supports_piecewise(model):
            raise ValueError(f"piecewise CUDA graphs do not support {type(model).__name__}")
        self.model = model
        self.kv_pool = model_runner.kv_pool
        self.layers = list(model.model.layers)
        config = model.config
        self.buckets = token_buckets(max_tokens)
        top = self.buckets[-1]
        attn = self.layers[0].self_attn
        self.q_shape = (attn.num_heads, attn.head_dim)
        dtype = model.model.embed_tokens.weight.dtype
        kw = {"device": model_runner.device}
        self.input_ids = torch.zeros(top, dtype=torch.int64, **kw)  # [top]
        self.positions = torch.zeros(top, dtype=torch.int64, **kw)  # [top]
        self.slots = torch.zeros(top, dtype=torch.int64, **kw)  # [top]: padding rows write slot 0
        q_width = attn.num_heads * attn.head_dim
        self.q = torch.zeros(top, q_width, dtype=dtype, **kw)  # [top, Hq D]: a layer's rotated q
        self.attn_out = torch.zeros(top, q_width, dtype=dtype, **kw)  # [top, Hq D]
        self.residual = torch.zeros(top, config.hidden_size, dtype=dtype, **kw)  # [top, hidden]
        self.hidden = torch.zeros(top, config.hidden_size, dtype=dtype, **kw)  # last MLP's out
        self._num_dirty = 0  # rows of slots at or past this are 0
        # Per bucket: the batch a segment's projections read (static positions and slots).
        self._static = {tb: self._static_batch(tb) for tb in self.buckets}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (segment, bucket)
        self.num_runs = 0
        if capture:
            self._capture()

    def _static_batch(self, tb: int) -> ForwardBatch:
        """What project_qkv reads of a batch: the static positions and slots of tb tokens (the
        attention fields are placeholders: attention runs outside the segments)."""
        one = torch.ones(1, dtype=torch.int32, device=self.slots.device)
        return ForwardBatch(
            input_ids=self.input_ids[:tb],
            positions=self.positions[:tb],
            slots=self.slots[:tb],
            page_table=one.view(1, 1),
            seq_lens=one,
            seq_lens_cpu=[tb],
            extend_lens_cpu=[tb],
            logit_idx=one.long(),
            is_decode=False,
        )

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            0 < fb.num_tokens <= self.buckets[-1]
            and fb.lora is None
            and fb.tree_mask is None
            and fb.mm is None
        )

    def bucket(self, num_tokens: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_tokens)]

    @torch.inference_mode()
    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [B, V] float32 of each sequence's last new token (can_run(fb) must hold)."""
        num_tokens = fb.num_tokens
        tb = self.bucket(num_tokens)
        self._load(fb)
        shape = (num_tokens, *self.q_shape)
        q, out = self.q[:num_tokens].view(shape), self.attn_out[:num_tokens].view(shape)
        for i, layer in enumerate(self.layers):
            self._run_segment(i, tb)
            layer.self_attn.attend(q, fb, self.kv_pool, out=out)
        self._run_segment(len(self.layers), tb)
        self.num_runs += 1
        rows = fb.logit_idx
        x, _ = self.model.model.norm.add_and_norm(self.hidden[rows], self.residual[rows])
        return self.model.compute_logits(x)

    def _load(self, fb: ForwardBatch) -> None:
        n = fb.num_tokens
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.slots[:n].copy_(fb.slots)
        if self._num_dirty > n:  # a longer step's slots: padding rows must write slot 0
            self.slots[n : self._num_dirty].zero_()
        self._num_dirty = n

    def _run_segment(self, i: int, tb: int) -> None:
        graph = self.graphs.get((i, tb))
        if graph is not None:
            graph.replay()
        else:
            self._segment(i, tb)

    def _segment(self, i: int, tb: int) -> None:
        """Segment i on the first tb rows of the static buffers (module docstring)."""
        model = self.model.model
        if i == 0:
            x = model.embed_tokens(self.input_ids[:tb])  # [tb, hidden]
            residual = torch.zeros_like(x)
        else:
            x, residual = self.layers[i - 1].after_attention(self.attn_out[:tb], self.residual[:tb])
        if i == len(self.layers):
            self.hidden[:tb].copy_(x)
        else:
            q, residual = self.layers[i].before_attention(
                x, residual, self._static[tb], self.kv_pool, self.model.cos_sin_cache
            )  # [tb, Hq, D]
            self.q[:tb].view(q.shape).copy_(q)
        self.residual[:tb].copy_(residual)

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        device = self.slots.device
        pool = torch.cuda.graph_pool_handle()  # shared: no segment's output outlives it
        # Largest first: its intermediates size the pool, the smaller buckets reuse that memory.
        for tb in reversed(self.buckets):
            for i in range(len(self.layers) + 1):
                self._segment(i, tb)  # compiles the Triton kernels' specializations first
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._segment(i, tb)
                self.graphs[(i, tb)] = graph
        torch.cuda.synchronize(device)
        logger.info(
            "captured %d piecewise CUDA graphs (%d segments x token buckets %s) in %.1f s",
            len(self.graphs),
            len(self.layers) + 1,
            self.buckets,
            time.perf_counter() - start,
        )
