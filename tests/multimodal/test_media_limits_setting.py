"""The per-request image and video limits as settings: the topology's `tokenizer.image_limits` and
`video_limits` (unknown keys and bad values refused naming them), vLLM's `--limit-mm-per-prompt`
on `pdserve launch --model`, and the tokenizer process enforcing what it was given (a request over
a limit is a ValueError naming the limit, as the defaults' are)."""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.topology import Topology
from pdserve.config.topology_sections import TokenizerConfig
from pdserve.entrypoints.launch_cli import _with_media_counts, add_launch_parser
from pdserve.tokenizer_proc.tokenizer_process import _load_core


def png(seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color=(seed * 40 % 256, 80, 120)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"image_limits": {"max_imgs": 1}}, r"image_limits: unknown key\(s\) \['max_imgs'\]"),
        ({"image_limits": {"max_images": 0}}, r"image_limits.max_images=0 is invalid"),
        ({"video_limits": {"max_frames": 2.5}}, r"video_limits.max_frames=2.5 is invalid"),
        ({"video_limits": {"fetch_timeout_s": "x"}}, r"video_limits.fetch_timeout_s='x'"),
        ({"image_limits": [1]}, r"image_limits=\[1\] is invalid: expected a mapping"),
    ],
)
def test_bad_limits_are_refused_naming_them(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**section)


def test_the_topology_keeps_them_and_the_flag_sets_the_counts(tiny_vlm: Path) -> None:
    limits = {"image_limits": {"max_images": 3, "fetch_timeout_s": 2.5}}
    topology = Topology.for_model(str(tiny_vlm), mode="mixed", device="cpu", tokenizer=limits)
    assert topology.tokenizer.image_limits.max_images == 3
    assert topology.tokenizer.image_limits.fetch_timeout_s == 2.5
    assert topology.tokenizer.video_limits.max_videos == 4  # the default stays
    assert Topology.from_dict(topology.to_dict(redact=False)) == topology
    parser = argparse.ArgumentParser()
    add_launch_parser(parser.add_subparsers())
    flag = ["launch", "--model", str(tiny_vlm), "--limit-mm-per-prompt", '{"image": 2, "video": 1}']
    counts = parser.parse_args(flag).limit_mm_per_prompt
    changed = _with_media_counts(topology, counts)
    assert changed.tokenizer.image_limits.max_images == 2
    assert changed.tokenizer.image_limits.fetch_timeout_s == 2.5  # the rest kept
    assert changed.tokenizer.video_limits.max_videos == 1
    for bad in ('{"audio": 1}', '{"image": 0}', "image=2", "{}"):
        with pytest.raises(SystemExit):
            parser.parse_args([*flag[:3], "--limit-mm-per-prompt", bad])


def test_the_tokenizer_enforces_the_limits_it_was_given(tiny_vlm: Path) -> None:
    spec = TokenizerSpec(name="t", idx=0, model_path=str(tiny_vlm), inbox="ipc://unused",
                         router_inbox="ipc://unused", worker_inboxes=(), max_context_len=0,
                         image_limits={"max_images": 1, "max_image_pixels": 28 * 28,
                                       "max_image_bytes": 2**20, "fetch_timeout_s": 1.0},
                         video_limits={"max_videos": 1, "max_frames": 4,
                                       "max_video_pixels": 10**6, "max_video_bytes": 2**20,
                                       "fetch_timeout_s": 1.0})  # fmt: skip
    core = _load_core(spec)
    assert core.images is not None
    assert len(core.images.preprocess_media([png(1)], None).grid_thw) == 1
    with pytest.raises(ValueError, match="the request has 2 images: expected at most 1"):
        core.images.preprocess_media([png(1), png(2)], None)
    assert core.images.video_limits.max_frames == 4
    default = _load_core(TokenizerSpec(**{**spec.to_dict(), "image_limits": None}))
    assert default.images is not None and default.images.limits.max_images == 16
