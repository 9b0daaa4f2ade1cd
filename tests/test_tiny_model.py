"""The tiny model directory loads in transformers and behaves like a real checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from pdserve.tiny_model import build_tiny_model
from pdserve.tiny_model.cli import add_parser

ARCHS = ["llama", "qwen2", "qwen3"]
MULTILINGUAL = "Café naïve Zürich, 你好世界, こんにちは, Привет, 🎉🚀 and 12345 numbers.\n  x = 1"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_model_loads_in_transformers_with_every_weight(
    model_dirs: dict[str, Path], arch: str
) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(model_dirs[arch], output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    config = model.config
    assert model.dtype == torch.float32
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert config.num_key_value_heads == 2 < config.num_attention_heads == 4
    is_tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert is_tied == (arch != "llama")
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    assert hasattr(attn, "q_norm") == (arch == "qwen3")
    if arch == "llama":
        assert config.rope_parameters["rope_type"] == "llama3"
        assert config.rope_parameters["original_max_position_embeddings"] == 256


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_non_ascii_text(model_dirs: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    ids = tokenizer(MULTILINGUAL)["input_ids"]
    assert tokenizer.decode(ids) == MULTILINGUAL
    # transformers must agree with tokenizer.json itself (it rebuilds the pipeline for qwen2).
    raw_tokenizer = Tokenizer.from_file(str(model_dirs[arch] / "tokenizer.json"))
    assert raw_tokenizer.encode(MULTILINGUAL).ids == ids
    # A 4-byte emoji takes several byte-level tokens, none of them a character on its own.
    emoji_ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(emoji_ids) > 1
    assert all("\ufffd" in tokenizer.decode([i]) for i in emoji_ids)


def test_chat_template_writes_chatml_and_eos_is_im_end(model_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen3"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, café?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi, café?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(text)["input_ids"]
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tokenizer.eos_token_id == im_end
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"])
    assert model.config.eos_token_id == im_end == model.generation_config.eos_token_id


def test_same_seed_gives_identical_files_and_other_seed_other_weights(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    again = build_tiny_model(tmp_path / "again", arch="llama", seed=0)
    other = build_tiny_model(tmp_path / "other", arch="llama", seed=1)
    base = model_dirs["llama"]
    for name in ["tokenizer.json", "tokenizer_config.json", "config.json"]:
        assert (again / name).read_bytes() == (base / name).read_bytes()
    weights = load_file(base / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert weights.keys() == same.keys() == different.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, same[name]), name
        assert not torch.equal(tensor, different[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_gives_varied_tokens_with_clear_top1(
    model_dirs: dict[str, Path], arch: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    prompt_ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    out = model.generate(
        prompt_ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
    )
    new_ids = out[0, prompt_ids.shape[1] :].tolist()
    assert len(new_ids) == 16 and all(0 <= i < len(tokenizer) for i in new_ids)
    assert len(set(new_ids)) >= 4, new_ids
    # Logits far from flat: the usual top-1/top-2 gap dwarfs float32 rounding (~1e-5).
    with torch.no_grad():
        top2 = model(out).logits[0].topk(2, dim=-1).values  # [seq, 2]
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05


def test_rejects_unknown_arch_and_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gpt2"):
        build_tiny_model(tmp_path, arch="gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_model(tmp_path, vocab_size=100)


def test_cli_builds_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "7"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
