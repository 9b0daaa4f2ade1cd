"""Random-weight Hugging Face checkpoints at real model shapes, written without a download.

Each directory holds config.json, generation_config.json, a tokenizer and safetensors weights
(std 0.02, norms 1.0) that both pdserve and transformers load as they would the published model.
The tokenizer is pdserve's tiny byte-level BPE, padded out to the real vocabulary size with tokens
that no merge produces: every id a random model emits then decodes to text (so streamed responses
carry a token per chunk and TTFT/TPOT are measured as for a real model), and token-id prompts pass
the tokenizer's range check.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

WEIGHT_STD = 0.02
_MARKER = "bench_checkpoint.json"  # written last: a directory holding it is complete
_BASE_VOCAB = 512  # the trained BPE; the rest of the vocabulary is padding tokens


@dataclass(frozen=True)
class ModelSpec:
    """A decoder's shape, as the published config.json gives it."""

    name: str
    arch: str  # "llama" | "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling_factor: float | None  # llama3 scaling; None: no scaling (Qwen3)
    max_position_embeddings: int
    rms_norm_eps: float

    def hf_config(self, special_ids: dict[str, int]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if self.arch == "llama" else "Qwen3ForCausalLM"],
            "model_type": self.arch,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": WEIGHT_STD,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            **special_ids,
        }
        if self.arch == "llama":
            config["mlp_bias"] = False
        if self.rope_scaling_factor is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        if self.arch == "qwen3":
            config.update(
                use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers
            )
        return config

    @property
    def kv_bytes_per_token(self) -> int:  # bf16 K and V of every layer
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 2


LLAMA_1B = ModelSpec(
    name="llama-3.2-1b", arch="llama", hidden_size=2048, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
    tie_word_embeddings=True, rope_theta=500000.0, rope_scaling_factor=32.0,
    max_position_embeddings=131072, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA_8B = ModelSpec(
    name="llama-3.1-8b", arch="llama", hidden_size=4096, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
    tie_word_embeddings=False, rope_theta=500000.0, rope_scaling_factor=8.0,
    max_position_embeddings=131072, rms_norm_eps=1e-5,
)  # fmt: skip
QWEN3_06B = ModelSpec(
    name="qwen3-0.6b", arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16,
    num_kv_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
    tie_word_embeddings=True, rope_theta=1000000.0, rope_scaling_factor=None,
    max_position_embeddings=40960, rms_norm_eps=1e-6,
)  # fmt: skip
# Smoke-test stand-ins (CPU, seconds): the same archs and ties; vocabularies larger than the
# trained BPE, so the padding tokens are exercised too.
_SMOKE = dict(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, max_position_embeddings=16384,
)  # fmt: skip
SMOKE_1B = ModelSpec(
    name="smoke-llama-tied", arch="llama", vocab_size=1024, tie_word_embeddings=True,
    rope_theta=500000.0, rope_scaling_factor=32.0, rms_norm_eps=1e-5, **_SMOKE,
)  # fmt: skip
SMOKE_8B = ModelSpec(
    name="smoke-llama-untied", arch="llama", vocab_size=1024, tie_word_embeddings=False,
    rope_theta=500000.0, rope_scaling_factor=8.0, rms_norm_eps=1e-5, **_SMOKE,
)  # fmt: skip
SMOKE_QWEN = ModelSpec(
    name="smoke-qwen3", arch="qwen3", vocab_size=1200, tie_word_embeddings=True,
    rope_theta=1000000.0, rope_scaling_factor=None, rms_norm_eps=1e-6, **_SMOKE,
)  # fmt: skip


# ---------------------------------------------------------------------------- shapes and sizes


def param_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, from transformers' own class on the meta device (tied
    lm_head.weight is left out, as in the published tied checkpoints)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}


@dataclass(frozen=True)
class WeightCost:
    """What one decode step of one token reads and computes, from the checkpoint's shapes."""

    num_params: int  # every parameter in the checkpoint
    decode_read_bytes: int  # bf16 bytes read per step: all but an untied embedding table
    matmul_params: int  # 2-D weights multiplied per token (lm_head included, embedding not)

    @classmethod
    def of(cls, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> WeightCost:
        numel = {name: _numel(shape) for name, shape in shapes.items()}
        embed = numel["model.embed_tokens.weight"]
        total = sum(numel.values())
        # A tied table is read whole by lm_head; an untied one only row by row (the lookup).
        read = total if spec.tie_word_embeddings else total - embed
        matrices = sum(n for name, n in numel.items() if len(shapes[name]) == 2)
        matmul = matrices if spec.tie_word_embeddings else matrices - embed
        return cls(total, 2 * read, matmul)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_bytes(spec: ModelSpec) -> int:
    """bf16 bytes of the safetensors files, from the spec alone (to choose where to write)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size
    embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return 2 * (spec.num_layers * per_layer + embed)


# ---------------------------------------------------------------------------- writing


def write_checkpoint(
    spec: ModelSpec, out_dir: Path, device: str, shard_bytes: int = 4 << 30, seed: int = 0
) -> Path:
    """Write (or reuse, when complete and of the same spec) a checkpoint for `spec`."""
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == asdict(spec):
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    special_ids = write_padded_tokenizer(out_dir, spec.vocab_size, spec.max_position_embeddings)
    _write_json(out_dir / "config.json", spec.hf_config(special_ids))
    _write_json(
        out_dir / "generation_config.json",
        {"do_sample": False, **special_ids},
    )
    shapes = param_shapes(out_dir)
    _write_shards(shapes, out_dir, device, shard_bytes, seed)
    seconds = time.perf_counter() - start
    _write_json(marker, {"spec": asdict(spec), "write_s": seconds})
    return out_dir


def _write_shards(
    shapes: dict[str, tuple[int, ...]], out_dir: Path, device: str, shard_bytes: int, seed: int
) -> None:
    """Fill tensors on `device` (fast on a GPU) and save them a shard at a time, so host memory
    holds one shard, not the model."""
    from safetensors.torch import save_file

    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator(device=device).manual_seed(seed)
    files = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    for file, names in zip(files, groups):
        tensors = {name: _random_tensor(name, shapes[name], device, generator) for name in names}
        save_file(tensors, str(out_dir / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    if len(files) > 1:
        total = sum(2 * _numel(s) for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out_dir / "model.safetensors.index.json", index)


def _random_tensor(
    name: str, shape: tuple[int, ...], device: str, generator: torch.Generator
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.empty(shape, dtype=torch.bfloat16, device=device)
    t.normal_(0.0, WEIGHT_STD, generator=generator)
    return t.cpu()


def write_padded_tokenizer(out_dir: Path, vocab_size: int, max_len: int) -> dict[str, int]:
    """The tiny model's BPE with padding tokens up to `vocab_size`; returns the special ids."""
    from tokenizers import Tokenizer

    from pdserve.tiny_model.build import ENDOFTEXT, IM_END, train_tokenizer, write_tokenizer

    if vocab_size < _BASE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is invalid: expected >= {_BASE_VOCAB}")
    data = json.loads(train_tokenizer(_BASE_VOCAB).to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data["added_tokens"]}
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in data["added_tokens"])])
    for word in _padding_words():
        if next_id >= vocab_size:
            break
        if word not in taken:
            vocab[word] = next_id
            next_id += 1
    tokenizer = Tokenizer.from_str(json.dumps(data))
    write_tokenizer(tokenizer, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = max_len
    _write_json(config_path, config)
    eos, pad = tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)
    return {"bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad}


def _padding_words() -> Any:
    """' a', ' b', ..., ' z', ' aa', ... in byte-level form: decodable, never merged into."""
    letters = string.ascii_lowercase
    i = 0
    while True:
        word, n = "", i + 1
        while n:
            n, r = divmod(n - 1, len(letters))
            word = letters[r] + word
        yield "\u0120" + word  # byte-level BPE's space
        i += 1


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
