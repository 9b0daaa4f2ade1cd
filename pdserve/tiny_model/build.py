"""Build a tiny random-weight Hugging Face model directory, offline, in seconds.

Tests and examples need a real checkpoint (tokenizer, config, safetensors) that transformers
loads as-is, without a download; this module trains a byte-level BPE tokenizer on the bundled
`corpus.txt` and writes random weights for a Llama, Qwen2 or Qwen3 shaped model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

Arch = Literal["llama", "qwen2", "qwen3"]
ARCHS: tuple[str, ...] = get_args(Arch)

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as in Qwen's template but without the default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Shapes shared by every arch: GQA (4 query heads over 2 KV heads), head_dim 16.
TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float32",
}

# Llama 3.1 style scaling. With head_dim 16 and theta 1e4 the rotary wavelengths span ~6 to
# ~20000 positions, so the low-frequency (scaled), high-frequency (kept) and smoothly
# interpolated bands of llama3 scaling are all used.
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

ARCH_CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
NO_SLIDING_WINDOW: dict[str, Any] = {
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": TINY_SHAPES["num_hidden_layers"],
}
# What differs between the archs. Qwen2 always has q/k/v biases (there is no config flag);
# Qwen3 has a per-head RMSNorm on q and k (q_norm, k_norm) instead of biases.
ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "rope_scaling": LLAMA3_ROPE_SCALING,
    },
    "qwen2": {"tie_word_embeddings": True, **NO_SLIDING_WINDOW},
    "qwen3": {"attention_bias": False, "tie_word_embeddings": True, **NO_SLIDING_WINDOW},
}

# transformers initialises with std 0.02, which gives nearly flat logits at this width (64);
# a larger std makes greedy choices clear-cut, so implementations compared in float32 agree.
WEIGHT_STD = 0.2
NORM_WEIGHT_STD = 0.1  # around 1.0, so a forgotten norm weight changes the output
# Qwen3's q_norm/k_norm fix the scale of q and k; weights around 1 would leave attention nearly
# uniform (scores with std ~1), which hides position bugs. 1.5 makes it about as peaked as the
# other archs'.
QK_NORM_WEIGHT_MEAN = 1.5


def build_tiny_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    seed: int = 0,
    vocab_size: int = 512,
    progress: bool = False,
) -> Path:
    """Write tokenizer, config, generation config and random weights into `out_dir`.

    The tokenizer depends only on `vocab_size` (training is deterministic); the weights
    depend on `arch` and `seed`. Returns `out_dir` as a `Path`.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; expected one of {ARCHS}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small; expected >= 259 (bytes + specials)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            print(f"[tiny-model] {msg}", file=sys.stderr, flush=True)

    say(f"training a {vocab_size}-token byte-level BPE on {CORPUS_PATH.name}")
    tokenizer = train_tokenizer(vocab_size)
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    write_tokenizer(tokenizer, out)

    say(f"writing {arch} config and random weights (seed={seed})")
    config = hf_config(arch, tokenizer.get_vocab_size(with_added_tokens=True), token_ids)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(config))
    write_weights(out, seed)
    say(f"done: {out}")
    return out


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE like Qwen2's (deterministic for a given corpus and size)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    # Qwen2's pipeline exactly: transformers rebuilds it for model_type qwen2 whatever
    # tokenizer.json says, so any other choice would make AutoTokenizer disagree with the file.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any UTF-8 text encodes even where the corpus lacks a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`."""
    tokenizer.save(str(out / "tokenizer.json"))
    added_tokens_decoder = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    special_tokens = {"bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        **special_tokens,
        "unk_token": None,
        # Like Qwen: no BOS is prepended; prompts start with whatever the caller writes.
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_SHAPES["max_position_embeddings"],
        "split_special_tokens": False,
    }
    write_json(out / "tokenizer_config.json", tokenizer_config)
    write_json(out / "special_tokens_map.json", special_tokens)


def hf_config(arch: Arch, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """The `config.json` dict, in the format published checkpoints use (`rope_scaling`)."""
    return {
        "architectures": [ARCH_CLASSES[arch]],
        "model_type": arch,
        **TINY_SHAPES,
        "vocab_size": vocab_size,
        "bos_token_id": token_ids[ENDOFTEXT],
        "eos_token_id": token_ids[IM_END],
        "pad_token_id": token_ids[ENDOFTEXT],
        "attention_dropout": 0.0,
        **ARCH_FIELDS[arch],
    }


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `generation_config.json` dict: greedy by default, stopping at `<|im_end|>`."""
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
    }


def write_weights(out: Path, seed: int) -> None:
    """Write `model.safetensors` with random weights for the config already in `out`.

    The parameter names and shapes come from transformers' own model class (built on the meta
    device, so nothing is initialised twice); tied `lm_head.weight` is left out, as in
    published Qwen checkpoints.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Sorted, so the weights a seed gives do not depend on the order modules are declared in.
    shapes = {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}
    save_file(random_weights(shapes, seed), str(out / "model.safetensors"), {"format": "pt"})


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Float32 tensors from one seeded generator, drawn in the order of `shapes`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            weights[name] = QK_NORM_WEIGHT_MEAN + NORM_WEIGHT_STD * noise
        elif name.endswith("norm.weight"):
            weights[name] = 1.0 + NORM_WEIGHT_STD * noise
        else:
            weights[name] = WEIGHT_STD * noise
    return weights


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """The tiny llama of `pdserve demo` and the examples, built on first use into
    `cache_dir` (default: $XDG_CACHE_HOME/pdserve or ~/.cache/pdserve)."""
    import os

    root = (
        Path(cache_dir)
        if cache_dir
        else (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve")
    )
    path = root / "tiny-llama"
    if not (path / "model.safetensors").is_file():
        build_tiny_model(path, arch="llama")
    return path
