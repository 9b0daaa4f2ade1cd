"""Videos on the tiny Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision against transformers: greedy tokens
for a short video (as a file and as a list of frames), a video beside an image, chunked prefill;
M-RoPE positions of videos (Qwen2.5-VL's time interval included) against `get_rope_index`;
loading within limits (PyAV decoding, sampling, refusals) and the prefix-cache key of video
tokens. transformers' video processors need torchvision: the reference inputs are built here
by their own steps (rescale, normalize, patchify) from the same frames."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vlm_reference import (
    data_url,
    hf_generate,
    media_prompt,
    normalized,
    png_bytes,
    qwen_mm_token_types,
    qwen_reference,
    random_frames,
    random_image,
    video_data_url,
    video_file,
)

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.cache_key import IMAGE_KEY_BASE, image_keyed_ids
from pdserve.multimodal.mrope import mrope_positions, time_intervals
from pdserve.multimodal.processor import ImageProcessor
from pdserve.multimodal.video_loader import VideoLimits, decode_video, fps_indices, load_video
from pdserve.scheduler.request import Request
from pdserve.tiny_model.llava import MEAN, STD, build_tiny_llava_onevision
from pdserve.tiny_model.vlm import build_tiny_vlm
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 8


def make_core(path: Path, chunk_size: int = 4096, overlap: bool = False) -> WorkerCore:
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=chunk_size)
    config = EngineConfig(model_path=str(path), device="cpu", dtype="float32", scheduler=sched)
    return WorkerCore(config, overlap=overlap)


def run_ours(
    core: WorkerCore, processor: Any, tokenizer: Any, prompt: str, images: list, videos: list
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) through the tokenizer side (`preprocess_media`) and a worker."""
    loaded = processor.preprocess_media([data_url(im) for im in images], videos)
    ids = tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0.0)
    req = Request(rid=f"video-{len(ids)}-{len(videos)}", prompt_ids=ids, sampling=sampling)
    req.mm = processor.inputs(ids, loaded)
    core.add(req)
    while not req.is_finished:
        core.step()
    return ids, req.output_ids


# ---------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen_processor(tiny_vlm: Path, vlm_tokenizer: Any) -> Any:
    return ImageProcessor.for_model(tiny_vlm, vlm_tokenizer)


@pytest.mark.parametrize(
    ("kinds", "num_frames", "form", "chunk_size"),
    [
        (["video"], 4, "file", 4096),
        (["image", "video"], 4, "frames", 7),
        (["video", "image"], 3, "file", 4096),  # an odd frame count: the last frame repeated
    ],
    ids=["video-file", "image-then-frames-chunked", "odd-frames-then-image"],
)
def test_qwen2_vl_video_greedy_tokens_equal_transformers(
    tiny_vlm: Path,
    hf_vlm: Any,
    vlm_tokenizer: Any,
    qwen_processor: Any,
    kinds: list[str],
    num_frames: int,
    form: str,
    chunk_size: int,
) -> None:
    rng = np.random.default_rng()  # fresh frames each run
    frames = random_frames(rng, num_frames, 56, 84)
    images = [random_image(rng, 84, 56)] if "image" in kinds else []
    video = video_data_url(frames) if form == "file" else [data_url(f) for f in frames]
    prompt = media_prompt(vlm_tokenizer, "What happens in the video?", kinds)
    expected = qwen_reference(tiny_vlm, hf_vlm, vlm_tokenizer, prompt, images, frames, NUM_NEW)
    core = make_core(tiny_vlm, chunk_size)
    _, ours = run_ours(core, qwen_processor, vlm_tokenizer, prompt, images, [video])
    assert ours == expected


def test_qwen2_5_vl_video_time_positions_equal_transformers(tmp_path: Path) -> None:
    """A 2 fps file: each pair of frames spans one second, tokens_per_second=2 puts the pairs
    2 positions apart on the temporal axis (transformers' second_per_grid_ts)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = build_tiny_vlm(tmp_path / "qwen2_5_vl", seed=6, arch="qwen2_5_vl")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    frames = random_frames(np.random.default_rng(), 6, 56, 56)
    prompt = media_prompt(tokenizer, "What happens?", ["video"])
    seconds = torch.tensor([1.0])  # temporal_patch_size 2 / 2 fps
    expected = qwen_reference(
        path, hf, tokenizer, prompt, [], frames, NUM_NEW, second_per_grid_ts=seconds
    )
    processor = ImageProcessor.for_model(path, tokenizer)
    ids, ours = run_ours(
        make_core(path), processor, tokenizer, prompt, [], [video_data_url(frames)]
    )
    assert ours == expected
    mm = processor.inputs(ids, processor.preprocess_media([], [video_data_url(frames)]))
    assert mm.second_per_grid_ts == [1.0] and mm.is_video == [True]


@pytest.mark.parametrize("seed", range(4))
def test_mrope_positions_with_videos_match_transformers_rope_index(
    tmp_path: Path, seed: int
) -> None:
    from transformers import AutoConfig, Qwen2_5_VLModel

    path = build_tiny_vlm(tmp_path / "qwen2_5_vl", seed=1, arch="qwen2_5_vl")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    rng = np.random.default_rng(seed)
    image_id, video_id = config.image_token_id, config.video_token_id
    ids: list[int] = []
    grids, is_video, seconds = [], [], []
    for _ in range(int(rng.integers(1, 5))):
        ids += rng.integers(0, 500, int(rng.integers(1, 6))).tolist()
        video = bool(rng.integers(0, 2))
        grid = [
            int(rng.integers(1, 5)) if video else 1,
            2 * int(rng.integers(1, 4)),
            2 * int(rng.integers(1, 4)),
        ]
        grids.append(grid)
        is_video.append(video)
        seconds.append(float(rng.choice([0.5, 1 / 12, 2 / 3, 1.0])) if video else 0.0)
        ids += [video_id if video else image_id] * (grid[0] * grid[1] * grid[2] // 4)
    ids += rng.integers(0, 500, int(rng.integers(1, 6))).tolist()
    intervals = time_intervals(is_video, seconds, config.vision_config.tokens_per_second)
    ours = mrope_positions(ids, image_id, grids, 2, video_id, intervals)
    images = [g for g, v in zip(grids, is_video) if not v]
    videos = [g for g, v in zip(grids, is_video) if v]
    theirs, delta = model.get_rope_index(
        torch.tensor([ids]),
        qwen_mm_token_types(ids, config),
        torch.tensor(images) if images else None,
        torch.tensor(videos) if videos else None,
        second_per_grid_ts=torch.tensor([s for s, v in zip(seconds, is_video) if v]),
    )
    np.testing.assert_array_equal(ours.positions, theirs[:, 0].numpy())
    assert ours.delta == int(delta)


# ---------------------------------------------------------------------- LLaVA-OneVision


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava_video") / "ov", seed=11)


@pytest.mark.parametrize(
    ("kinds", "form", "chunk_size"),
    [(["video"], "file", 4096), (["image", "video"], "frames", 7)],
    ids=["video-file", "image-then-frames-chunked"],
)
def test_llava_onevision_video_greedy_tokens_equal_transformers(
    tiny_llava: Path, kinds: list[str], form: str, chunk_size: int
) -> None:
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaOnevisionForConditionalGeneration,
    )

    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    rng = np.random.default_rng()
    frames = random_frames(rng, 4, 28, 28)  # the tile's size: the processor does not resize
    images = [random_image(rng, 40, 70)] if "image" in kinds else []
    video = video_data_url(frames) if form == "file" else [data_url(f) for f in frames]
    prompt = media_prompt(tokenizer, "What happens?", kinds)
    processor = ImageProcessor.for_model(tiny_llava, tokenizer)
    ids, ours = run_ours(
        make_core(tiny_llava, chunk_size), processor, tokenizer, prompt, images, [video]
    )
    inputs: dict[str, Any] = {"pixel_values_videos": normalized(frames, MEAN, STD)[None]}
    if images:
        hf_images = AutoImageProcessor.from_pretrained(tiny_llava, backend="pil")
        inputs.update(hf_images(images=images, return_tensors="pt"))
        inputs["batch_num_images"] = torch.tensor([1])
    # transformers checks the prompt's video tokens against the pooled features' rows
    assert ours == hf_generate(hf.eval(), ids, NUM_NEW, **inputs)


# ---------------------------------------------------------------------- loading and keys


def test_a_video_file_decodes_to_its_frames_and_long_ones_are_sampled() -> None:
    frames = random_frames(np.random.default_rng(1), 10, 32, 48)
    video = decode_video(video_file(frames, fps=5), VideoLimits())
    assert [np.asarray(f).tolist() for f in video.frames] == [
        np.asarray(f).tolist() for f in frames
    ]
    assert video.fps == 5.0
    sampled = decode_video(video_file(frames, fps=5), VideoLimits(max_frames=4))
    kept = [0, 2, 5, 7]  # transformers' uniform indices: arange(0, 10, 2.5)
    assert [np.asarray(f).tolist() for f in sampled.frames] == [
        np.asarray(frames[i]).tolist() for i in kept
    ]
    assert sampled.fps == pytest.approx(5.0 * 4 / 10)


def test_sample_fps_keeps_the_frames_its_rate_gives() -> None:
    """Qwen2-VL's recipe (vLLM's and SGLang's): 12 frames at 4 fps are 3 s, 6 frames at 2 fps,
    spread from the first frame to the last; lossless frames, so exactly those come back."""
    frames = random_frames(np.random.default_rng(3), 12, 28, 28)
    video = decode_video(video_file(frames, fps=4), VideoLimits(sample_fps=2.0))
    kept = [0, 2, 4, 7, 9, 11]  # round(linspace(0, 11, 6))
    assert [np.asarray(f).tolist() for f in video.frames] == [
        np.asarray(frames[i]).tolist() for i in kept
    ]
    assert video.fps == pytest.approx(2.0)
    short = decode_video(video_file(frames[:5], fps=4), VideoLimits(sample_fps=0.5))
    assert len(short.frames) == 4  # at least 4 frames, however short the file
    with pytest.raises(ValueError, match="sample_fps=-1.0 is invalid"):
        VideoLimits(sample_fps=-1.0)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 3000),
    file_fps=st.floats(1.0, 60.0),
    sample_fps=st.floats(0.25, 8.0),
    max_frames=st.integers(1, 64),
)
def test_fps_indices_against_their_definition(
    total: int, file_fps: float, sample_fps: float, max_frames: int
) -> None:
    got = fps_indices(total, file_fps, sample_fps, max_frames).tolist()
    most = min(max_frames, total)
    assert got == sorted(set(got)) and got[0] == 0 and got[-1] == (total - 1 if len(got) > 1 else 0)
    if most <= 4:  # a short file (or a low limit): every frame it may keep
        assert len(got) == most
        return
    wanted = min(max(total / file_fps * sample_fps, 4), most)  # the rate's count, bounded
    assert len(got) % 2 == 0 and 4 <= len(got) <= most and abs(len(got) - wanted) <= 1


def test_frames_come_as_a_list_or_as_vllms_jpeg_data_url() -> None:
    frames = random_frames(np.random.default_rng(2), 3, 28, 28)
    as_list = load_video([data_url(f) for f in frames], VideoLimits())
    payload = ",".join(base64.b64encode(png_bytes(f)).decode() for f in frames)
    as_url = load_video("data:video/jpeg;base64," + payload, VideoLimits())
    for video in (as_list, as_url):
        assert [np.asarray(f).tolist() for f in video.frames] == [
            np.asarray(f).tolist() for f in frames
        ]
        assert video.fps is None


@pytest.mark.parametrize(
    ("make", "limits", "problem"),
    [
        (
            lambda f: [data_url(x) for x in f] * 3,
            VideoLimits(max_frames=8),
            "12 frames: expected 1 to 8",
        ),
        (lambda f: video_data_url(f), VideoLimits(max_video_pixels=3 * 28 * 28), "too many pixels"),
        (
            lambda f: [data_url(f[0]), data_url(random_image(np.random.default_rng(), 56, 28))],
            VideoLimits(),
            "one size",
        ),
        (
            lambda f: (
                "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 9).decode()
            ),
            VideoLimits(),
            "is not a video",
        ),
        (lambda f: [], VideoLimits(), "0 frames"),
        (lambda f: 5, VideoLimits(), "expected a URL"),
    ],
    ids=[
        "too-many-frames",
        "too-many-pixels",
        "frames-of-two-sizes",
        "not-a-video",
        "no-frames",
        "not-a-source",
    ],
)
def test_bad_videos_are_refused_naming_the_problem(
    make: Any, limits: VideoLimits, problem: str
) -> None:
    frames = random_frames(np.random.default_rng(3), 4, 28, 28)
    with pytest.raises(ValueError, match=problem):
        load_video(make(frames), limits, "video 0")


def test_a_model_without_video_refuses_it_and_too_many_videos_are_refused(
    qwen_processor: Any, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from pdserve.tiny_model.llava import build_tiny_llava_next

    frames = [data_url(f) for f in random_frames(np.random.default_rng(4), 2, 28, 28)]
    with pytest.raises(ValueError, match="5 videos: expected at most 4"):
        qwen_processor.preprocess_media([], [frames] * 5)
    path = build_tiny_llava_next(tmp_path / "next", seed=1)
    next_processor = ImageProcessor.for_model(path, AutoTokenizer.from_pretrained(path))
    with pytest.raises(ValueError, match="takes no video"):
        next_processor.preprocess_media([], [frames])


def test_cache_key_replaces_video_tokens_by_the_videos_hash(
    qwen_processor: Any, vlm_tokenizer: Any
) -> None:
    rng = np.random.default_rng(5)
    video, other = ([data_url(f) for f in random_frames(rng, 2, 56, 56)] for _ in range(2))
    image = random_image(rng, 56, 56)
    prompt = media_prompt(vlm_tokenizer, "Same words.", ["video", "image"])
    keys = []
    for frames in (video, video, other):
        loaded = qwen_processor.preprocess_media([data_url(image)], [frames])
        ids = vlm_tokenizer.encode(qwen_processor.expand(prompt, loaded), add_special_tokens=False)
        mm = qwen_processor.inputs(ids, loaded)
        keys.append(image_keyed_ids(ids, mm))
    assert keys[0] == keys[1] and keys[0] != keys[2]
    differ = [i for i, (a, b) in enumerate(zip(keys[0], keys[2])) if a != b]
    assert {ids[i] for i in differ} == {mm.video_token_id}  # only the video's tokens differ
    assert sum(1 for k in keys[0] if k >= IMAGE_KEY_BASE) == sum(mm.num_image_tokens)


def test_a_checkpoints_video_preprocessor_config_bounds_the_frames(
    tiny_vlm: Path, vlm_tokenizer: Any, tmp_path: Path
) -> None:
    import json
    import shutil

    path = Path(shutil.copytree(tiny_vlm, tmp_path / "with_video_config"))
    frames = [data_url(f) for f in random_frames(np.random.default_rng(6), 2, 112, 112)]
    default = ImageProcessor.for_model(path, vlm_tokenizer).preprocess_media([], [frames])
    (path / "video_preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 56 * 56, "max_pixels": 56 * 56})
    )
    bounded = ImageProcessor.for_model(path, vlm_tokenizer).preprocess_media([], [frames])
    assert default.videos.grid_thw == [[1, 8, 8]] and bounded.videos.grid_thw == [[1, 4, 4]]


def test_token_ids_take_one_video_placeholder_or_the_expanded_ones(
    qwen_processor: Any, vlm_tokenizer: Any
) -> None:
    frames = [data_url(f) for f in random_frames(np.random.default_rng(7), 4, 56, 56)]
    loaded = qwen_processor.preprocess_media([], [frames])
    video_id = qwen_processor.video_token_id
    expanded = qwen_processor.expand_ids([1, video_id, 2], loaded)
    assert expanded == [1] + [video_id] * loaded.videos.num_tokens[0] + [2]
    assert qwen_processor.expand_ids(expanded, loaded) == expanded
    with pytest.raises(ValueError, match="2 video tokens"):
        qwen_processor.expand_ids([video_id, video_id], loaded)
    mm = qwen_processor.inputs(expanded, loaded)
    assert mm.image_grid_thw == [[2, 4, 4]] and mm.num_image_tokens == [8]
