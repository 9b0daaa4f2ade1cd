"""NGRAM speculative decoding on vision-language models (CPU): a verify pass lays out the step's
image rows and (Qwen2-VL) M-RoPE positions as a plain step does, so greedy tokens of requests with
images, and of a text-only one beside them, equal the plain loop's, with verify passes run (a
verify pass at the wrong M-RoPE positions would change them). EAGLE is refused for them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from vlm_reference import image_requests, run_to_end

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.config.speculative_config import SpeculativeConfig
from pdserve.scheduler.request import Request
from pdserve.tiny_model.llava import build_tiny_llava_next
from pdserve.tiny_model.vlm import build_tiny_vlm
from pdserve.worker.worker_core import WorkerCore

NGRAM = SpeculativeConfig(speculative_algorithm="NGRAM", speculative_num_draft_tokens=4)
BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_tiny_vlm,  # M-RoPE: decode positions shifted by the images' delta
    "llava_next_qwen2": functools.partial(build_tiny_llava_next, decoder="qwen2"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp("spec_vlm") / request.param, seed=8)


def _core(model: Path, spec: SpeculativeConfig | None) -> WorkerCore:
    config = EngineConfig(
        model_path=str(model), device="cpu", dtype="float32",
        scheduler=SchedulerConfig(num_pages=512, page_size=4, chunk_size=16),
        speculative=spec or SpeculativeConfig(),
    )  # fmt: skip
    return WorkerCore(config, overlap=False)


def _requests(model: Path, seed: int) -> list[Request]:
    sampling = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    question = "the cat sat on the mat, the cat sat"  # a repeated phrase: something to look up
    return image_requests(model, seed, sampling, question, [[(40, 60)], [(30, 50), (50, 30)], []])


def test_ngram_outputs_with_images_equal_the_plain_loop(model: Path) -> None:
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh pixels each run
    want = run_to_end(_core(model, None), _requests(model, seed))
    core = _core(model, NGRAM)
    assert run_to_end(core, _requests(model, seed)) == want, seed
    assert core.spec is not None and core.spec.stats.num_verify_steps > 0
    assert core.spec.stats.num_drafts > 0


def test_eagle_is_refused_for_a_vision_language_model(model: Path) -> None:
    eagle = SpeculativeConfig(
        speculative_algorithm="EAGLE", speculative_draft_model_path=str(model)
    )
    with pytest.raises(ValueError, match="not supported with a vision-language model yet: NGRAM"):
        _core(model, eagle)
