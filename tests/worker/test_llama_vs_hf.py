"""The Llama-family decoder against Hugging Face transformers (float32, CPU) as the reference.

Tiny random models of each supported architecture are saved with save_pretrained and loaded by
pdserve; logits must match for ragged prefill, extend over a cached prefix in scattered pages, and
batched decode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models import load_model

VOCAB = 300
PAGE_SIZE = 4
NUM_PAGES = 64
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
)
LLAMA3_SCALING = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Tiny, so the test's positions and head_dim touch all three bands of the scaling.
    original_max_position_embeddings=32,
)
WINDOW = 16
ARCHS = {
    "llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**SHAPE, sliding_window=None)
    ),
    # Mistral 7B v0.1's sliding window, small: every sequence below fits in it.
    "mistral_window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**SHAPE, sliding_window=WINDOW)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)),
    "qwen3_tied": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**SHAPE, tie_word_embeddings=True)
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    """Larger weights than HF's init (std 0.02, zero biases, unit norms) so logits are not flat and
    biases and norm weights matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)


@dataclass
class HFModel:
    path: Path
    model: torch.nn.Module  # the transformers model, float32


@pytest.fixture(scope="module", params=sorted(ARCHS))
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFModel:
    torch.manual_seed(0)
    model = ARCHS[request.param]().eval()
    _randomize(model)
    path = tmp_path_factory.mktemp(request.param)
    # Llama is saved in shards so the index loader runs too.
    model.save_pretrained(path, max_shard_size="50KB" if request.param == "llama3" else "1GB")
    return HFModel(path, model)


def _hf_logits(hf: HFModel, token_ids: list[int]) -> torch.Tensor:  # [L, vocab] float32
    with torch.no_grad():
        return hf.model(torch.tensor([token_ids])).logits[0].float()


# --- a minimal batch builder; the scheduler has the real one ---------------------------------


@dataclass
class SeqStep:
    new_ids: list[int]  # tokens added this step
    prefix_len: int  # tokens already in the cache
    pages: list[int]  # the sequence's pages, enough for prefix_len + len(new_ids)


def make_batch(steps: list[SeqStep], page_size: int) -> ForwardBatch:
    input_ids, positions, slots = [], [], []
    for s in steps:
        for pos in range(s.prefix_len, s.prefix_len + len(s.new_ids)):
            positions.append(pos)
            slots.append(s.pages[pos // page_size] * page_size + pos % page_size)
        input_ids += s.new_ids
    max_pages = max(len(s.pages) for s in steps)
    page_table = torch.zeros(len(steps), max_pages, dtype=torch.int32)
    for b, s in enumerate(steps):
        page_table[b, : len(s.pages)] = torch.tensor(s.pages, dtype=torch.int32)
    extend_lens = [len(s.new_ids) for s in steps]
    seq_lens = [s.prefix_len + len(s.new_ids) for s in steps]
    ends = torch.tensor(extend_lens).cumsum(0)
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        slots=torch.tensor(slots, dtype=torch.int64),
        page_table=page_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=extend_lens,
        logit_idx=ends - 1,
        is_decode=all(n == 1 for n in extend_lens),
    )


def make_steps(
    new_ids: list[list[int]], prefix_lens: list[int], pages: list[list[int]]
) -> list[SeqStep]:
    return [SeqStep(i, n, pg) for i, n, pg in zip(new_ids, prefix_lens, pages, strict=True)]


def scattered_pages(seq_lens: list[int], seed: int = 0) -> list[list[int]]:
    """Pages for each sequence from a shuffled pool (page 0 is reserved), never contiguous."""
    free = list(range(1, NUM_PAGES))
    random.Random(seed).shuffle(free)
    out = []
    for n in seq_lens:
        num = -(-n // PAGE_SIZE)
        out.append([free.pop() for _ in range(num)])
    return out


def random_ids(lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def _pdserve(hf: HFModel, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, KVPool]:
    config = ModelConfig.from_hf(hf.path)
    model = load_model(config, hf.path, dtype, "cpu")
    return model, KVPool(config, NUM_PAGES, PAGE_SIZE, dtype, "cpu")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# --- tests -----------------------------------------------------------------------------------


def test_ragged_prefill_matches_hf(hf_model: HFModel) -> None:
    lengths = [5, 9, 1, 14]
    prompts = random_ids(lengths)
    model, pool = _pdserve(hf_model)

    batch = make_batch(make_steps(prompts, [0] * 4, scattered_pages(lengths)), PAGE_SIZE)
    with torch.inference_mode():
        logits = model(batch, pool)

    assert logits.shape == (len(prompts), VOCAB) and logits.dtype == torch.float32
    expected = torch.stack([_hf_logits(hf_model, p)[-1] for p in prompts])
    _assert_close(logits, expected)


def test_extend_over_cached_prefix_matches_hf(hf_model: HFModel) -> None:
    # Prefixes of 6 and 3 tokens end mid-page; the third sequence has no prefix and starts fresh in
    # the extend step, so one batch mixes extend and plain prefill.
    full = random_ids([11, 7, 5], seed=2)
    prefix_lens = [6, 3, 0]
    pages = scattered_pages([len(s) for s in full], seed=3)
    model, pool = _pdserve(hf_model)
    expected = [_hf_logits(hf_model, s) for s in full]

    prefixes = make_steps([s[:n] for s, n in zip(full, prefix_lens, strict=True)], [0] * 3, pages)
    rests = make_steps([s[n:] for s, n in zip(full, prefix_lens, strict=True)], prefix_lens, pages)
    with torch.inference_mode():
        prefix_logits = model(make_batch(prefixes[:2], PAGE_SIZE), pool)
        extend_logits = model(make_batch(rests, PAGE_SIZE), pool)

    _assert_close(prefix_logits, torch.stack([expected[0][5], expected[1][2]]))
    _assert_close(extend_logits, torch.stack([e[-1] for e in expected]))


def test_batched_decode_matches_hf(hf_model: HFModel) -> None:
    prompt_lens, num_steps = [5, 8, 2], 4
    full = random_ids([n + num_steps for n in prompt_lens], seed=4)
    pages = scattered_pages([len(s) for s in full], seed=5)
    model, pool = _pdserve(hf_model)
    expected = [_hf_logits(hf_model, s) for s in full]

    with torch.inference_mode():
        prompts = [s[:n] for s, n in zip(full, prompt_lens, strict=True)]
        model(make_batch(make_steps(prompts, [0] * 3, pages), PAGE_SIZE), pool)
        for step in range(num_steps):
            lens = [n + step for n in prompt_lens]  # tokens cached before this step
            new_ids = [[s[n]] for s, n in zip(full, lens, strict=True)]
            batch = make_batch(make_steps(new_ids, lens, pages), PAGE_SIZE)
            assert batch.is_decode
            logits = model(batch, pool)
            want = torch.stack([e[n] for e, n in zip(expected, lens, strict=True)])
            _assert_close(logits, want)


# Max |logit error| allowed, as a fraction of the largest |logit|; measured errors are about a third.
HALF_TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("dtype", sorted(HALF_TOLERANCE, key=str))
def test_half_precision_is_close_to_hf(hf_model: HFModel, dtype: torch.dtype) -> None:
    lengths = [6, 13]
    prompts = random_ids(lengths, seed=6)
    pages = scattered_pages(lengths)
    model, pool = _pdserve(hf_model, dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    assert model.cos_sin_cache.dtype == torch.float32

    with torch.inference_mode():
        model(make_batch(make_steps([p[:-1] for p in prompts], [0, 0], pages), PAGE_SIZE), pool)
        last = make_steps([p[-1:] for p in prompts], [n - 1 for n in lengths], pages)
        logits = model(make_batch(last, PAGE_SIZE), pool)

    expected = torch.stack([_hf_logits(hf_model, p)[-1] for p in prompts])
    assert logits.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() < HALF_TOLERANCE[dtype] * scale


def test_a_sliding_window_caps_the_context_where_full_attention_equals_it(
    hf_model: HFModel,
) -> None:
    """pdserve's attention is full: exact for a windowed model only within the window, so the
    model's context is capped there; past it, transformers' windowed logits differ."""
    config = ModelConfig.from_hf(hf_model.path)
    if not isinstance(hf_model.model.config, transformers.MistralConfig):
        assert config.sliding_window == 0
        assert config.context_limit() == config.max_position_embeddings
        return
    window = hf_model.model.config.sliding_window or 0
    assert config.sliding_window == window
    assert config.context_limit() == (window or config.max_position_embeddings)
    if not window:
        return
    assert config.context_limit(4 * window) == window and config.context_limit(8) == 8
    long = random_ids([window + 8], seed=7)[0]
    model, pool = _pdserve(hf_model)
    batch = make_batch(make_steps([long], [0], scattered_pages([len(long)])), PAGE_SIZE)
    with torch.inference_mode():
        full = model(batch, pool)[0]
    windowed = _hf_logits(hf_model, long)[-1]
    assert (full - windowed).abs().max().item() > 1e-2  # the window matters past it
