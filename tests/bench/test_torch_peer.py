"""The benchmark's compiled plain-torch peer (benchmarks/gpu/torch_peer.py) against transformers'
LlamaForCausalLM in float32 on the CPU: a peer that computed something else would make every
"pdserve / compiled torch" ratio meaningless."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

GPU_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_BENCH))

from torch_peer import TorchPeer, reference_logits  # noqa: E402

REL_TOL = 1e-5  # max |peer - transformers| / max |transformers|, float32


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module", params=["tiny_llama3_untied", "llama_default_rope_tied"])
def model_dir(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """`pdserve tiny-model`'s Llama (llama3 rope scaling, untied lm_head); and a transformers
    Llama saved with save_pretrained (default rope, tied embeddings, larger weights)."""
    if request.param == "tiny_llama3_untied":
        return tiny_llama
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=3, vocab_size=300, head_dim=8, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama_tied")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peer(model_dir: Path) -> TorchPeer:
    return TorchPeer(model_dir, "cpu", torch.float32, compile=False)


def _random_ids(peer: TorchPeer, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, peer.cfg.vocab_size, (batch, length), generator=gen)


def test_prefill_logits_equal_transformers_at_every_position(peer: TorchPeer, hf) -> None:
    ids = _random_ids(peer, 3, 37, seed=11)
    peer.ensure_cache(3, 37)
    with torch.no_grad():
        want = hf(ids).logits
        got = peer.model(ids, torch.arange(37).expand(3, 37), last_only=False)
    assert got.shape == want.shape
    assert _rel_err(got, want) < REL_TOL


def test_decode_steps_give_transformers_logits_and_greedy_tokens(peer: TorchPeer, hf) -> None:
    """Prefill, then one-token steps through the static cache: every step's logits equal a full
    forward of transformers over the sequence so far, and the tokens are its greedy choices."""
    prompts = _random_ids(peer, 2, 9, seed=12)
    gen = peer.generate(prompts.tolist(), 14)
    seqs = torch.cat([prompts, gen.token_ids], dim=1)  # [2, 9 + 14]
    with torch.no_grad():
        want = hf(seqs[:, :-1]).logits  # row t predicts token t + 1
    assert _rel_err(gen.decode_logits, want[:, 9:]) < REL_TOL
    assert torch.equal(gen.token_ids, want[:, 8:].argmax(-1))


def test_chunked_prefill_and_float32_reference_agree(peer: TorchPeer) -> None:
    """Prompts prefilled a few at a time land in their own cache rows; the reference used by the
    GPU check (a fresh float32 model over the whole sequence) gives the same logits."""
    prompts = _random_ids(peer, 5, 12, seed=13)
    peer.ensure_cache(5, 32)
    whole = peer.prefill(prompts)
    chunked = peer.prefill(prompts, max_tokens=24)  # two prompts a chunk
    assert torch.equal(whole, chunked)
    gen = peer.generate(prompts[:1].tolist(), 6)
    ref = reference_logits(peer, prompts[0].tolist() + gen.token_ids[0, :-1].tolist())
    assert _rel_err(gen.decode_logits[0], ref[12:]) < REL_TOL
