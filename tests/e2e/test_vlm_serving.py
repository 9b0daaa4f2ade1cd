"""Qwen2-VL served end to end on CPU: images and videos through the OpenAI client (image_url and
video_url parts), `/generate` (`image_data`, `video_data`) and the Engine, prefill + decode over
tcp; greedy tokens equal transformers'; the prefix cache keyed by image; bad images and videos are
a 400 and the server goes on."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import json
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import _free_port
from pdserve.tiny_model.llava import build_tiny_llava_onevision
from pdserve.tiny_model.vlm import build_tiny_vlm
from tests.example_runner import run_example, run_example_in_process

sys.path.insert(0, str(Path(__file__).parents[1] / "multimodal"))
from vlm_reference import (  # noqa: E402 - the multimodal tests' reference helpers
    chat_prompt,
    data_url,
    hf_greedy,
    media_prompt,
    png_bytes,
    qwen_reference,
    random_frames,
    random_image,
    video_data_url,
)

pytestmark = pytest.mark.slow
NUM_NEW = 8
GREEDY = {"temperature": 0, "max_tokens": NUM_NEW, "extra_body": {"min_tokens": NUM_NEW}}


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_vl", seed=4)


@pytest.fixture(scope="module")
def reference(vlm_path: Path) -> Any:
    """(prompt text, images) -> transformers' greedy tokens."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(vlm_path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(vlm_path, dtype=torch.float32).eval()

    def greedy(text: str, images: list[Any]) -> list[int]:
        prompt = chat_prompt(tokenizer, text, len(images))
        return hf_greedy(vlm_path, model, tokenizer, prompt, images, NUM_NEW)

    greedy.tokenizer = tokenizer  # type: ignore[attr-defined]
    greedy.model = model  # type: ignore[attr-defined]
    return greedy


@pytest.fixture(scope="module")
def engine(vlm_path: Path) -> Iterator[Any]:
    """The Engine over a prefill + decode cluster (tcp); the HTTP tests use its router too."""
    import pdserve

    topology = Topology.for_model(
        str(vlm_path), mode="pd", kv_transfer="tcp", device="cpu", num_pages=1024, page_size=4
    )
    engine = pdserve.Engine(topology=topology, port=_free_port())
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine: Any) -> str:
    return engine.url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost none: refused from its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\0" * 16) + chunk(b"IEND", b"")


def images(seed: int, num: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [random_image(rng, 56 + 28 * (i % 2), 84 - 14 * i) for i in range(num)]


def image_parts(urls: list[str], text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}} for url in urls
    ]
    return parts + [{"type": "text", "text": text}]


def chat_ids(client: openai.OpenAI, urls: list[str], text: str, tokenizer: Any) -> Any:
    resp = client.chat.completions.create(
        model="qwen2_vl", messages=[{"role": "user", "content": image_parts(urls, text)}], **GREEDY
    )
    return resp


@pytest.mark.parametrize("num_images", [1, 2])
def test_openai_chat_with_images_equals_transformers(
    client: openai.OpenAI, reference: Any, tmp_path: Path, num_images: int
) -> None:
    pics = images(num_images, num_images)
    urls = [data_url(pics[0])]
    if num_images == 2:  # the second as a file:// path
        (tmp_path / "second.png").write_bytes(png_bytes(pics[1]))
        urls.append(f"file://{tmp_path / 'second.png'}")
    resp = chat_ids(client, urls, "What is in the pictures?", reference.tokenizer)
    expected = reference("What is in the pictures?", pics)
    assert resp.choices[0].message.content == reference.tokenizer.decode(
        expected, skip_special_tokens=True
    )
    assert resp.usage.completion_tokens == NUM_NEW


def test_generate_image_data_equals_transformers(url: str, reference: Any) -> None:
    pics = images(7, 2)
    prompt = chat_prompt(reference.tokenizer, "Compare them.", 2)
    raw_b64 = base64.b64encode(png_bytes(pics[1])).decode()
    body = {
        "text": [prompt, chat_prompt(reference.tokenizer, "Compare them.", 1)],
        "image_data": [[data_url(pics[0]), raw_b64], data_url(pics[1])],
        "sampling_params": {"max_new_tokens": NUM_NEW, "min_new_tokens": NUM_NEW, "temperature": 0},
    }
    out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert out[0]["output_ids"] == reference("Compare them.", pics)
    assert out[1]["output_ids"] == reference("Compare them.", pics[1:])


def test_same_image_is_a_cache_hit_and_a_different_image_is_not(
    client: openai.OpenAI, reference: Any
) -> None:
    first, other = images(11, 2)
    text = "The same question about the picture, long enough to fill pages."
    cold = chat_ids(client, [data_url(first)], text, reference.tokenizer)
    warm = chat_ids(client, [data_url(first)], text, reference.tokenizer)
    different = chat_ids(client, [data_url(other)], text, reference.tokenizer)
    prompt_len = cold.usage.prompt_tokens
    assert warm.usage.prompt_tokens_details.cached_tokens >= prompt_len - 4
    assert warm.choices[0].message.content == cold.choices[0].message.content
    # The template's first tokens (user turn, vision start) may hit; no image token may.
    assert different.usage.prompt_tokens_details.cached_tokens <= 4


def test_bad_images_are_a_400_naming_the_problem_and_the_server_keeps_serving(
    url: str, client: openai.OpenAI, reference: Any
) -> None:
    good = images(13, 1)[0]
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(good)[:100]).decode()
    not_image = "data:image/png;base64," + base64.b64encode(b"plain text, no pixels" * 4).decode()
    huge = "data:image/png;base64," + base64.b64encode(png_header(5000, 4000)).decode()
    cases = [
        (truncated, "truncated or corrupt"),
        (not_image, "is not an image"),
        (huge, "too many pixels"),
        ("http://127.0.0.1:9/unreachable.png", "could not fetch"),
    ]
    for image_url, problem in cases:
        with pytest.raises(openai.BadRequestError, match=problem):
            chat_ids(client, [image_url], "hi", reference.tokenizer)
    too_many = [data_url(good)] * 17
    with pytest.raises(openai.BadRequestError, match="17 images: expected at most 16"):
        chat_ids(client, too_many, "hi", reference.tokenizer)
    body = {"text": "no placeholder here", "image_data": data_url(good)}
    resp = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert resp.status_code == 400 and "0 image placeholders" in resp.text
    resp = httpx.post(f"{url}/generate", json={"text": "x", "image_data": 5}, timeout=30)
    assert resp.status_code == 400 and "image_data" in resp.text
    ok = chat_ids(client, [data_url(good)], "hi", reference.tokenizer)
    assert ok.choices[0].message.content == reference.tokenizer.decode(
        reference("hi", [good]), skip_special_tokens=True
    )


def test_engine_generate_with_image_data_equals_transformers(engine: Any, reference: Any) -> None:
    pics = images(17, 2)
    prompts = [
        chat_prompt(reference.tokenizer, "One picture.", 1),
        chat_prompt(reference.tokenizer, "Two pictures.", 2),
    ]
    params = {"max_new_tokens": NUM_NEW, "min_new_tokens": NUM_NEW, "temperature": 0}
    outs = engine.generate(
        prompts, params, image_data=[data_url(pics[0]), [data_url(p) for p in pics]]
    )
    assert outs[0]["output_ids"] == reference("One picture.", pics[:1])
    assert outs[1]["output_ids"] == reference("Two pictures.", pics)


def video_reference(
    vlm_path: Path, reference: Any, prompt: str, images: list, frames: list
) -> list[int]:
    return qwen_reference(
        vlm_path, reference.model, reference.tokenizer, prompt, images, frames, NUM_NEW
    )


def test_videos_through_chat_generate_and_the_engine_equal_transformers(
    client: openai.OpenAI, url: str, engine: Any, vlm_path: Path, reference: Any
) -> None:
    """A video file as a video_url part after an image; on /generate and the Engine, a file
    and a list of frames."""
    rng = np.random.default_rng()
    pic, clip, frames = (
        random_image(rng, 56, 84),
        random_frames(rng, 4, 56, 56),
        random_frames(rng, 2, 84, 56),
    )
    tokenizer = reference.tokenizer
    content = [
        {"type": "image_url", "image_url": {"url": data_url(pic)}},
        {"type": "video_url", "video_url": {"url": video_data_url(clip)}},
        {"type": "text", "text": "What happens?"},
    ]
    resp = client.chat.completions.create(
        model="qwen2_vl", messages=[{"role": "user", "content": content}], **GREEDY
    )
    prompt = media_prompt(tokenizer, "What happens?", ["image", "video"])
    expected = video_reference(vlm_path, reference, prompt, [pic], clip)
    assert resp.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    prompts = [
        media_prompt(tokenizer, "A clip.", ["video"]),
        media_prompt(tokenizer, "Frames.", ["video"]),
    ]
    video_data = [video_data_url(clip), [[data_url(f) for f in frames]]]
    params = {"max_new_tokens": NUM_NEW, "min_new_tokens": NUM_NEW, "temperature": 0}
    body = {"text": prompts, "video_data": video_data, "sampling_params": params}
    out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    want = [
        video_reference(vlm_path, reference, prompts[0], [], clip),
        video_reference(vlm_path, reference, prompts[1], [], frames),
    ]
    assert [o["output_ids"] for o in out] == want
    assert [
        o["output_ids"] for o in engine.generate(prompts, params, video_data=video_data)
    ] == want


def test_bad_videos_are_a_400_naming_the_problem_and_the_server_keeps_serving(
    url: str, client: openai.OpenAI, reference: Any
) -> None:
    rng = np.random.default_rng(31)
    frames = [data_url(f) for f in random_frames(rng, 2, 28, 28)]
    not_video = "data:video/mp4;base64," + base64.b64encode(b"no frames in here" * 8).decode()
    cases = [
        (not_video, "is not a video"),
        (
            "data:video/jpeg;base64," + ",".join(f.split(",", 1)[1] for f in frames * 17),
            "34 frames",
        ),
    ]
    for video_url, problem in cases:
        content = [
            {"type": "video_url", "video_url": {"url": video_url}},
            {"type": "text", "text": "hi"},
        ]
        with pytest.raises(openai.BadRequestError, match=problem):
            client.chat.completions.create(
                model="qwen2_vl", messages=[{"role": "user", "content": content}], **GREEDY
            )
    prompt = media_prompt(reference.tokenizer, "hi", ["video"])
    odd_sizes = [frames[0], data_url(random_image(rng, 56, 28))]
    for body, problem in [
        ({"text": prompt, "video_data": [odd_sizes]}, "frames of one video must have one size"),
        ({"text": "no placeholder", "video_data": [frames]}, "0 video placeholders"),
        ({"text": prompt, "video_data": 5}, "video_data"),
    ]:
        resp = httpx.post(f"{url}/generate", json=body, timeout=30)
        assert resp.status_code == 400 and problem in resp.text, resp.text
    good = images(37, 1)[0]
    ok = chat_ids(client, [data_url(good)], "hi", reference.tokenizer)
    assert ok.choices[0].message.content == reference.tokenizer.decode(
        reference("hi", [good]), skip_special_tokens=True
    )


def test_server_example_runs_against_the_cluster(url: str) -> None:
    out = run_example("multimodal/qwen2_vl_server.py", "--base-url", url)
    for marker in ("Single image: '", "Two images: '", "/generate with image_data: '"):
        assert marker in out, out
    cached = [int(n) for n in re.findall(r"cached (\d+)", out)]
    assert cached[0] < cached[1], out  # the same image asked again: a prefix-cache hit


def test_token_in_token_out_vlm_example_runs_against_the_cluster(url: str, vlm_path: Path) -> None:
    script = "token_in_token_out/token_in_token_out_vlm_server.py"
    out = run_example(script, "--base-url", url, "--model", str(vlm_path))
    input_ids = json.loads(re.search(r"Input: (\[.*\])", out).group(1))
    output_ids = json.loads(re.search(r"Generated token ids: (\[.*\])", out).group(1))
    num_prompt = int(re.search(r"Prompt tokens \(image tokens included\): (\d+)", out).group(1))
    assert len(output_ids) > 0 and num_prompt > len(input_ids)  # the placeholder was expanded


def test_offline_vlm_engine_example_serves_llava_onevision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Engine example on a tiny LLaVA-OneVision, one image then two: its texts equal
    transformers' greedy ones. It runs with --in-process as __main__ in this process with its
    command line, as the other Engine examples' tests run them (a process of its own would spend
    most of its time importing); served LLaVA-OneVision is test_vlm_families.py's."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from pdserve.multimodal.processor import ImageProcessor

    model_path = build_tiny_llava_onevision(tmp_path / "llava_ov", seed=8)
    pics = images(29, 2)
    paths = []
    for i, pic in enumerate(pics):
        paths.append(tmp_path / f"image{i}.png")
        paths[-1].write_bytes(png_bytes(pic))
    script = "engine/offline_batch_inference_vlm.py"
    args = ["--model", str(model_path), "--device", "cpu", "--in-process",
            "--image", str(paths[0]), "--image", str(paths[1])]  # fmt: skip
    out = run_example_in_process(script, args, monkeypatch, capsys)
    texts = [eval(t) for t in re.findall(r"Generated text: ('.*'|\".*\")", out)]  # noqa: S307
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    processor = ImageProcessor.for_model(model_path, tokenizer)
    expected = []
    for question, group in (("Describe this image.", pics[:1]), ("What differs between "
                            "these images?", pics)):  # fmt: skip
        loaded = processor.preprocess([data_url(p) for p in group])
        prompt = chat_prompt(tokenizer, question, len(group))
        ids = tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
        tiles = torch.from_numpy(loaded.pixel_values)
        tiles = tiles[None] if len(group) == 1 else tiles[:, None]
        input_ids = torch.tensor([ids])
        gen = hf.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=tiles,
            image_sizes=torch.tensor(loaded.image_sizes),
            batch_num_images=torch.tensor([len(group)]), max_new_tokens=16, do_sample=False,
        )  # fmt: skip
        expected.append(tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True))
    assert texts == expected, out


def test_streamed_chat_with_an_image_equals_the_whole_answer(
    client: openai.OpenAI, reference: Any
) -> None:
    pic = images(19, 1)[0]
    content = image_parts([data_url(pic)], "Stream it.")
    stream = client.chat.completions.create(
        model="qwen2_vl", messages=[{"role": "user", "content": content}], stream=True, **GREEDY
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    expected = reference("Stream it.", [pic])
    assert text == reference.tokenizer.decode(expected, skip_special_tokens=True)


class _SlowImage(http.server.BaseHTTPRequestHandler):
    """Serves one PNG after a delay: a slow image host."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        time.sleep(3.0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_slow_image_url_holds_up_no_other_request(client: openai.OpenAI, reference: Any) -> None:
    slow, quick = images(23, 2)
    _SlowImage.body = png_bytes(slow)
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowImage)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    slow_url = f"http://127.0.0.1:{host.server_address[1]}/slow.png"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat_ids, client, [slow_url], "Slow one.", reference.tokenizer)
            time.sleep(0.5)  # the slow fetch is under way
            started = time.monotonic()
            fast = chat_ids(client, [data_url(quick)], "Quick one.", reference.tokenizer)
            fast_s = time.monotonic() - started
            slow_resp = pending.result(timeout=60)
    finally:
        host.shutdown()
    assert fast_s < 2.0, f"the quick request waited {fast_s:.1f} s behind the slow fetch"
    assert fast.choices[0].message.content == reference.tokenizer.decode(
        reference("Quick one.", [quick]), skip_special_tokens=True
    )
    assert slow_resp.choices[0].message.content == reference.tokenizer.decode(
        reference("Slow one.", [slow]), skip_special_tokens=True
    )
