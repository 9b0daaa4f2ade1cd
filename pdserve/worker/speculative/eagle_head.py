"""An EAGLE-2 draft head (the format SGLang's `LlamaForCausalLMEagle` and the EAGLE authors'
checkpoints use): `fc` maps concat(token embedding, target hidden state) [2H] to [H], then one
Llama decoder layer whose input RMSNorm is left out; its output (no final norm) goes through the
target's LM head. The token embedding and the LM head are the target's.

Row i of the head pairs the embedding of token i+1 with the target's final-normed hidden state at
position i, and sits at position i of its own one-layer paged KV pool (same page ids as the
target's), so its output predicts the hidden state at i+1, whence the token at i+2.

Checkpoint names (safetensors or pytorch_model.bin), with or without a `model.` prefix:
`fc.weight` [H, 2H], `fc.bias` [H] (optional), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`, `layers.0.post_attention_layernorm.weight`;
`embed_tokens.weight`, `lm_head.weight`, `norm.weight` and `layers.0.input_layernorm.weight`
are ignored (shared with the target, or unused).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.kernels.attention import AttentionBackend
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models.llama import LlamaAttention, LlamaMLP, RMSNorm, select_kernels

EAGLE_ARCHITECTURES = ("LlamaForCausalLMEagle", "EagleLlamaForCausalLM", "LlamaForCausalLM")
_IGNORED = (
    "embed_tokens.weight",
    "lm_head.weight",
    "norm.weight",
    "layers.0.input_layernorm.weight",
)


def eagle_model_config(path: str | Path) -> ModelConfig:
    """The head's ModelConfig (one layer) from its config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"speculative_draft_model_path={str(path)!r}: no config.json there")
    hf = json.loads(cfg_path.read_text())
    arch = (hf.get("architectures") or ["LlamaForCausalLMEagle"])[0]
    if arch not in EAGLE_ARCHITECTURES:
        raise ValueError(
            f"speculative_draft_model_path={str(path)!r}: architecture {arch!r} is not an "
            f"EAGLE-2 Llama head: expected one of {list(EAGLE_ARCHITECTURES)}"
        )
    if hf.get("num_hidden_layers", 1) != 1:
        raise ValueError(
            f"speculative_draft_model_path={str(path)!r}: num_hidden_layers="
            f"{hf['num_hidden_layers']} is not supported: expected 1"
        )
    return ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"]})


class EagleHead(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        kernels = select_kernels(attention.use_triton_kernels)
        with torch.device("meta"):
            self.fc = nn.Linear(2 * hidden, hidden, bias=True, dtype=dtype)
            self.self_attn = LlamaAttention(config, 0, attention, dtype)
            self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype, kernels)
            self.mlp = LlamaMLP(config, dtype, kernels)
        self.to_empty(device=device)
        self.requires_grad_(False)

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H]: embeddings of each row's next token
        features: torch.Tensor,  # [T, H]: the target's (or this head's) hidden state per row
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,  # [max_positions, D] float32, the target's
    ) -> torch.Tensor:  # [T, H]: the predicted next hidden state per row
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))  # [T, H]
        attn = self.self_attn(x, batch, kv_pool, cos_sin_cache)  # [T, H]
        normed, residual = self.post_attention_layernorm.add_and_norm(attn, x)
        return self.mlp(normed) + residual

    def load_weights(self, path: str | Path) -> None:
        """Fill every parameter from the checkpoint in `path`; ValueError naming a missing or
        misshapen tensor."""
        tensors = _read_checkpoint(Path(path))
        params = dict(self.named_parameters())
        filled: set[tuple[str, str | None]] = set()
        for name, t in tensors.items():
            name = name.removeprefix("model.")
            if name in _IGNORED:
                continue
            target = _our_name(name)
            if target is None:
                raise ValueError(f"EAGLE head {path}: unexpected tensor {name!r}")
            dest, merged = target
            part = params[dest].data
            if merged is not None:  # q/k/v or gate/up: rows of one merged matmul
                start, size = _rows_of(self, dest, merged)
                part = part[start : start + size]
            if t.shape != part.shape:
                raise ValueError(
                    f"EAGLE head {path}: {name} has shape {tuple(t.shape)}, expected "
                    f"{tuple(part.shape)}"
                )
            part.copy_(t.to(part.dtype))
            filled.add((dest, merged))
        if ("fc.bias", None) not in filled:  # some heads have no fc bias
            self.fc.bias.data.zero_()
            filled.add(("fc.bias", None))
        expected = {(n, None) for n in ("fc.weight", "post_attention_layernorm.weight")}
        expected |= {(n, None) for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight")}
        expected |= {("self_attn.qkv_proj.weight", p) for p in ("q", "k", "v")}
        expected |= {("mlp.gate_up_proj.weight", p) for p in ("gate", "up")}
        missing = sorted(f"{d}[{p}]" if p else d for d, p in expected - filled)
        if missing:
            raise ValueError(f"EAGLE head {path}: missing tensors {missing}")


def _our_name(name: str) -> tuple[str, str | None] | None:
    """Checkpoint name -> (our parameter, the part of a merged projection it fills, if any)."""
    if name in ("fc.weight", "fc.bias"):
        return name, None
    rest = name.removeprefix("layers.0.")
    if rest == name:
        return None
    for part in ("q", "k", "v"):
        if rest == f"self_attn.{part}_proj.weight":
            return "self_attn.qkv_proj.weight", part
    for part in ("gate", "up"):
        if rest == f"mlp.{part}_proj.weight":
            return "mlp.gate_up_proj.weight", part
    if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        return rest, None
    if rest == "post_attention_layernorm.weight":
        return rest, None
    return None


def _rows_of(head: EagleHead, dest: str, part: str) -> tuple[int, int]:
    """(first row, rows) of a merged projection's part (q, k, v or gate, up)."""
    if dest == "self_attn.qkv_proj.weight":
        q, kv, _ = head.self_attn.qkv_sizes
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[part]
    inter = head.config.intermediate_size
    return {"gate": (0, inter), "up": (inter, inter)}[part]


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bin_file = path / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)  # no pickled code
    raise ValueError(f"speculative_draft_model_path={str(path)!r}: no *.safetensors or .bin file")
