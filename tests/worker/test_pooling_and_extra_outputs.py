"""The model-runner side of issue 11 and 13 against transformers (fp32, CPU, fresh random weights):
embeddings for every pooling kind, reward scores, hidden states of prompt and generated tokens,
and prompt logprobs, computed by WorkerCore in chunks and with the prefix cache on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.tiny_model.pooling_models import build_tiny_embedding_model, build_tiny_reward_model
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.worker_core import WorkerCore

# Mixed lengths; the second shares the first's first 8 tokens (a prefix-cache hit at page 4).
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [5, 6, 7, 8, 9, 10, 11, 12, 40, 41],
    [100, 200, 300],
    [77],
]
TOL = 1e-4


def make_core(path: Path, chunk_size: int = 4, prefix_cache: bool = True) -> WorkerCore:
    sched = SchedulerConfig(
        num_pages=128, page_size=4, chunk_size=chunk_size, enable_prefix_cache=prefix_cache
    )
    return WorkerCore(EngineConfig(model_path=str(path), device="cpu", scheduler=sched))


def run_to_end(core: WorkerCore) -> None:
    for _ in range(200):
        if not core.has_work():
            return
        core.step()
    raise AssertionError("the core never ran out of work")


def encode(core: WorkerCore, prompts: list[list[int]]) -> list[list[float]]:
    reqs = [Request(f"e{i}", list(p), SamplingParams()) for i, p in enumerate(prompts)]
    for req in reqs:
        core.add_pooled(req)
    run_to_end(core)
    assert all(r.finish is not None and not r.finish.is_abort for r in reqs)
    return [r.outputs.embedding for r in reqs]


def hf_last_hidden(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]  # [S, hidden], after the norm


def reference_embedding(path: Path, ids: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    hidden = hf_last_hidden(path, ids)
    pooled = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[pooling]
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


@pytest.mark.parametrize(
    "pooling,normalize,prefix_cache",
    [("last", True, True), ("mean", True, True), ("cls", False, True), ("mean", False, False)],
)
def test_embeddings_equal_transformers_for_each_pooling_kind(
    tmp_path: Path, pooling: str, normalize: bool, prefix_cache: bool
) -> None:
    path = build_tiny_embedding_model(tmp_path / "emb", pooling=pooling, normalize=normalize)
    config = ModelConfig.from_hf(path)
    assert (config.is_embedding, config.pooling, config.normalize) == (True, pooling, normalize)
    core = make_core(path, prefix_cache=prefix_cache)
    first = encode(core, PROMPTS)
    again = encode(core, PROMPTS)  # now with cached prefixes (when the cache is on)
    for ids, got, got_again in zip(PROMPTS, first, again):
        want = reference_embedding(path, ids, pooling, normalize)
        torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)
        torch.testing.assert_close(torch.tensor(got_again), want, atol=TOL, rtol=0)


def test_a_bare_decoder_without_sentence_transformers_pools_the_last_token_normalized(
    tmp_path: Path,
) -> None:
    path = build_tiny_embedding_model(tmp_path / "bare", arch="qwen2", sentence_transformers=False)
    [got] = encode(make_core(path), [PROMPTS[0]])
    want = reference_embedding(path, PROMPTS[0], "last", True)
    torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch,num_labels", [("llama", 1), ("qwen3", 3)])
def test_reward_scores_equal_sequence_classification_logits(
    tmp_path: Path, arch: str, num_labels: int
) -> None:
    from transformers import AutoModelForSequenceClassification

    path = build_tiny_reward_model(tmp_path / "rm", arch=arch, num_labels=num_labels)  # type: ignore[arg-type]
    scores = encode(make_core(path), PROMPTS)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for ids, got in zip(PROMPTS, scores):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
        assert len(got) == num_labels
        torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)


def test_a_generation_model_refuses_embedding_requests_and_the_reverse(
    tiny_llama: Path, tmp_path: Path
) -> None:
    gen = make_core(tiny_llama)
    with pytest.raises(ValueError, match="generation model"):
        gen.add_pooled(Request("x", [1, 2], SamplingParams()))
    emb = make_core(build_tiny_embedding_model(tmp_path / "emb"))
    with pytest.raises(ValueError, match="embedding"):
        emb.add(Request("y", [1, 2], SamplingParams()))


def test_a_classifier_directory_needs_is_embedding(tmp_path: Path) -> None:
    path = build_tiny_reward_model(tmp_path / "rm")
    assert ModelConfig.from_hf(path).is_embedding
    with pytest.raises(ValueError, match="is-embedding"):
        ModelConfig.from_hf(path, is_embedding=False)


def generate_with_extras(
    core: WorkerCore, prompts: list[list[int]], extras: list[ExtraOutputs], max_new: int = 5
) -> list[Request]:
    reqs = []
    for i, (ids, extra) in enumerate(zip(prompts, extras)):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
        req = Request(f"g{i}", list(ids), params, return_logprob=True, top_logprobs_num=3)
        req.outputs = extra
        core.add(req)
        reqs.append(req)
    run_to_end(core)
    return reqs


def test_hidden_states_equal_transformers_for_prompt_and_generated_tokens(
    tiny_llama: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    core = make_core(tiny_llama)
    generate_with_extras(core, PROMPTS[:1], [ExtraOutputs()])  # fills the prefix cache
    extras = [ExtraOutputs(return_hidden_states=True) for _ in PROMPTS]
    reqs = generate_with_extras(core, PROMPTS, extras)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for req, extra in zip(reqs, extras):
        fed = req.prompt_ids + req.output_ids[:-1]  # the last token is never fed back
        rows = extra.take_hidden(len(fed))
        assert len(rows) == len(fed)
        with torch.no_grad():
            out = model(torch.tensor([fed]), output_hidden_states=True)
        torch.testing.assert_close(torch.tensor(rows), out.hidden_states[-1][0], atol=TOL, rtol=0)


@pytest.mark.parametrize("start_len", [0, 3])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny_llama: Path, start_len: int) -> None:
    from transformers import AutoModelForCausalLM

    core = make_core(tiny_llama)
    generate_with_extras(core, PROMPTS[:1], [ExtraOutputs()])  # fills the prefix cache
    extras = [ExtraOutputs(logprob_start_len=start_len, top_logprobs_num=3) for _ in PROMPTS]
    reqs = generate_with_extras(core, PROMPTS, extras)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for req, extra in zip(reqs, extras):
        ids = req.prompt_ids
        entries = extra.take_input_logprobs(len(ids))
        assert entries is not None and len(entries) == max(len(ids) - start_len, 0)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        for j, entry in enumerate(entries):
            i = start_len + j
            assert entry.token_id == ids[i]
            if i == 0:
                assert entry.logprob is None and entry.top == []
                continue
            assert entry.logprob == pytest.approx(logprobs[i - 1, ids[i]].item(), abs=TOL)
            want_top = logprobs[i - 1].topk(3)
            assert [t for t, _ in entry.top] == want_top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(want_top.values.tolist(), abs=TOL)
