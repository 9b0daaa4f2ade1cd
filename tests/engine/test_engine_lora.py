"""The in-process Engine with LoRA adapters: greedy text per adapter equals peft's greedy
generation, in one batch mixing the base model and two adapters; live load and unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_adapters import ADAPTER_SPECS, make_adapter, make_adapters, peft_reference

from pdserve.entrypoints.engine import Engine

PROMPTS = ["the quick brown fox", "hello world, said the", "once upon a time"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_llama, tmp_path_factory.mktemp("engine_adapters"))


def _peft_greedy(ref: object, ids: list[int], lora: str | None) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            if lora is None:
                with ref.disable_adapter():
                    logits = ref(torch.tensor([out])).logits[0, -1]
            else:
                ref.set_adapter(lora)
                logits = ref(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids) :]


def test_engine_batch_mixing_adapters_matches_peft_and_loads_live(
    tiny_llama: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    paths = [f"{name}={path}" for name, path in adapters.items()]
    engine = Engine(
        str(tiny_llama),
        in_process=True,
        device="cpu",
        num_pages=256,
        page_size=4,
        lora_paths=paths,
        max_loras_per_batch=2,
        max_lora_rank=8,
    )
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    loras = ["alpha", None, "beta"] * 2
    prompts = PROMPTS + PROMPTS  # twice: the second round hits the prefix cache per adapter
    out = engine.generate(prompts, params, lora_path=loras)
    ref = peft_reference(tiny_llama, adapters)
    for prompt, lora, result in zip(prompts, loras, out):
        ids = engine.tokenizer(prompt)["input_ids"]
        assert result["output_ids"] == _peft_greedy(ref, ids, lora), lora
    # The same prompt under each adapter gives different tokens than the base model.
    base = engine.generate(PROMPTS[0], params)["output_ids"]
    assert engine.generate(PROMPTS[0], params, lora_path="alpha")["output_ids"] != base

    with pytest.raises(ValueError, match="not loaded"):
        engine.generate(PROMPTS[0], params, lora_path="gamma")
    gamma = make_adapter(tiny_llama, tmp_path / "gamma", seed=7, **ADAPTER_SPECS["gamma"])
    reply = engine.load_lora_adapter("gamma", str(gamma))
    assert reply == {
        "success": True,
        "error_message": "",
        "loaded_adapters": ["alpha", "beta", "gamma"],
    }
    assert engine.generate(PROMPTS[0], params, lora_path="gamma")["output_ids"] != base
    reply = engine.load_lora_adapter("bad", str(tmp_path / "missing"))
    assert not reply["success"] and "adapter_config.json" in reply["error_message"]
    assert engine.unload_lora_adapter("gamma")["loaded_adapters"] == ["alpha", "beta"]
    assert not engine.unload_lora_adapter("gamma")["success"]
    assert not engine.core.scheduler.running and engine.core.scheduler.cache.num_locked_pages == 0
    engine.shutdown()
