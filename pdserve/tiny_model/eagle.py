"""`pdserve tiny-model OUT_DIR --eagle`: an EAGLE-2 draft head for the tiny model, in the format
SGLang's `LlamaForCausalLMEagle` loads (config.json with one layer; `fc.*` and `layers.0.*`
tensors; no embedding or LM head: the target's are shared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdserve.tiny_model.build import (
    LLAMA3_ROPE_SCALING,
    TINY_SHAPES,
    random_weights,
    write_json,
)

EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle"


def eagle_head_config(target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The head's config.json: the target's shapes (the tiny model's by default), one layer."""
    base = dict(target) if target is not None else {
        **TINY_SHAPES, "vocab_size": 512, "rope_scaling": LLAMA3_ROPE_SCALING
    }  # fmt: skip
    keep = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
        "vocab_size", "hidden_act", "torch_dtype",
    )  # fmt: skip
    config = {k: base[k] for k in keep if k in base}
    return {
        "architectures": [EAGLE_ARCHITECTURE],
        "model_type": "llama",
        **config,
        "num_hidden_layers": 1,
    }


def eagle_head_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the EAGLE authors' names."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    layer = "layers.0."
    return {
        "fc.weight": (hidden, 2 * hidden),
        "fc.bias": (hidden,),
        f"{layer}self_attn.q_proj.weight": (q, hidden),
        f"{layer}self_attn.k_proj.weight": (kv, hidden),
        f"{layer}self_attn.v_proj.weight": (kv, hidden),
        f"{layer}self_attn.o_proj.weight": (hidden, q),
        f"{layer}mlp.gate_proj.weight": (inter, hidden),
        f"{layer}mlp.up_proj.weight": (inter, hidden),
        f"{layer}mlp.down_proj.weight": (hidden, inter),
        f"{layer}post_attention_layernorm.weight": (hidden,),
    }


def build_tiny_eagle_head(
    out_dir: str | Path, target_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """Write a random-weight head for the model in target_dir (the tiny model's shapes when
    None) into out_dir. Its drafts are noise: the verify pass keeps outputs exact anyway."""
    import json

    from safetensors.torch import save_file

    target = None
    if target_dir is not None:
        target = json.loads((Path(target_dir) / "config.json").read_text())
    config = eagle_head_config(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    weights = random_weights(dict(sorted(eagle_head_shapes(config).items())), seed)
    save_file(weights, str(out / "model.safetensors"), {"format": "pt"})
    return out
