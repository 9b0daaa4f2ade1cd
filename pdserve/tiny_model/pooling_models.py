"""Tiny embedding and reward (sequence-classification) model directories, offline: the tiny
model's tokenizer and shapes, random weights under transformers' own parameter names, and for
embeddings a sentence-transformers pooling config (`modules.json`, `1_Pooling/config.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pdserve.tiny_model.build import (
    ARCH_CLASSES,
    SPECIAL_TOKENS,
    Arch,
    generation_config,
    hf_config,
    random_weights,
    train_tokenizer,
    write_json,
    write_tokenizer,
)

PoolingName = Literal["last", "mean", "cls"]
_POOLING_KEYS = {
    "last": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
}


def build_tiny_embedding_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    pooling: PoolingName = "last",
    normalize: bool = True,
    seed: int = 0,
    sentence_transformers: bool = True,
) -> Path:
    """A bare decoder (`LlamaModel`...) with a sentence-transformers config choosing `pooling`
    (without one: pdserve's default, last token + L2 normalization)."""
    out = _start(out_dir, arch, ARCH_CLASSES[arch].replace("ForCausalLM", "Model"))
    _write_weights(out, seed, "AutoModel")
    if sentence_transformers:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]  # fmt: skip
        if normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize",
                 "type": "sentence_transformers.models.Normalize"}
            )  # fmt: skip
        write_json(out / "modules.json", modules)  # type: ignore[arg-type]
        (out / "1_Pooling").mkdir(exist_ok=True)
        config = {key: key == _POOLING_KEYS[pooling] for key in _POOLING_KEYS.values()}
        write_json(out / "1_Pooling" / "config.json", {"word_embedding_dimension": 64, **config})
    return out


def build_tiny_reward_model(
    out_dir: str | Path, arch: Arch = "llama", num_labels: int = 1, seed: int = 0
) -> Path:
    """A `*ForSequenceClassification` directory with a `score` head of num_labels rows."""
    head = ARCH_CLASSES[arch].replace("ForCausalLM", "ForSequenceClassification")
    out = _start(out_dir, arch, head, num_labels=num_labels)
    _write_weights(out, seed, "AutoModelForSequenceClassification")
    return out


def _start(out_dir: str | Path, arch: Arch, architecture: str, **extra: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(512)
    write_tokenizer(tokenizer, out)
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = hf_config(arch, tokenizer.get_vocab_size(with_added_tokens=True), token_ids)
    config = {**config, "architectures": [architecture], **extra}
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(config))
    return out


def _write_weights(out: Path, seed: int, auto_class: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config, dtype=torch.float32)
    shapes = {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}
    save_file(random_weights(shapes, seed), str(out / "model.safetensors"), {"format": "pt"})


def cached_tiny_pooling_model(kind: Literal["embedding", "reward"]) -> Path:
    """The examples' tiny embedding (mean pooling, normalized) or reward model, built on first
    use beside `cached_tiny_model`'s (`$XDG_CACHE_HOME/pdserve` or ~/.cache/pdserve)."""
    from pdserve.tiny_model.build import cached_tiny_model

    path = cached_tiny_model().parent / f"tiny-{kind}"
    if not (path / "model.safetensors").is_file():
        if kind == "embedding":
            build_tiny_embedding_model(path, pooling="mean")
        else:
            build_tiny_reward_model(path)
    return path
