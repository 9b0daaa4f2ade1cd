"""A vision-language model served by a tensor-parallel mixed worker (tp 2 on CPU, gloo) in the real
process tree: images through the openai client and through /generate give the greedy tokens of a
tp 1 in-process Engine on the same tiny Qwen2-VL and the same images (rank 0 runs the vision
tower; the decoder is split across the ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port
from pdserve.tiny_model.vlm import build_tiny_vlm

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "temperature": 0}


def _png(seed: int, height: int, width: int) -> str:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tp_vlm_cluster") / "qwen2_vl", seed=4)


@pytest.fixture(scope="module")
def cluster(model: Path) -> Iterator[Cluster]:
    topology = Topology.for_model(
        str(model), mode="mixed", device="cpu", port=_free_port(), num_pages=256, page_size=4,
        tp_size=2,
    )  # fmt: skip
    cluster = Cluster(topology, log_level="error", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=5)


def test_images_at_tp2_equal_a_tp1_engine(cluster: Cluster, model: Path) -> None:
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh pixels each run
    images = [_png(seed, 40, 60), _png(seed + 1, 30, 50)]
    tokenizer = AutoTokenizer.from_pretrained(model)
    parts = [{"type": "image"}] * 2 + [{"type": "text", "text": "Compare them."}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    with Engine(str(model), in_process=True, device="cpu") as engine:
        want = engine.generate(prompt, GREEDY, image_data=images)["output_ids"]
    body = {"text": prompt, "image_data": images, "sampling_params": GREEDY}
    got = httpx.post(f"{cluster.url}/generate", json=body, timeout=120).json()
    assert got["output_ids"] == want, seed
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": "Compare them."})
    resp = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=6, extra_body={"min_tokens": 6},
    )  # fmt: skip
    assert resp.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
