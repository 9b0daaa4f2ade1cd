"""Generated images and transformers' own greedy output for the tiny Qwen2-VL (the reference the
multimodal tests compare pdserve with)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_PAD = "<|image_pad|>"


def random_image(rng: np.random.Generator, height: int, width: int) -> Any:
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def chat_prompt(tokenizer: Any, text: str, num_images: int) -> str:
    """A user turn with `num_images` image parts before `text`, through the chat template."""
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def hf_greedy(
    model_path: Path, model: Any, tokenizer: Any, prompt: str, images: list[Any], num_new: int
) -> list[int]:
    """transformers' greedy tokens for `prompt` (one placeholder per image) and `images`: its
    image processor, the Qwen2-VL processor's placeholder expansion, `generate`."""
    from transformers import AutoImageProcessor

    inputs: dict[str, Any] = {"image_grid_thw": []}
    if images:
        processor = AutoImageProcessor.from_pretrained(model_path, backend="pil")
        inputs = processor(images=images, return_tensors="pt")
    pieces = prompt.split(IMAGE_PAD)
    assert len(pieces) == len(images) + 1
    text = pieces[0]
    for grid, piece in zip(inputs["image_grid_thw"], pieces[1:]):
        text += IMAGE_PAD * (int(grid.prod()) // 4) + piece
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == model.config.image_token_id).int(),
        **inputs if images else {},
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
    )
    return out[0, ids.shape[1] :].tolist()


# ---------------------------------------------------------------------- videos

VIDEO_PAD = "<|video_pad|>"


def random_frames(rng: np.random.Generator, num: int, height: int, width: int) -> list[Any]:
    return [random_image(rng, height, width) for _ in range(num)]


def video_file(frames: list[Any], fps: int = 2) -> bytes:
    """The frames as a QuickTime file of PNG frames (lossless: decoding gives them back)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return buf.getvalue()


def video_data_url(frames: list[Any], fps: int = 2) -> str:
    return "data:video/quicktime;base64," + base64.b64encode(video_file(frames, fps)).decode()


def normalized(frames: list[Any], mean: Any, std: Any) -> torch.Tensor:
    """[F, C, H, W] float32: rescaled by 1/255 and normalized, as the video processors do."""
    pixels = np.stack([np.asarray(f, dtype=np.float32).transpose(2, 0, 1) for f in frames]) / 255
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return torch.from_numpy(
        ((pixels - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    )


def qwen_video_inputs(
    frames: list[Any], mean: Any, std: Any, temporal: int = 2, patch: int = 14, merge: int = 2
) -> tuple[torch.Tensor, list[int]]:
    """(pixel_values_videos, video_grid_thw row) of transformers' Qwen2VLVideoProcessor for
    frames already at the size it resizes to (a multiple of 28 within the pixel bounds): its
    rescale, normalize and `patchify`, written out because that module imports torchvision."""
    video = normalized(frames, mean, std)[None]  # [1, F, C, H, W]
    if pad := -video.shape[1] % temporal:
        video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    _, num_frames, channels, height, width = video.shape
    gt, gh, gw = num_frames // temporal, height // patch, width // patch
    patches = video.view(
        1, gt, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch
    ).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, channels * temporal * patch * patch), [gt, gh, gw]


def hf_generate(model: Any, ids: list[int], num_new: int, **inputs: Any) -> list[int]:
    """transformers' greedy tokens for prompt ids and processor outputs `inputs`."""
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **inputs,
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
    )
    return out[0, len(ids) :].tolist()


def qwen_mm_token_types(ids: list[int], config: Any) -> torch.Tensor:
    """transformers' mm_token_type_ids: text 0, image 1, video 2."""
    input_ids = torch.tensor([ids])
    return (input_ids == config.image_token_id).int() + 2 * (
        input_ids == config.video_token_id
    ).int()


def qwen_expand(
    tokenizer: Any, prompt: str, image_grids: list[Any], video_grids: list[Any]
) -> list[int]:
    """The Qwen2-VL processor's placeholder expansion (t * h * w / 4 pads each), tokenized."""
    for pad, grids, mark in ((IMAGE_PAD, image_grids, "\0i"), (VIDEO_PAD, video_grids, "\0v")):
        pieces = prompt.split(pad)
        assert len(pieces) == len(grids) + 1
        prompt = pieces[0] + "".join(
            mark * (int(np.prod(g)) // 4) + p for g, p in zip(grids, pieces[1:])
        )
    prompt = prompt.replace("\0i", IMAGE_PAD).replace("\0v", VIDEO_PAD)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def media_prompt(tokenizer: Any, text: str, kinds: list[str]) -> str:
    """A user turn with parts of `kinds` ("image", "video") before `text`."""
    parts = [{"type": k} for k in kinds] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def qwen_reference(
    path: Path,
    model: Any,
    tokenizer: Any,
    prompt: str,
    images: list[Any],
    frames: list[Any],
    num_new: int,
    **extra: Any,
) -> list[int]:
    """transformers' greedy tokens: its image processor for the image, the video processor's
    steps for the frames, the Qwen2-VL processor's expansion, `generate`."""
    from transformers import AutoImageProcessor

    inputs: dict[str, Any] = dict(extra)
    image_grids: list[Any] = []
    if images:
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        inputs.update(processor(images=images, return_tensors="pt"))
        image_grids = inputs["image_grid_thw"].tolist()
    from pdserve.tiny_model.vlm import IMAGE_MEAN, IMAGE_STD

    inputs["pixel_values_videos"], grid = qwen_video_inputs(frames, IMAGE_MEAN, IMAGE_STD)
    inputs["video_grid_thw"] = torch.tensor([grid])
    ids = qwen_expand(tokenizer, prompt, image_grids, [grid])
    types = qwen_mm_token_types(ids, model.config)
    return hf_generate(model, ids, num_new, mm_token_type_ids=types, **inputs)


def image_requests(
    model: Path, seed: int, sampling: Any, question: str, sizes: list[list[tuple[int, int]]]
) -> list[Any]:
    """Requests `r0..` of a chat turn each, with random images of `sizes[k]` (an empty list:
    text only) and `question` numbered, their placeholders expanded as the tokenizer process
    does and their MultimodalInputs attached."""
    from transformers import AutoTokenizer

    from pdserve.multimodal.processor import ImageProcessor
    from pdserve.scheduler.request import Request

    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = ImageProcessor.for_model(model, tokenizer)
    assert processor is not None
    rng = np.random.default_rng(seed)
    reqs = []
    for k, shapes in enumerate(sizes):
        parts: list[dict[str, Any]] = [{"type": "image"}] * len(shapes)
        parts.append({"type": "text", "text": f"{question} {k}"})
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
        )
        if not shapes:
            reqs.append(
                Request(f"r{k}", tokenizer.encode(text, add_special_tokens=False), sampling)
            )
            continue
        loaded = processor.preprocess([data_url(random_image(rng, h, w)) for h, w in shapes])
        ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
        req = Request(f"r{k}", ids, sampling)
        req.mm = processor.inputs(ids, loaded)
        reqs.append(req)
    return reqs


def run_to_end(core: Any, reqs: list[Any], max_steps: int = 500) -> list[list[int]]:
    """Add the requests to a WorkerCore and step it until they end (none aborted): their ids."""
    for req in reqs:
        core.add(req)
    for _ in range(max_steps):
        if not core.has_work():
            break
        core.step()
    assert all(r.finish is not None and not r.finish.is_abort for r in reqs)
    return [r.output_ids for r in reqs]
