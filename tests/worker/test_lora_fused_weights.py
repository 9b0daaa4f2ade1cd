"""LoRA slots folded into the model's projection weights (worker/lora/lora_weights.py): each fused
weight holds the base weight then every slot's A rows, exactly, through loads, LRU swaps and
unloads; and the folded forward (one matmul, one expand) equals the split one (base matmul, shrink,
expand) on the same slots (CPU, float32); on CUDA, a decode step replaying the folded LoRA graph
equals peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_adapters import make_adapters, peft_reference

from pdserve.config.engine_config import EngineConfig, ModelConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker.lora.adapter import module_shapes
from pdserve.worker.lora.lora_layers import LoraBatch
from pdserve.worker.lora.lora_weights import LoraWeights, fused_slices, model_linears
from pdserve.worker.model_runner import ModelRunner


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapters(tiny_llama, root, names=("alpha", "beta", "gamma"))


def _runner(model: Path, adapters: dict[str, Path] | None, **options: object) -> ModelRunner:
    options = {"device": "cpu", "dtype": "float32", "num_pages": 32, **options}
    if adapters is not None:
        options["lora_paths"] = [f"{n}={p}" for n, p in adapters.items()]
    config = EngineConfig.from_options(str(model), **options).resolved()
    return ModelRunner(config, ModelConfig.from_hf(model))


def _expected_rows(runner: ModelRunner, proj: str, layer: int) -> torch.Tensor:
    """[S n_sub R, in] built from the adapters the manager says each slot holds; zero elsewhere."""
    manager, w = runner.lora, runner.lora.weights
    subs = fused_slices(runner.model_config)[proj]
    in_f = module_shapes(runner.model_config)[subs[0][0]][0]
    n_sub, rank = len(subs), w.max_rank
    rows = torch.zeros(w.num_slots, n_sub, rank, in_f)
    for name, slot in manager._slots.items():
        for k, (module, _) in enumerate(subs):
            pair = manager.adapters[name].weights.get((layer, module))
            if pair is not None:
                rows[slot, k, : pair[0].shape[0]] = pair[0]
    return rows.view(-1, in_f)


def _check_fused(runner: ModelRunner, base: ModelRunner) -> None:
    w = runner.lora.weights
    linears, base_linears = model_linears(runner.model), model_linears(base.model)
    for proj, layers in w.fused_w.items():
        n_out = w.out_features[proj]
        for layer, fused in enumerate(layers):
            weight = linears[(layer, proj)].weight
            assert weight.data_ptr() == fused.data_ptr() and weight.shape[0] == n_out
            assert torch.equal(fused[:n_out], base_linears[(layer, proj)].weight)
            want = _expected_rows(runner, proj, layer)
            assert torch.equal(fused[n_out:], want), f"layer {layer} {proj}: A rows"


def test_fused_weight_rows_are_the_slots_a_through_swaps_and_unloads(
    tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    base = _runner(tiny_llama, None)
    runner = _runner(tiny_llama, adapters, max_loras_per_batch=2)
    manager = runner.lora
    assert manager.weights.fold
    assert set(manager.weights.fused_w) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    _check_fused(runner, base)  # every slot empty: zero rows
    assert not any(f[w:].any() for f, w in _all_a(runner))

    manager.prepare(["alpha", "beta", None])
    assert manager._slots == {"alpha": 0, "beta": 1}
    _check_fused(runner, base)
    manager.prepare(["gamma"])  # alpha is least recently used: gamma takes its slot
    assert manager._slots == {"beta": 1, "gamma": 0}
    _check_fused(runner, base)  # alpha's q/k/v rows are gone (gamma adapts o and up only)
    manager.unload("beta")
    assert manager._slots == {"gamma": 0}
    _check_fused(runner, base)
    slot1 = [f[w:].view(2, -1, f.shape[1])[1] for f, w in _all_a(runner)]
    assert not any(rows.any() for rows in slot1), "an unloaded adapter's rows stay"
    manager.load("beta", str(adapters["beta"]))
    manager.prepare(["beta", "gamma"])
    assert manager._slots == {"gamma": 0, "beta": 1}
    _check_fused(runner, base)


def _all_a(runner: ModelRunner) -> list[tuple[torch.Tensor, int]]:
    w = runner.lora.weights
    return [(f, w.out_features[p]) for p, layers in w.fused_w.items() for f in layers]


def test_folded_forward_equals_the_split_one(tiny_llama: Path) -> None:
    """Random slots (every module, ranks up to R, a bias on q/k/v): LoraBatch.linear with the
    fused matmul equals the base matmul plus segmented_lora_ref, base rows equal the base."""
    config = ModelConfig.from_hf(tiny_llama)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    base = _runner(tiny_llama, None)
    linears = model_linears(base.model)
    qkv = linears[(1, "qkv_proj")]
    qkv.bias = torch.nn.Parameter(torch.randn(qkv.weight.shape[0]), requires_grad=False)
    originals = {key: lin.weight.clone() for key, lin in linears.items()}
    cpu = torch.device("cpu")
    w = LoraWeights(config, modules, 3, 8, torch.float32, cpu, linears)
    for a in (*[a for layers in w.fused_a.values() for a in layers], *w.fused_b.values()):
        a.normal_(0, 0.5)
    row_slots = [2, -1, 0, 2, 1, -1, 2]
    lora = LoraBatch.build(w, row_slots, cpu)
    base_rows = [i for i, s in enumerate(row_slots) if s < 0]
    for (layer, proj), linear in linears.items():
        x = torch.randn(len(row_slots), linear.weight.shape[1])
        w.fold = True
        folded = lora.linear(layer, proj, linear, x)
        assert folded.stride(0) > folded.shape[1]  # a row-strided view of the fused output
        w.fold = False
        split = lora.linear(layer, proj, linear, x)
        torch.testing.assert_close(folded, split, atol=1e-5, rtol=1e-5)
        plain = torch.nn.functional.linear(x, originals[(layer, proj)], linear.bias)
        torch.testing.assert_close(folded[base_rows], plain[base_rows], atol=1e-5, rtol=1e-5)
        assert (folded - plain).abs().max() > 1e-2, f"{proj}: the adapters add nothing"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_graph_with_folded_lora_matches_peft_on_cuda(
    tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    """Prompts prefilled eagerly, then one decode step mixing base rows and three adapters: it
    replays the LoRA graph (fused matmuls, Triton expand) and its logits equal peft's."""
    runner = _runner(tiny_llama, adapters, device="cuda", max_loras_per_batch=3)
    assert runner.graph_runner is not None and runner.graph_runner.lora_inputs is not None
    prompts = [[5, 9, 13, 2, 7], [5, 9, 13, 2, 7, 8, 1], [3, 4, 6], [11, 12, 13], [7, 7]]
    loras = ["alpha", None, "beta", "gamma", "alpha"]
    reqs = []
    for i, (ids, lora) in enumerate(zip(prompts, loras)):
        reqs.append(Request(rid=str(i), prompt_ids=ids, sampling=SamplingParams(), lora_name=lora))
        reqs[-1].page_ids = [i + 1]  # one page each (16 tokens); page 0 is the graphs' padding
    runner.forward(ScheduledBatch([BatchItem(r, 0, len(r.prompt_ids) - 1) for r in reqs]))
    replays = runner.graph_runner.num_replays
    decode = ScheduledBatch([BatchItem(r, len(r.prompt_ids) - 1, 1) for r in reqs])
    logits = runner.forward(decode).cpu()  # [B, V]
    assert runner.graph_runner.num_replays == replays + 1, "the decode step ran eagerly"
    ref = peft_reference(tiny_llama, adapters)
    for ids, lora, got in zip(prompts, loras, logits):
        with torch.no_grad():
            if lora is None:
                with ref.disable_adapter():
                    want = ref(torch.tensor([ids])).logits[0, -1]
            else:
                ref.set_adapter(lora)
                want = ref(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3, msg=f"lora={lora}")
