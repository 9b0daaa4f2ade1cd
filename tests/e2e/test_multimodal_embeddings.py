"""gme-Qwen2-VL style multimodal embeddings through a prefill + decode cluster (tcp) of the tiny
Qwen2-VL served as an embedding model: `/v1/embeddings` items of text, an image, or both equal
transformers' (gme's prompt, the final hidden state of its last token, L2-normalized); bad items
are a 400 naming the field; examples/multimodal_embedding.py runs against the cluster."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from e2e_clusters import start_cluster

from pdserve.entrypoints.launch import Cluster
from pdserve.tiny_model.vlm import build_tiny_vlm

sys.path.insert(0, str(Path(__file__).parents[1] / "multimodal"))
from vlm_reference import IMAGE_PAD, data_url, random_image  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-4
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multimodal_embedding.py"
_RNG = np.random.default_rng(8)
PICS = [random_image(_RNG, 56, 84), random_image(_RNG, 84, 56)]


@pytest.fixture(scope="module")
def gme_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("gme") / "gme_qwen2_vl", seed=6)


@pytest.fixture(scope="module")
def cluster(gme_dir: Path) -> Iterator[Cluster]:
    cluster = start_cluster(gme_dir, "pd", kv_transfer="tcp", is_embedding=True)
    yield cluster
    cluster.stop(grace_s=1)


def gme_prompt(text: str | None, has_image: bool) -> str:
    """gme's own inference code's prompt (gme_inference.py), default instruction."""
    content = ("<|vision_start|>" + IMAGE_PAD + "<|vision_end|>" if has_image else "") + (
        text or ""
    )
    return (
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    )


@pytest.fixture(scope="module")
def reference(gme_dir: Path) -> Any:
    """(text, image) -> transformers' embedding (float64, unit) and the prompt's length."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(gme_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(gme_dir, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(gme_dir, backend="pil")

    def embed(text: str | None, image: Any) -> tuple[torch.Tensor, int]:
        prompt, inputs = gme_prompt(text, image is not None), {}
        if image is not None:
            inputs = dict(processor(images=[image], return_tensors="pt"))
            num_pads = int(inputs["image_grid_thw"][0].prod()) // 4  # merge 2 x 2
            prompt = prompt.replace(IMAGE_PAD, IMAGE_PAD * num_pads)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                mm_token_type_ids=(ids == model.config.image_token_id).int(), **inputs,
            )  # fmt: skip
        last = out.hidden_states[-1][0, -1].double()  # the final norm's output, last token
        return last / last.norm(), ids.shape[1]

    return embed


def post(cluster: Cluster, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/embeddings", json=body, timeout=60)


def test_text_image_and_both_equal_transformers(
    cluster: Cluster, gme_dir: Path, reference: Any
) -> None:
    text = "A picture of random noise."
    items = [
        ({"text": text}, (text, None)),
        ({"image": data_url(PICS[0])}, (None, PICS[0])),
        ({"text": text, "image": data_url(PICS[1])}, (text, PICS[1])),
    ]
    want = [reference(*args) for _, args in items]
    for _ in range(2):  # the second time the prompts (and images) hit the prefix cache
        resp = post(cluster, {"model": gme_dir.name, "input": [item for item, _ in items]})
        assert resp.status_code == 200, resp.text
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
        got = torch.tensor([d["embedding"] for d in data], dtype=torch.float64)
        torch.testing.assert_close(got, torch.stack([v for v, _ in want]), atol=TOL, rtol=0)
    assert resp.json()["usage"]["prompt_tokens"] == sum(n for _, n in want)
    # The image changes the vector: a different image, a different embedding.
    assert float(got[1] @ reference(None, PICS[1])[0]) < 0.999


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ({"image": 5}, "input[0].image must be a non-empty string"),
        ({"text": ["a"]}, "input[0].text must be a string"),
        ({"audio": "x"}, "input[0] has unknown field(s) ['audio']"),
        ({}, "input[0] needs 'text', 'image' or both"),
        ({"image": "data:image/png;base64,AAAA"}, "image"),
    ],
)
def test_bad_items_are_a_400_naming_the_field(
    cluster: Cluster, item: dict[str, Any], problem: str
) -> None:
    resp = post(cluster, {"input": [item]})
    assert resp.status_code == 400, resp.text
    assert problem in resp.json()["error"]["message"]


def test_a_list_mixing_strings_and_items_is_a_400(cluster: Cluster) -> None:
    resp = post(cluster, {"input": ["plain text", {"text": "an item"}]})
    assert resp.status_code == 400 and "input" in resp.text, resp.text


def test_multimodal_embedding_example_runs_against_the_cluster(cluster: Cluster) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--base-url", cluster.url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("text", "image", "text + image"):
        assert f"Embedding of {name}: 64 values" in proc.stdout, proc.stdout
    assert "norms [1.0, 1.0, 1.0]" in proc.stdout, proc.stdout
