"""Random PEFT LoRA adapters for the tiny test models, made with `peft` itself (a test dependency
only): B is randomised so each adapter changes the outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

# Two adapters of different ranks and targets: all seven projections with rsLoRA, and a subset.
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "alpha": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "beta": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gamma": dict(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"]),
}


def make_adapter(base: Path, out: Path, seed: int, std: float = 0.3, **lora: Any) -> Path:
    """Save a random LoRA adapter for the model at `base` into `out`."""
    import peft

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


def make_adapters(
    base: Path, root: Path, names: tuple[str, ...] = ("alpha", "beta")
) -> dict[str, Path]:
    """Adapters named after ADAPTER_SPECS under `root`, one folder each."""
    return {
        name: make_adapter(base, root / name, seed=i + 1, **ADAPTER_SPECS[name])
        for i, name in enumerate(names)
    }


def peft_reference(base: Path, adapters: dict[str, Path]) -> Any:
    """A PeftModel over the base model holding every adapter (switch with set_adapter)."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    names = list(adapters)
    ref = peft.PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        ref.load_adapter(adapters[name], adapter_name=name)
    return ref.eval()
