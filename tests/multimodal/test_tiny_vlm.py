"""`pdserve tiny-model --arch qwen2_vl|qwen2_5_vl` writes a directory transformers loads whole: config,
tokenizer with the vision tokens and chat template, the image processor's configuration, and
weights under the published names for every parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.entrypoints.cli import main


@pytest.mark.parametrize(
    ("arch", "model_class"),
    [("qwen2_vl", "Qwen2VLForConditionalGeneration"),
     ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")],
)  # fmt: skip
def test_cli_writes_a_vlm_directory_transformers_loads(
    tmp_path: Path, arch: str, model_class: str
) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer

    out = tmp_path / "vlm"
    assert main(["tiny-model", str(out), "--arch", arch, "--seed", "2"]) == 0
    model, info = getattr(transformers, model_class).from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight, by name
    stored = load_file(str(out / "model.safetensors"))
    assert (
        "visual.blocks.0.attn.qkv.weight" in stored
        and "model.layers.0.mlp.up_proj.weight" in stored
    )
    assert torch.equal(
        model.model.visual.blocks[1].attn.proj.weight, stored["visual.blocks.1.attn.proj.weight"]
    )
    assert torch.equal(model.lm_head.weight, stored["model.embed_tokens.weight"])  # tied
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert (processor.merge_size, processor.patch_size) == (2, 14)


def test_cli_writes_a_llava_onevision_directory_transformers_loads(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, LlavaOnevisionForConditionalGeneration

    out = tmp_path / "llava"
    assert main(["tiny-model", str(out), "--arch", "llava_onevision"]) == 0
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = load_file(str(out / "model.safetensors"))  # the published names
    assert torch.equal(model.model.image_newline, stored["image_newline"])
    name = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight, stored[name])
    assert torch.equal(model.lm_head.weight, stored["language_model.lm_head.weight"])
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert processor.image_grid_pinpoints[0] == [28, 28]


@pytest.mark.parametrize(
    ("arch", "model_class", "text_type"),
    [("llava_next", "LlavaNextForConditionalGeneration", "llama"),
     ("llava_next_qwen2", "LlavaNextForConditionalGeneration", "qwen2"),
     ("pixtral", "LlavaForConditionalGeneration", "mistral"),
     ("mistral3", "Mistral3ForConditionalGeneration", "mistral")],
)  # fmt: skip
def test_cli_writes_llava_next_and_pixtral_directories_transformers_loads(
    tmp_path: Path, arch: str, model_class: str, text_type: str
) -> None:
    import torch
    import transformers

    out = tmp_path / arch
    assert main(["tiny-model", str(out), "--arch", arch]) == 0
    model, info = getattr(transformers, model_class).from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.model_type == text_type


def test_cli_refuses_another_kind_for_the_vlm(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["tiny-model", str(tmp_path / "x"), "--arch", "qwen2_vl", "--kind", "reward"]) == 2
    assert "--arch qwen2_vl takes --kind generation" in capsys.readouterr().err
