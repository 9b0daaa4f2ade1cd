"""LoRA on a vision-language model's decoder (tiny LLaVA-NeXT, float32, CPU): a request with an
image under an adapter gives peft's greedy tokens (PeftModel over transformers'
LlavaNextForConditionalGeneration, the same image), a request without one the base model's, in
the same batch; an adapter that also adapts the vision tower is refused naming the tensor (its
layers are named like the decoder's, so they were once read as the decoder's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vlm_reference import data_url, random_image

from pdserve.config.engine_config import EngineConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.processor import ImageProcessor
from pdserve.scheduler.request import Request
from pdserve.tiny_model.llava import build_tiny_llava_next
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 5
DECODER_ONLY = r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_next(tmp_path_factory.mktemp("vlm_lora") / "llava_next", seed=13)


def _adapter(model: Path, out: Path, target_modules: Any, seed: int) -> Path:
    import peft
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    return out


def _greedy(hf: Any, ids: list[int], loaded: Any) -> list[int]:
    input_ids = torch.tensor([ids])
    out = hf.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.from_numpy(loaded.pixel_values)[None],
        image_sizes=torch.tensor(loaded.image_sizes), max_new_tokens=NUM_NEW,
        min_new_tokens=NUM_NEW, do_sample=False,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_an_adapter_on_the_decoder_equals_peft_with_an_image(model: Path, tmp_path: Path) -> None:
    import peft
    import transformers
    from transformers import AutoTokenizer

    adapter = _adapter(model, tmp_path / "decoder", DECODER_ONLY, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = ImageProcessor.for_model(model, tokenizer)
    assert processor is not None
    rng = np.random.default_rng()  # fresh pixels each run
    loaded = processor.preprocess([data_url(random_image(rng, 50, 80))])
    parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
    base = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        model, dtype=torch.float32
    ).eval()
    want_base = _greedy(base, ids, loaded)
    want_lora = _greedy(peft.PeftModel.from_pretrained(base, adapter).eval(), ids, loaded)
    assert want_lora != want_base  # the adapter matters

    config = EngineConfig.from_options(
        str(model), device="cpu", dtype="float32", num_pages=256, page_size=4,
        lora_paths=[f"dec={adapter}"],
    )  # fmt: skip
    core = WorkerCore(config.resolved(), overlap=False)
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0)
    reqs = [Request("lora", ids, sampling, lora_name="dec"), Request("base", ids, sampling)]
    for req in reqs:
        req.mm = processor.inputs(ids, loaded)
        core.add(req)
    while core.has_work():
        core.step()
    assert [r.output_ids for r in reqs] == [want_lora, want_base]


def test_an_adapter_of_the_vision_tower_is_refused(model: Path, tmp_path: Path) -> None:
    adapter = _adapter(model, tmp_path / "everywhere", ["q_proj", "v_proj"], seed=4)
    config = EngineConfig.from_options(
        str(model), device="cpu", dtype="float32", num_pages=64, page_size=4,
        lora_paths=[f"all={adapter}"],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"adapts the vision tower or its projector"):
        WorkerCore(config.resolved(), overlap=False)
