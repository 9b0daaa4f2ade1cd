"""LLaVA-OneVision, LLaVA-NeXT (with a Llama decoder, and with a Qwen2 one: `qwen_llava`),
Pixtral and Mistral 3 served end to end on CPU (Qwen2-VL is `test_vlm_serving.py`'s):
for each family one prefill + decode cluster (tcp) answers the official openai client (image_url
parts) and `/generate` (`image_data`), and the in-process Engine runs a mixed worker (through
examples/token_in_token_out/token_in_token_out_vlm_engine.py); greedy tokens for one and two
images equal transformers' `generate` on the same tiny model and images. LLaVA-OneVision also
takes a short video (a video_url part on chat, `video_data` on `/generate` and the Engine; a
file and a list of frames), its greedy tokens equal to transformers' with pixel_values_videos.
The family's examples/multimodal/<family>_server.py runs against the same cluster (OneVision,
Qwen-LLaVA and Pixtral; the Llama LLaVA-NeXT's is llama3_llava_server.py, run there too)."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from e2e_clusters import start_cluster

from pdserve.entrypoints.launch import Cluster
from pdserve.multimodal.processor import ImageProcessor
from pdserve.tiny_model.llava import (
    MEAN,
    STD,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_pixtral,
)
from tests.example_runner import EXAMPLES, run_example, run_example_in_process

sys.path.insert(0, str(Path(__file__).parents[1] / "multimodal"))
from vlm_reference import (  # noqa: E402 - the multimodal tests' reference helpers
    chat_prompt,
    data_url,
    hf_generate,
    media_prompt,
    normalized,
    random_frames,
    random_image,
    video_data_url,
)

pytestmark = pytest.mark.slow
NUM_NEW = 6
GREEDY = {"max_new_tokens": NUM_NEW, "min_new_tokens": NUM_NEW, "temperature": 0}
BUILDERS = {
    "llava_onevision": build_tiny_llava_onevision,
    "llava_next": build_tiny_llava_next,
    "qwen_llava": functools.partial(build_tiny_llava_next, decoder="qwen2"),  # LLaVA-NeXT, Qwen2
    "pixtral": build_tiny_pixtral,
    "mistral3": functools.partial(build_tiny_pixtral, mistral3=True),  # merged patches
}
HF_CLASSES = {"llava_onevision": "LlavaOnevisionForConditionalGeneration",
              "llava_next": "LlavaNextForConditionalGeneration",
              "qwen_llava": "LlavaNextForConditionalGeneration",
              "pixtral": "LlavaForConditionalGeneration",
              "mistral3": "Mistral3ForConditionalGeneration"}  # fmt: skip
# The families with an examples/multimodal/<family>_server.py.
EXAMPLE_NAMES = {"llava_next": "llama3_llava"}  # SGLang's names for the family's script
SERVER_EXAMPLES = [
    n
    for n in BUILDERS
    if (EXAMPLES / "multimodal" / f"{EXAMPLE_NAMES.get(n, n)}_server.py").exists()
]


@dataclass
class Family:
    """One family's tiny model, its running cluster and transformers' greedy tokens."""

    name: str
    path: Path
    cluster: Cluster
    tokenizer: Any
    greedy: Callable[[str, list[Any]], list[int]]  # (question, images) -> tokens
    model: Any  # transformers' model (the greedy reference's)

    def prompt(self, question: str, num_images: int) -> str:
        return chat_prompt(self.tokenizer, question, num_images)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def hf_inputs(name: str, loaded: Any) -> dict[str, torch.Tensor]:
    """transformers' pixel layout for the images the tokenizer process loaded: OneVision's and
    NeXT's tiles padded per image [n, tiles, 3, S, S] (OneVision also takes batch_num_images);
    Pixtral's images padded to the largest."""
    flat = torch.from_numpy(loaded.pixel_values)
    sizes = torch.tensor(loaded.image_sizes)
    if name in ("llava_onevision", "llava_next", "qwen_llava"):
        per_image = flat.split(loaded.num_patches)
        most = max(loaded.num_patches)
        tiles = [torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])]) for t in per_image]
        inputs = {"pixel_values": torch.stack(tiles), "image_sizes": sizes}
        if name == "llava_onevision":
            inputs["batch_num_images"] = torch.tensor([len(per_image)])
        return inputs
    height, width = (int(v) for v in sizes.max(dim=0).values)
    padded, start = torch.zeros(len(sizes), 3, height, width), 0
    for k, (h, w) in enumerate(loaded.image_sizes):
        padded[k, :, :h, :w] = flat[start : start + 3 * h * w].view(3, h, w)
        start += 3 * h * w
    return {"pixel_values": padded, "image_sizes": sizes}


def hf_model(name: str, path: Path) -> Any:
    import transformers

    return getattr(transformers, HF_CLASSES[name]).from_pretrained(path, dtype=torch.float32).eval()


def reference(
    name: str, path: Path, tokenizer: Any, model: Any
) -> Callable[[str, list[Any]], list[int]]:
    processor = ImageProcessor.for_model(path, tokenizer)
    assert processor is not None
    memo: dict[tuple[Any, ...], list[int]] = {}

    def greedy(question: str, images: list[Any]) -> list[int]:
        key = (question, *map(id, images))
        if key not in memo:
            loaded = processor.preprocess([data_url(im) for im in images])
            prompt = chat_prompt(tokenizer, question, len(images))
            ids = tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
            input_ids = torch.tensor([ids])
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                **hf_inputs(name, loaded), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW,
                do_sample=False,
            )  # fmt: skip
            memo[key] = out[0, len(ids) :].tolist()
        return memo[key]

    return greedy


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Family]:
    """The family's tiny model and its prefill + decode cluster (tcp), once per module."""
    from transformers import AutoTokenizer

    name = request.param
    path = BUILDERS[name](tmp_path_factory.mktemp(name) / name, seed=21)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cluster = start_cluster(path, "pd", kv_transfer="tcp")
    try:
        model = hf_model(name, path)
        yield Family(name, path, cluster, tokenizer, reference(name, path, tokenizer, model), model)
    finally:
        cluster.stop(grace_s=1)


# Two images of different shapes (OneVision: tiled alone, one tile each when two; Pixtral: each at
# its own resolution).
_RNG = np.random.default_rng(5)
PICS = [random_image(_RNG, 60, 100), random_image(_RNG, 90, 50)]
QUESTION = "What is in the pictures?"


@pytest.mark.parametrize("num_images", [1, 2])
def test_openai_chat_with_images_equals_transformers(family: Family, num_images: int) -> None:
    client = openai.OpenAI(base_url=f"{family.cluster.url}/v1", api_key="unused", max_retries=0)
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(pic)}} for pic in PICS[:num_images]
    ]
    content.append({"type": "text", "text": QUESTION})
    resp = client.chat.completions.create(
        model=family.name, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=NUM_NEW, extra_body={"min_tokens": NUM_NEW},
    )  # fmt: skip
    assert resp.choices[0].message.content == family.text(
        family.greedy(QUESTION, PICS[:num_images])
    )
    assert resp.usage.completion_tokens == NUM_NEW


def test_generate_image_data_equals_transformers(family: Family) -> None:
    body = {
        "text": [family.prompt(QUESTION, 1), family.prompt(QUESTION, 2)],
        "image_data": [data_url(PICS[0]), [data_url(p) for p in PICS]],
        "sampling_params": GREEDY,
    }
    out = httpx.post(f"{family.cluster.url}/generate", json=body, timeout=60).json()
    assert [o["output_ids"] for o in out] == [
        family.greedy(QUESTION, PICS[:1]),
        family.greedy(QUESTION, PICS),
    ]


def video_greedy(family: Family, prompt: str, frames: list[Any]) -> list[int]:
    """transformers' greedy tokens for a video (LLaVA-OneVision): pixel_values_videos built from
    the frames by the video processor's steps (rescale, normalize: frames at the tile's size are
    not resized), the prompt's one video placeholder expanded by pdserve's processor, whose
    token count transformers checks against the pooled features' rows."""
    processor = ImageProcessor.for_model(family.path, family.tokenizer)
    assert processor is not None
    loaded = processor.preprocess_media([], [[data_url(f) for f in frames]])
    ids = family.tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
    pixels = normalized(frames, MEAN, STD)[None]  # [1, F, 3, S, S]
    return hf_generate(family.model, ids, NUM_NEW, pixel_values_videos=pixels)


@pytest.mark.parametrize("family", ["llava_onevision"], indirect=True)  # the cluster above
def test_video_through_chat_generate_and_the_engine_equals_transformers(family: Family) -> None:
    """A short video as a file in a video_url part on chat; on /generate and the in-process
    Engine, the same frames as a list beside another (odd-length) video as a file."""
    from pdserve.entrypoints.engine import Engine

    rng = np.random.default_rng()  # fresh frames each run
    clip, other = random_frames(rng, 4, 28, 28), random_frames(rng, 3, 28, 28)  # a tile's size
    client = openai.OpenAI(base_url=f"{family.cluster.url}/v1", api_key="unused", max_retries=0)
    content = [
        {"type": "video_url", "video_url": {"url": video_data_url(clip)}},
        {"type": "text", "text": "What happens?"},
    ]
    resp = client.chat.completions.create(
        model=family.name, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=NUM_NEW, extra_body={"min_tokens": NUM_NEW},
    )  # fmt: skip
    prompts = [
        media_prompt(family.tokenizer, "What happens?", ["video"]),
        media_prompt(family.tokenizer, "And here?", ["video"]),
    ]
    want = [video_greedy(family, prompts[0], clip), video_greedy(family, prompts[1], other)]
    assert resp.choices[0].message.content == family.text(want[0])
    assert resp.usage.completion_tokens == NUM_NEW
    video_data = [[[data_url(f) for f in clip]], video_data_url(other)]
    body = {"text": prompts, "video_data": video_data, "sampling_params": GREEDY}
    out = httpx.post(f"{family.cluster.url}/generate", json=body, timeout=60).json()
    assert [o["output_ids"] for o in out] == want
    options = {"device": "cpu", "num_pages": 512, "page_size": 4}
    with Engine(str(family.path), in_process=True, **options) as engine:
        outs = engine.generate(prompts, GREEDY, video_data=video_data)
    assert [o["output_ids"] for o in outs] == want


def test_mixed_in_process_engine_equals_transformers(family: Family) -> None:
    from pdserve.entrypoints.engine import Engine

    prompts = [family.prompt(QUESTION, 1), family.prompt(QUESTION, 2)]
    image_data = [data_url(PICS[0]), [data_url(p) for p in PICS]]
    options = {"device": "cpu", "num_pages": 512, "page_size": 4}
    with Engine(str(family.path), in_process=True, **options) as engine:
        outs = engine.generate(prompts, GREEDY, image_data=image_data)
    assert [o["output_ids"] for o in outs] == [
        family.greedy(QUESTION, PICS[:1]),
        family.greedy(QUESTION, PICS),
    ]


def test_token_in_token_out_vlm_engine_example_equals_transformers(
    family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """The token-in/token-out VLM example with --in-process (a mixed worker), run as __main__
    in this process (a process of its own would spend ~10 s importing): the first image alone,
    then both, in one batch."""
    paths = []
    for k, pic in enumerate(PICS):
        paths += ["--image", str(tmp_path / f"image{k}.png")]
        pic.save(paths[-1])
    script = "token_in_token_out/token_in_token_out_vlm_engine.py"
    args = ["--model", str(family.path), "--device", "cpu", "--in-process", "--max-new-tokens",
            str(NUM_NEW), *paths]  # fmt: skip
    out = run_example_in_process(script, args, monkeypatch, capsys)
    got = [json.loads(ids) for ids in re.findall(r"Generated token ids: (\[.*\])", out)]
    assert got == [
        family.greedy("Describe this image.", PICS[:1]),
        family.greedy("What differs between these images?", PICS),
    ], out


@pytest.mark.parametrize("family", SERVER_EXAMPLES, indirect=True)  # the clusters above
def test_server_example_runs_against_the_cluster(family: Family) -> None:
    script = f"multimodal/{EXAMPLE_NAMES.get(family.name, family.name)}_server.py"
    out = run_example(script, "--base-url", family.cluster.url)
    for marker in ("Single image: '", "Two images: '", "/generate with image_data: '"):
        assert marker in out, out
    cached = [int(n) for n in re.findall(r"cached (\d+)", out)]
    assert cached[0] < cached[1], out  # the same image asked again: a prefix-cache hit
