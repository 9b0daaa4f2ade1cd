"""LoRA adapters in PEFT's format against peft itself (float32, CPU): logits of one forward pass
that mixes the base model and two adapters of different ranks equal peft's for each prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_adapters import make_adapters, peft_reference

from pdserve.config.engine_config import EngineConfig, ModelConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker.lora.adapter import load_adapter
from pdserve.worker.model_runner import ModelRunner

PAGE_SIZE = 4


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_llama, tmp_path_factory.mktemp("adapters"))


def _runner(model: Path, adapters: dict[str, Path], **lora: object) -> ModelRunner:
    paths = [f"{name}={path}" for name, path in adapters.items()]
    config = EngineConfig.from_options(
        str(model),
        device="cpu",
        dtype="float32",
        num_pages=64,
        page_size=PAGE_SIZE,
        lora_paths=paths,
        **lora,
    ).resolved()
    return ModelRunner(config, ModelConfig.from_hf(model))


def _batch(prompts: list[list[int]], loras: list[str | None]) -> ScheduledBatch:
    items, next_page = [], 0
    for i, (ids, lora) in enumerate(zip(prompts, loras)):
        req = Request(rid=str(i), prompt_ids=ids, sampling=SamplingParams(), lora_name=lora)
        num_pages = -(-len(ids) // PAGE_SIZE)
        req.page_ids = list(range(next_page, next_page + num_pages))
        next_page += num_pages
        items.append(BatchItem(req, 0, len(ids)))
    return ScheduledBatch(items)


def _all_logits(runner: ModelRunner, batch: ScheduledBatch) -> list[torch.Tensor]:
    out = runner.forward_rows(batch)
    logits = runner.compute_logits(out.hidden)  # [T, V]
    return [logits[s : s + it.num_tokens] for s, it in zip(out.row_starts, batch.items)]


def _peft_logits(ref: object, ids: list[int], lora: str | None) -> torch.Tensor:
    with torch.no_grad():
        if lora is None:
            with ref.disable_adapter():
                return ref(torch.tensor([ids])).logits[0]
        ref.set_adapter(lora)
        return ref(torch.tensor([ids])).logits[0]


def test_mixed_batch_of_base_and_two_adapters_matches_peft(
    tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    runner = _runner(tiny_llama, adapters)
    ref = peft_reference(tiny_llama, adapters)
    prompts = [[5, 9, 13, 2, 7], [5, 9, 13, 2, 7, 8, 1], [3, 4], [11, 12, 13], [5, 9, 13]]
    loras = ["alpha", None, "beta", "alpha", "beta"]
    got = _all_logits(runner, _batch(prompts, loras))
    for ids, lora, logits in zip(prompts, loras, got):
        want = _peft_logits(ref, ids, lora)
        torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4, msg=f"lora={lora}")
    # The adapters matter: the same prompt's logits differ between base and each adapter.
    base = _peft_logits(ref, prompts[0], None)
    assert (got[0] - base).abs().max() > 1e-2


def test_more_adapters_than_slots_swap_in_lru(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    runner = _runner(tiny_llama, adapters, max_loras_per_batch=1)
    ref = peft_reference(tiny_llama, adapters)
    ids = [5, 9, 13, 2]
    for lora in ["alpha", "beta", "alpha", None, "beta"]:
        (got,) = _all_logits(runner, _batch([ids], [lora]))
        torch.testing.assert_close(got, _peft_logits(ref, ids, lora), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="max_loras_per_batch=1"):
        runner.lora.prepare(["alpha", "beta"])


def _edit_config(folder: Path, **changes: object) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ],
)
def test_unsupported_adapter_is_refused_naming_it(
    tiny_llama: Path, adapters: dict[str, Path], tmp_path: Path, change: dict, named: str
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for file in adapters["beta"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    _edit_config(folder, **change)
    with pytest.raises(ValueError, match=named):
        load_adapter("bad", folder, ModelConfig.from_hf(tiny_llama))


def test_adapter_above_max_rank_is_refused(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="max_lora_rank=4"):
        _runner(tiny_llama, adapters, max_lora_rank=4)
