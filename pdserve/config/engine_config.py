"""Configuration: one tree of frozen dataclasses, validated once, shared by every process.

Layers: ModelConfig (what the checkpoint is) -> SchedulerConfig (how a worker batches) ->
EngineConfig (one worker's whole setup). The cluster/topology layer lives in topology.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pdserve.config.lora_config import LORA_KEYS, LoraConfig
from pdserve.config.speculative_config import SPECULATIVE_KEYS, SpeculativeConfig
from pdserve.config.vision_config import (
    VLM_ARCHITECTURES,
    LlavaVisionConfig,
    PixtralVisionConfig,
    VisionConfig,
    split_vlm_config,
)

DeviceName = Literal["auto", "cpu", "cuda"]
DTypeName = Literal["auto", "float32", "float16", "bfloat16"]
PoolingKind = Literal["last", "mean", "cls"]
_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
_HEADS = ("ForCausalLM", "Model", "ForSequenceClassification")
AttentionBackend = Literal["auto", "torch", "triton", "flashinfer"]

logger = logging.getLogger(__name__)


def _require(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling; rope_type 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape, read once from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # Pooling models (embeddings, rewards): one forward pass, a vector out, nothing decoded.
    is_embedding: bool = False
    pooling: PoolingKind = "last"  # which prompt positions make the vector
    normalize: bool = True  # L2-normalize the pooled vector (embeddings; never a score head)
    num_labels: int = 0  # > 0: a sequence-classification score head [num_labels, hidden]
    matryoshka_dims: tuple[int, ...] = ()  # output sizes `dimensions` may truncate to
    # a vision-language model's tower
    vision: VisionConfig | LlavaVisionConfig | PixtralVisionConfig | None = None
    # Tokens each position attends back over (Mistral 7B v0.1's 4,096); 0: the whole context.
    # pdserve's attention is full, which equals the window's while the context fits in it, so
    # the context is capped at the window (`context_limit`).
    sliding_window: int = 0
    # The decoder's own model_type (a vision-language model's text_config's: LLaVA-NeXT's may
    # be "llama", "mistral" or "qwen2"); "" when not read from a checkpoint.
    text_model_type: str = ""

    @property
    def family(self) -> str:
        """The decoder family: 'Llama', 'Mistral', 'Qwen2' or 'Qwen3'."""
        return _split_architecture(self.architecture)[0]

    @property
    def o_proj_bias(self) -> bool:
        """attention_bias covers o_proj too (Llama, Qwen3), but not a Qwen2 decoder's (q, k and
        v only), whatever the architecture that wraps it."""
        qwen2 = self.family == "Qwen2" or self.text_model_type == "qwen2"
        return self.attention_bias and not qwen2

    @property
    def has_lm_head(self) -> bool:
        """The checkpoint holds an lm_head (a *ForCausalLM directory)."""
        return self.architecture.endswith("ForCausalLM") or self.vision is not None

    def context_limit(self, requested: int | None = None) -> int:
        """The longest context (prompt + output) served: `requested` (scheduler.max_context_len)
        or max_position_embeddings, at most the sliding window."""
        limit = requested or self.max_position_embeddings
        if self.sliding_window and limit > self.sliding_window:
            if requested:
                logger.warning(
                    "max_context_len=%d is capped at the model's sliding window (%d tokens): "
                    "pdserve's attention is full, exact only within the window",
                    requested,
                    self.sliding_window,
                )
            return self.sliding_window
        return limit

    def __post_init__(self) -> None:
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_key_value_heads",
            self.num_kv_heads,
            f"a divisor of num_attention_heads={self.num_heads}",
        )
        _require(self.head_dim > 0, "head_dim", self.head_dim, "> 0")

    @classmethod
    def from_hf(cls, model_path: str | Path, is_embedding: bool | None = None) -> ModelConfig:
        path = Path(model_path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"model path {str(path)!r} has no config.json: expected a Hugging Face "
                "model directory"
            )
        hf = json.loads(config_file.read_text())
        config = cls.from_hf_dict(hf, path)
        from pdserve.config.pooling_config import pooling_fields

        return dataclasses.replace(config, **pooling_fields(path, config, is_embedding))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], path: Path | None = None) -> ModelConfig:
        hf, vision = split_vlm_config(hf)
        archs = hf.get("architectures") or [hf.get("model_type", "LlamaForCausalLM")]
        arch = archs[0]
        _split_architecture(arch)  # ValueError for an unsupported one
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"rope_scaling.rope_type={rope_type!r} is not supported: expected "
                "'default' or 'llama3'"
            )
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
        rope_theta = hf.get("rope_theta") or rs.get("rope_theta") or 10000.0
        eos = hf.get("eos_token_id")
        eos_ids = _eos_ids(eos)
        if path is not None and (path / "generation_config.json").is_file():
            gen = json.loads((path / "generation_config.json").read_text())
            eos_ids = tuple(dict.fromkeys(eos_ids + _eos_ids(gen.get("eos_token_id"))))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch.startswith("Qwen2"))),
            text_model_type=str(hf.get("model_type", "")),
            qk_norm=arch.startswith("Qwen3"),
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            num_labels=_num_labels(hf) if arch.endswith("ForSequenceClassification") else 0,
            vision=vision,
            sliding_window=sliding_window_of(hf),
        )


def sliding_window_of(hf: Mapping[str, Any]) -> int:
    """The attention window a Hugging Face config asks for, as transformers applies it: Mistral's
    `sliding_window` when set; Qwen2's and Qwen3's only with `use_sliding_window`; 0 for none."""
    window = hf.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return 0
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return 0
    model_type = str(hf.get("model_type", ""))
    return window if model_type.startswith(("mistral", "qwen2", "qwen3")) else 0


def _split_architecture(arch: str) -> tuple[str, str]:
    """('Qwen2', 'ForCausalLM') for 'Qwen2ForCausalLM'; ValueError for one pdserve lacks."""
    if arch in VLM_ARCHITECTURES:
        return VLM_ARCHITECTURES[arch], arch.removeprefix(VLM_ARCHITECTURES[arch])
    for family in _FAMILIES:
        head = arch[len(family) :]
        if arch.startswith(family) and head in _HEADS:
            return family, head
    supported = [f + h for f in _FAMILIES for h in _HEADS]
    raise ValueError(f"architectures={arch!r} is not supported: expected one of {supported}")


def _num_labels(hf: dict[str, Any]) -> int:
    """A classification head's size: num_labels, else the id2label map's (transformers' rule)."""
    if hf.get("num_labels"):
        return int(hf["num_labels"])
    return len(hf.get("id2label") or {0: "LABEL_0", 1: "LABEL_1"})


def _eos_ids(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


@dataclass(frozen=True)
class SchedulerConfig:
    """How a worker batches; the same names as the topology file's `scheduler:` section."""

    page_size: int = 16
    max_batch_tokens: int = 8192  # tokens (prefill chunks + decodes) in one forward pass
    chunk_size: int = 4096  # longest prefill piece of one request in one step
    # Most prompt tokens a step that carries decodes may add, so that those decodes' step stays
    # short (Sarathi-Serve's token budget); a step with no decode fills max_batch_tokens. 0: no
    # cap but max_batch_tokens. 512: on the H200 (Llama-1B, 256 streams beside a burst of
    # 1,024-token prompts) the streams' TPOT 4.5 ms against 7.5 at 1,024, for 10% less burst
    # and 18% less offline throughput (docs/BENCHMARKS.md, eighth session).
    decode_step_prefill_tokens: int = 512
    max_running_requests: int = 256
    num_pages: int | None = None  # fixed pool size; None: sized from mem_fraction
    mem_fraction: float = 0.85  # of free device memory (after weights) given to the KV pool
    enable_prefix_cache: bool = True
    max_context_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        _require(self.page_size >= 1, "page_size", self.page_size, "an integer >= 1")
        _require(self.max_batch_tokens >= 1, "max_batch_tokens", self.max_batch_tokens, ">= 1")
        _require(self.chunk_size >= 1, "chunk_size", self.chunk_size, ">= 1")
        _require(
            self.decode_step_prefill_tokens >= 0,
            "decode_step_prefill_tokens",
            self.decode_step_prefill_tokens,
            ">= 0 (0: no cap)",
        )
        _require(
            self.max_running_requests >= 1,
            "max_running_requests",
            self.max_running_requests,
            ">= 1",
        )
        _require(
            self.num_pages is None or self.num_pages >= 2,
            "num_pages",
            self.num_pages,
            "None or >= 2",
        )
        _require(0.0 < self.mem_fraction <= 1.0, "mem_fraction", self.mem_fraction, "in (0, 1]")


SCHEDULER_KEYS = tuple(f.name for f in dataclasses.fields(SchedulerConfig))


@dataclass(frozen=True)
class EngineConfig:
    """Everything one worker (or the in-process engine) needs."""

    model_path: str
    device: DeviceName = "auto"
    dtype: DTypeName = "auto"
    attention_backend: AttentionBackend = "auto"
    cuda_graph: bool = True
    # Schedule and build step N+1 on the host while the device runs step N (worker_core.py).
    overlap_schedule: bool = True
    cuda_graph_max_batch: int = 256
    # Steps the decode graphs do not take (prefill, mixed, larger decode batches) of up to this
    # many tokens replay piecewise graphs (worker/piecewise_graphs.py); 0: they run eagerly.
    piecewise_graph_max_tokens: int = 2048
    seed: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    is_embedding: bool | None = None  # None: detected from the model directory
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Speculative decoding (SGLang's speculative_* names; worker/speculative/).
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # Tensor-parallel ranks of this worker: one process each (worker/parallel/), rank 0 the one
    # that talks to the other processes.
    tp_size: int = 1

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda"), "device", self.device, "'auto', 'cpu' or 'cuda'"
        )
        _require(type(self.tp_size) is int and self.tp_size >= 1, "tp_size", self.tp_size, ">= 1")
        _require(
            type(self.piecewise_graph_max_tokens) is int and self.piecewise_graph_max_tokens >= 0,
            "piecewise_graph_max_tokens",
            self.piecewise_graph_max_tokens,
            "an integer >= 0 (0: no piecewise graphs)",
        )
        if self.tp_size > 1 and self.speculative.enabled:
            raise ValueError(
                f"tp_size={self.tp_size} is invalid with speculative_algorithm="
                f"{self.speculative.speculative_algorithm!r}: expected 1 (speculative decoding "
                "under tensor parallelism is not supported yet)"
            )
        if self.tp_size > 1 and self.lora.enabled:
            raise ValueError(
                f"tp_size={self.tp_size} is invalid with LoRA adapters: expected 1 (LoRA under "
                "tensor parallelism is not supported yet)"
            )
        _require(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "dtype",
            self.dtype,
            "'auto', 'float32', 'float16' or 'bfloat16'",
        )
        _require(
            self.attention_backend in ("auto", "torch", "triton", "flashinfer"),
            "attention_backend",
            self.attention_backend,
            "'auto', 'torch', 'triton' or 'flashinfer'",
        )

    @classmethod
    def from_options(cls, model_path: str, **options: Any) -> EngineConfig:
        """Build from flat keyword options (Engine(...) and CLI flags); scheduler keys go below.
        SGLang's names for the same settings are accepted too (`SGLANG_ALIASES`)."""
        options = translate_options(options)
        sched_opts = {k: options.pop(k) for k in list(options) if k in SCHEDULER_KEYS}
        lora = LoraConfig.from_options({k: options.pop(k) for k in list(options) if k in LORA_KEYS})
        speculative = SpeculativeConfig.from_options(
            {k: options.pop(k) for k in list(options) if k in SPECULATIVE_KEYS}
        )
        engine_keys = {f.name for f in dataclasses.fields(cls)} - {
            "model_path",
            "scheduler",
            "lora",
            "speculative",
        }
        unknown = sorted(set(options) - engine_keys)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown}: expected some of "
                f"{sorted(engine_keys | set(SCHEDULER_KEYS) | set(LORA_KEYS) | set(SPECULATIVE_KEYS))}"
                " (or SGLang's "
                f"names {sorted(SGLANG_ALIASES)})"
            )
        return cls(
            model_path=str(model_path),
            scheduler=SchedulerConfig(**sched_opts),
            lora=lora,
            speculative=speculative,
            **options,
        )

    def resolved(self) -> EngineConfig:
        """Resolve `auto` device, dtype and attention backend against this machine."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        backend = self.attention_backend
        if backend == "auto":
            backend = "triton" if device == "cuda" else "torch"
        if device == "cpu" and backend != "torch":
            raise ValueError(f"attention_backend={backend!r} needs device='cuda'")
        return dataclasses.replace(
            self,
            device=device,
            dtype=dtype,
            attention_backend=backend,
            cuda_graph=self.cuda_graph and device == "cuda",
        )


# ---------------------------------------------------------------------------------- SGLang's names
# SGLang's Engine and server options that mean what a pdserve option means, so SGLang's users' code
# runs as is. The names both projects share (max_running_requests, page_size, dtype, device,
# attention_backend) need no entry. Used by both Engines and by `pdserve launch`'s flags.


@dataclass(frozen=True)
class OptionAlias:
    """One SGLang option and the pdserve option it sets."""

    target: str  # pdserve's name
    negate: bool = False  # SGLang's `disable_x` sets pdserve's `x` (or `enable_x`) to its opposite


SGLANG_ALIASES: dict[str, OptionAlias] = {
    "mem_fraction_static": OptionAlias("mem_fraction"),
    "chunked_prefill_size": OptionAlias("chunk_size"),  # SGLang's -1 (no chunking): the default
    "max_prefill_tokens": OptionAlias("max_batch_tokens"),
    "disable_radix_cache": OptionAlias("enable_prefix_cache", negate=True),
    "context_length": OptionAlias("max_context_len"),
    "random_seed": OptionAlias("seed"),
    "disable_cuda_graph": OptionAlias("cuda_graph", negate=True),
    "disable_overlap_schedule": OptionAlias("overlap_schedule", negate=True),
    "cuda_graph_max_bs": OptionAlias("cuda_graph_max_batch"),
    "piecewise_cuda_graph_max_tokens": OptionAlias("piecewise_graph_max_tokens"),
}
# Parallelism SGLang sizes by option: tp_size is each worker's tensor-parallel degree; data
# parallelism comes from more workers in the topology, so dp_size and pp_size accept only 1.
PARALLEL_SIZE_OPTIONS = ("tp_size", "dp_size", "pp_size")
_ONLY_ONE_OPTIONS = ("dp_size", "pp_size")


def aliases_of(target: str, negate: bool = False) -> list[str]:
    """SGLang's names for pdserve option `target` (negated ones only with `negate`)."""
    return [k for k, a in SGLANG_ALIASES.items() if a.target == target and a.negate == negate]


def translate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with SGLang's names (`SGLANG_ALIASES`) turned into pdserve's. dp_size and
    pp_size are checked to be 1 and dropped (tp_size is kept); None values are dropped (not given, as from an
    unset CLI flag). ValueError naming the key for another size, a `disable_*` that is not a
    boolean, or one setting given under two names."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # pdserve's name -> the key it was given under
    for key, value in options.items():
        if value is None:
            continue
        if key in _ONLY_ONE_OPTIONS:
            _require(
                type(value) is int and value == 1,
                key,
                value,
                "1: pdserve's data parallelism is more workers in the topology (pipeline "
                "parallelism is not supported yet)",
            )
            continue
        alias = SGLANG_ALIASES.get(key)
        if alias is not None and alias.negate:
            _require(isinstance(value, bool), key, value, "true or false")
            value = not value
        if key == "chunked_prefill_size" and value == -1:
            continue  # SGLang's "no chunked prefill": chunking changes no token, keep the default
        name = alias.target if alias is not None else key
        if name in given_as:
            raise ValueError(
                f"{given_as[name]} and {key} set the same option ({name}): expected one of them"
            )
        given_as[name] = key
        out[name] = value
    return out


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class EngineOptions:
    """The options of the Engine object itself, beside its workers' settings (SGLang's names)."""

    skip_tokenizer_init: bool = False  # token ids in, token ids out: no text prompts, no `text`
    log_level: str | None = None  # None: the in-process engine leaves logging alone

    def __post_init__(self) -> None:
        _require(
            isinstance(self.skip_tokenizer_init, bool),
            "skip_tokenizer_init",
            self.skip_tokenizer_init,
            "true or false",
        )
        _require(
            self.log_level is None or self.log_level in LOG_LEVELS,
            "log_level",
            self.log_level,
            f"one of {list(LOG_LEVELS)}",
        )

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[EngineOptions, dict[str, Any]]:
        """(the Engine's own options, the rest with SGLang's names translated)."""
        rest = translate_options(options)
        own = {f.name: rest.pop(f.name) for f in dataclasses.fields(cls) if f.name in rest}
        return cls(**own), rest

    def check_inputs(self, prompt: Any, sampling_params: Any) -> None:
        """Refuse what needs the tokenizer when it is skipped: text prompts and stop strings."""
        if not self.skip_tokenizer_init:
            return
        if prompt is not None:
            raise ValueError(
                "prompt is invalid with skip_tokenizer_init=True: expected input_ids (the "
                "engine has no tokenizer)"
            )
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params]
        if any(isinstance(p, dict) and p.get("stop") for p in params):
            raise ValueError(
                "sampling_params.stop is invalid with skip_tokenizer_init=True: expected "
                "stop_token_ids (stop strings need the tokenizer)"
            )
