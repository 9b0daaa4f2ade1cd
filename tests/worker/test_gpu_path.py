"""The CUDA path against the torch path: Triton kernels, CUDA graph replay, greedy generation.

(a) A captured decode graph's logits equal the eager forward's, and both equal the torch-backend
    model's, for several batch sizes and random sequence lengths over a random KV pool.
(b) Greedy generation through the in-process Engine with the Triton backend, CUDA graphs on and
    off, matches the torch backend token for token in float32; in bfloat16 the agreement is
    reported (near-ties may break differently) and only loosely bounded.
Models: the tiny random models (llama, qwen3 with q/k norms) and a random Llama of 1024 hidden,
4 layers, 16 query / 4 KV heads, 32000 tokens. Lines starting with RESULT summarise the numbers.
"""

from __future__ import annotations

import gc
import importlib.util
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig, SchedulerConfig
from pdserve.entrypoints.engine import Engine
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.tiny_model import build_tiny_model
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA GPU and triton",
    ),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NUM_PAGES = 8192
GRAPH_MAX_BATCH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _build_bigger_llama(out: Path, tokenizer_from: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)  # transformers' init: std 0.02
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:  # ids past the tiny tokenizer's vocab decode to nothing
        shutil.copy(tokenizer_from / name, out / name)
    del model
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_models")
    dirs = {arch: build_tiny_model(root / arch, arch=arch, seed=1) for arch in ("llama", "qwen3")}
    dirs["llama1024"] = _build_bigger_llama(root / "llama1024", dirs["llama"])
    return dirs


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- (a) graph replay == eager == torch backend --------------------------------------------------


def _random_decode_batch(
    seq_lens: list[int], vocab_size: int, page_size: int, rng: random.Random
) -> ScheduledBatch:
    """Decode items over scattered pages; fake requests carry only what build_forward_batch reads."""
    return random_batch(seq_lens, [], vocab_size, page_size, rng)


def random_batch(
    decode_lens: list[int],
    prefills: list[tuple[int, int]],
    vocab_size: int,
    page_size: int,
    rng: random.Random,
) -> ScheduledBatch:
    """Decode rows (KV lengths after the step), then prefill chunks (prefix, new tokens), over
    scattered pages; fake requests carry only what build_forward_batch reads."""
    free = list(range(1, NUM_PAGES))  # page 0 is reserved
    rng.shuffle(free)
    items = []
    rows = [(n, n - 1, 1) for n in decode_lens] + [(p + e, p, e) for p, e in prefills]
    for seq_len, start, num in rows:
        num_pages = -(-seq_len // page_size)
        pages, free = free[:num_pages], free[num_pages:]
        req = SimpleNamespace(
            prompt_ids=[rng.randrange(vocab_size) for _ in range(seq_len - 1)],
            output_ids=[rng.randrange(vocab_size)],
            page_ids=pages,
            page_row=None,  # the model runner's copy of page_ids (Request.page_row)
            page_row_of=None,
        )
        items.append(BatchItem(req=req, start=start, num_tokens=num))  # type: ignore[arg-type]
    return ScheduledBatch(items)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


@pytest.mark.parametrize(
    ("model", "dtype"),
    [("qwen3", "bfloat16"), ("llama1024", "float32"), ("llama1024", "bfloat16")],
)
def test_graph_replay_logits_equal_eager_and_torch_backend(
    model_dirs: dict[str, Path], model: str, dtype: str
) -> None:
    path = model_dirs[model]
    config = EngineConfig(
        model_path=str(path),
        device="cuda",
        dtype=dtype,
        attention_backend="triton",
        cuda_graph=True,
        cuda_graph_max_batch=GRAPH_MAX_BATCH,
        scheduler=SchedulerConfig(num_pages=NUM_PAGES),
    ).resolved()
    model_config = ModelConfig.from_hf(path)
    start = time.perf_counter()
    runner = ModelRunner(config, model_config)
    setup_s = time.perf_counter() - start
    graphs = runner.graph_runner
    assert graphs is not None and graphs.batch_sizes[-1] == GRAPH_MAX_BATCH
    reference = load_model(model_config, path, runner.dtype, runner.device, "torch")
    runner.kv_pool.buffer.normal_()  # every cached token random; each step writes its own KV
    rng = random.Random(0)
    tol = 1e-3 if dtype == "float32" else 3e-2
    worst = {"graph_vs_eager": 0.0, "fed_vs_eager": 0.0, "eager_vs_torch": 0.0}
    argmax_agree, rows = 0, 0
    with torch.inference_mode():
        for bsz in (1, 3, 17, 64):
            seq_lens = [rng.randint(1, 1500) for _ in range(bsz)]
            batch = _random_decode_batch(seq_lens, model_config.vocab_size, runner.page_size, rng)
            fb = runner.build_forward_batch(batch)
            assert graphs.can_run(fb)
            eager = runner.model(fb, runner.kv_pool)  # [B, V]
            replayed = graphs.replay(fb).clone()
            fed_before = runner.graph_feed.num_fed
            fed = runner.forward(batch).clone()  # the decode step fed to its graph (graph_feed)
            assert runner.graph_feed.num_fed == fed_before + 1
            torch_ref = reference(fb, runner.kv_pool)
            worst["graph_vs_eager"] = max(worst["graph_vs_eager"], _rel_err(replayed, eager))
            worst["fed_vs_eager"] = max(worst["fed_vs_eager"], _rel_err(fed, eager))
            worst["eager_vs_torch"] = max(worst["eager_vs_torch"], _rel_err(eager, torch_ref))
            argmax_agree += int((replayed.argmax(-1) == torch_ref.argmax(-1)).sum())
            rows += bsz
    print(
        f"RESULT graph-vs-eager {model} {dtype}: max rel err graph/eager "
        f"{worst['graph_vs_eager']:.2e}, fed/eager {worst['fed_vs_eager']:.2e}, eager/torch "
        f"{worst['eager_vs_torch']:.2e}, argmax "
        f"agreement {argmax_agree}/{rows}; runner setup incl. capture of "
        f"{len(graphs.batch_sizes)} graphs {setup_s:.1f} s"
    )
    assert worst["graph_vs_eager"] <= tol
    assert worst["fed_vs_eager"] <= tol
    assert worst["eager_vs_torch"] <= tol
    del runner, reference, graphs
    _free_gpu()


# --- (b) greedy generation through the Engine ----------------------------------------------------


def _prompts(vocab_size: int) -> list[list[int]]:
    """24 prompts of 4..300 tokens; the first eight share a 64-token prefix (radix cache hits)."""
    rng = random.Random(1)
    shared = [rng.randrange(3, vocab_size) for _ in range(64)]
    prompts = []
    for i in range(24):
        own = [rng.randrange(3, vocab_size) for _ in range(rng.randint(4, 300))]
        prompts.append(shared + own if i < 8 else own)
    return prompts


def _generate(path: Path, prompts: list[list[int]], **options: Any) -> tuple[list[list[int]], dict]:
    engine = Engine(
        str(path),
        in_process=True,
        device="cuda",
        num_pages=4096,
        chunk_size=64,  # prompts longer than this are prefilled in pieces over their prefix
        cuda_graph_max_batch=32,
        **options,
    )
    graphs = engine.core.runner.graph_runner
    replays_before = graphs.num_replays if graphs is not None else 0
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    start = time.perf_counter()
    results = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    replays = graphs.num_replays - replays_before if graphs is not None else 0
    outputs = [r["output_ids"] for r in results]
    piecewise = engine.core.runner.piecewise
    piecewise_runs = piecewise.num_runs if piecewise is not None else 0
    engine.shutdown()
    del engine, graphs, piecewise
    _free_gpu()
    return outputs, {"replays": replays, "seconds": elapsed, "piecewise_runs": piecewise_runs}


def _agreement(outs: list[list[int]], refs: list[list[int]]) -> tuple[float, float, float]:
    """(exact-match rate, first-token agreement, mean common-prefix fraction)."""
    exact = sum(o == r for o, r in zip(outs, refs)) / len(refs)
    first = sum(o[:1] == r[:1] for o, r in zip(outs, refs)) / len(refs)
    prefix = 0.0
    for o, r in zip(outs, refs):
        n = next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
        prefix += n / max(len(r), 1)
    return exact, first, prefix / len(refs)


@pytest.mark.parametrize(
    ("model", "dtype"),
    [
        ("llama", "float32"),
        ("qwen3", "float32"),
        ("qwen3", "bfloat16"),
        ("llama1024", "float32"),
        ("llama1024", "bfloat16"),
    ],
)
def test_greedy_generation_matches_torch_backend(
    model_dirs: dict[str, Path], model: str, dtype: str
) -> None:
    path = model_dirs[model]
    prompts = _prompts(ModelConfig.from_hf(path).vocab_size)
    refs, ref_info = _generate(path, prompts, dtype=dtype, attention_backend="torch")
    assert ref_info["replays"] == 0
    for cuda_graph in (True, False):
        outs, info = _generate(
            path, prompts, dtype=dtype, attention_backend="triton", cuda_graph=cuda_graph
        )
        assert (info["replays"] > 0) == cuda_graph
        exact, first, prefix = _agreement(outs, refs)
        print(
            f"RESULT greedy {model} {dtype} graphs={'on' if cuda_graph else 'off'}: exact "
            f"{exact:.0%}, first token {first:.0%}, common prefix {prefix:.0%} of 24 prompts x 24 "
            f"tokens; {info['replays']} graph replays; generate {info['seconds']:.2f} s "
            f"(torch backend {ref_info['seconds']:.2f} s)"
        )
        if dtype == "float32":
            assert exact >= 0.9
        else:
            assert first >= 0.75


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate-rotary-store"])
@pytest.mark.parametrize("model,dtype", [("llama", "float32"), ("qwen3", "bfloat16")])
def test_fused_decode_generation_matches_torch_backend(
    model_dirs: dict[str, Path],
    model: str,
    dtype: str,
    fused: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Triton decode kernel doing the rotary and the new token's KV store itself
    (attention.TRITON_FUSED_DECODE, the default), and the separate rotary + store kernel before
    it, in CUDA graphs and eagerly: greedy tokens as the torch backend's."""
    from pdserve.kernels import attention

    monkeypatch.setattr(attention, "TRITON_FUSED_DECODE", fused)
    path = model_dirs[model]
    prompts = _prompts(ModelConfig.from_hf(path).vocab_size)
    refs, _ = _generate(path, prompts, dtype=dtype, attention_backend="torch")
    for cuda_graph in (True, False):
        outs, info = _generate(
            path, prompts, dtype=dtype, attention_backend="triton", cuda_graph=cuda_graph
        )
        assert (info["replays"] > 0) == cuda_graph
        exact, first, prefix = _agreement(outs, refs)
        print(f"RESULT fused={fused} decode {model} {dtype} graphs={cuda_graph}: exact {exact:.0%}, "
              f"first {first:.0%}, prefix {prefix:.0%}")  # fmt: skip
        if dtype == "float32":
            assert exact >= 0.9
        else:
            assert first >= 0.75


# --- (c) what the graphs buy: a throughput report, not a check ----------------------------------


def test_report_generate_throughput_with_and_without_graphs(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["llama1024"]
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 32000) for _ in range(128)] for _ in range(32)]
    params = {"temperature": 0.0, "max_new_tokens": 128, "ignore_eos": True}
    for backend, cuda_graph in (("torch", False), ("triton", False), ("triton", True)):
        engine = Engine(
            str(path),
            in_process=True,
            device="cuda",
            dtype="bfloat16",
            attention_backend=backend,
            cuda_graph=cuda_graph,
            cuda_graph_max_batch=32,
            num_pages=4096,
            enable_prefix_cache=False,
        )
        for bsz in (1, 32):
            # The first run compiles the Triton kernel variants these shapes need; time the second.
            engine.generate(input_ids=prompts[:bsz], sampling_params=params)
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate(input_ids=prompts[:bsz], sampling_params=params)
            elapsed = time.perf_counter() - start
            print(
                f"RESULT throughput llama1024 bf16 {backend} graphs={'on' if cuda_graph else 'off'} "
                f"batch {bsz}: {bsz * 128 / elapsed:.0f} tok/s (128 in / 128 out, {elapsed:.2f} s)"
            )
        engine.shutdown()
        del engine
        _free_gpu()
