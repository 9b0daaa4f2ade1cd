"""load_weights: Hugging Face safetensors checkpoints (single and sharded) into the pdserve model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.models import build_model, load_model
from pdserve.worker.weight_loader import load_weights

SHAPE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_hidden_layers=2,
    vocab_size=100,
)


def _save_qwen2(path: Path, tie: bool = False, max_shard_size: str = "1GB") -> torch.nn.Module:
    """A tiny random Qwen2 (q/k/v biases) saved to `path`; returns the transformers model."""
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=tie))
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.1)
    hf.save_pretrained(path, max_shard_size=max_shard_size)
    return hf


def _load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return load_model(ModelConfig.from_hf(path), path, dtype, "cpu")


def _rewrite_checkpoint(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or drop (None) checkpoint tensors of a single-file checkpoint."""
    tensors = load_file(path / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("max_shard_size", ["1GB", "20KB"], ids=["single", "sharded"])
def test_merged_projections_hold_the_checkpoint_rows(tmp_path: Path, max_shard_size: str) -> None:
    hf = _save_qwen2(tmp_path, max_shard_size=max_shard_size)
    if max_shard_size == "20KB":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = _load(tmp_path)

    hf_params = dict(hf.named_parameters())
    ours = dict(model.named_parameters())
    for layer in range(SHAPE["num_hidden_layers"]):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        for kind in ("weight", "bias"):
            want = torch.cat([hf_params[f"{attn}.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(ours[f"{attn}.qkv_proj.{kind}"], want)
        want = torch.cat([hf_params[f"{mlp}.gate_proj.weight"], hf_params[f"{mlp}.up_proj.weight"]])
        assert torch.equal(ours[f"{mlp}.gate_up_proj.weight"], want)
        assert torch.equal(ours[f"{attn}.o_proj.weight"], hf_params[f"{attn}.o_proj.weight"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], hf_params[name])


def test_weights_are_cast_to_the_model_dtype(tmp_path: Path) -> None:
    hf = _save_qwen2(tmp_path)
    model = _load(tmp_path, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = hf.model.norm.weight.to(torch.bfloat16)
    assert torch.equal(model.model.norm.weight, want)


def test_tied_embeddings_share_one_tensor_even_if_checkpoint_has_lm_head(tmp_path: Path) -> None:
    hf = _save_qwen2(tmp_path, tie=True)
    # Some tied checkpoints store lm_head.weight anyway (and old ones a rope buffer): both tolerated.
    extras = {
        "lm_head.weight": hf.model.embed_tokens.weight.detach().clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
    }
    _rewrite_checkpoint(tmp_path, extras)
    model = _load(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)


def test_missing_weight_is_named(tmp_path: Path) -> None:
    _save_qwen2(tmp_path)
    _rewrite_checkpoint(tmp_path, {"model.layers.1.self_attn.k_proj.bias": None})
    with pytest.raises(
        ValueError, match=re.escape("missing weights [model.layers.1.self_attn.k_proj.bias]")
    ):
        _load(tmp_path)


def test_untied_model_without_lm_head_is_missing_it(tmp_path: Path) -> None:
    _save_qwen2(tmp_path, tie=False)
    _rewrite_checkpoint(tmp_path, {"lm_head.weight": None})
    with pytest.raises(ValueError, match=r"missing weights \[lm_head\.weight\]"):
        _load(tmp_path)


def test_unexpected_weight_is_named(tmp_path: Path) -> None:
    _save_qwen2(tmp_path)
    _rewrite_checkpoint(tmp_path, {"model.layers.0.mlp.gate_proj.bias": torch.zeros(48)})
    with pytest.raises(
        ValueError, match=re.escape("unexpected weights [model.layers.0.mlp.gate_proj.bias]")
    ):
        _load(tmp_path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    _save_qwen2(tmp_path)
    _rewrite_checkpoint(tmp_path, {"model.layers.0.self_attn.v_proj.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match=r"v_proj\.weight.*\(8, 32\).*expected \(16, 32\)"):
        _load(tmp_path)


def test_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    _save_qwen2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    model = build_model(ModelConfig.from_hf(tmp_path), torch.float32, "cpu")
    with pytest.raises(ValueError, match="neither model.safetensors"):
        load_weights(model, tmp_path)
