"""Image requests on one GPU (issue 14): a random-weight Qwen2-VL at Qwen2-VL-2B-Instruct's shape
served prefill + decode on the same GPU (cuda_ipc), loaded with chat requests of 1 and of 4
images each; requests and images per second, TTFT and end-to-end latency.

1. Writes the checkpoint as a Hugging Face directory (reused when complete): the published
   config.json (28 layers of 1536, a 32-block 1280-wide vision tower, M-RoPE), Qwen2-VL's
   preprocessor config, the padded tiny tokenizer of `random_checkpoint.py` plus the vision
   tokens and a chat template that renders image parts, bf16 weights (std 0.02) under the
   published names.
2. Starts the cluster (`pdserve.entrypoints.launch.Cluster`) and, for each images-per-request
   count, streams `--requests` chat completions at `--concurrency`, every image distinct (no
   prefix-cache or encoder-cache hits), `--output-len` tokens each (min_tokens, greedy).

Prints a table last; writes vlm_bench.json and vlm_bench.md under $OUT (or --out-dir).
`--smoke`: the same at tiny shapes on the CPU (tcp), in seconds.

    python benchmarks/gpu/vlm_bench.py [--requests 256] [--concurrency 32] [--image-size 448]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# The cluster's processes import pdserve from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import httpx  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str  # a key of CONFIGS
    device: str
    dtype: str
    num_requests: int  # per images-per-request count
    concurrency: int
    images_per_request: tuple[int, ...]
    image_size: int  # square images of this many pixels a side
    output_len: int
    num_pages: int | None
    page_size: int
    mem_fraction: float = 0.4  # each worker's share of the free memory it sees at start


FULL = Plan(
    model="qwen2-vl-2b", device="cuda", dtype="bfloat16", num_requests=256, concurrency=32, images_per_request=(1, 4),
    image_size=448, output_len=16, num_pages=None, page_size=16,
)  # fmt: skip
SMOKE = Plan(
    model="smoke", device="cpu", dtype="float32", num_requests=6, concurrency=3, images_per_request=(1, 4),
    image_size=56, output_len=4, num_pages=1024, page_size=4,
)  # fmt: skip

# ---------------------------------------------------------------------------- the checkpoint

QWEN2_VL_2B: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 28, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
    "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "hidden_act": "quick_gelu",
        "mlp_ratio": 4, "num_heads": 16, "in_channels": 3, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}  # fmt: skip
# The smoke test's stand-in: the same writer, tiny shapes (head_dim 16: 8 rotary frequencies).
SMOKE_CONFIG: dict[str, Any] = {
    **QWEN2_VL_2B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2,
    "vocab_size": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {**QWEN2_VL_2B["vision_config"], "depth": 2, "embed_dim": 32,
                      "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2},
}  # fmt: skip
CONFIGS = {"qwen2-vl-2b": QWEN2_VL_2B, "smoke": SMOKE_CONFIG}


def write_checkpoint(hf_config: dict[str, Any], out: Path, device: str) -> Path:
    """A random Qwen2-VL directory of `hf_config`'s shape at `out` (reused when complete)."""
    import random_checkpoint as rc

    from pdserve.tiny_model.vlm import IMAGE_MEAN, IMAGE_STD, VISION_TOKENS

    marker = out / "vlm_checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()).get("config") == hf_config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    max_len = hf_config["max_position_embeddings"]
    vocab_size = hf_config["vocab_size"]
    special = rc.write_padded_tokenizer(out, vocab_size - len(VISION_TOKENS), max_len)
    vision_ids = _add_vision_tokens(out)
    config = {**hf_config, **special, "image_token_id": vision_ids["<|image_pad|>"],
              "video_token_id": vision_ids["<|video_pad|>"],
              "vision_start_token_id": vision_ids["<|vision_start|>"],
              "vision_end_token_id": vision_ids["<|vision_end|>"]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, **special}))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2,
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    rc._write_shards(_published_shapes(out), out, device, 4 << 30, 0)
    marker.write_text(json.dumps({"config": hf_config}))
    return out


def _add_vision_tokens(out: Path) -> dict[str, int]:
    """Qwen2-VL's vision tokens appended to the tokenizer (special), its chat template set."""
    from tokenizers import Tokenizer

    from pdserve.tiny_model.vlm import VISION_TOKENS, VLM_CHAT_TEMPLATE

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.add_special_tokens(list(VISION_TOKENS))
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in VISION_TOKENS}
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for token, tid in ids.items():
        config["added_tokens_decoder"][str(tid)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }  # fmt: skip
    config["additional_special_tokens"] = [*config.get("additional_special_tokens", []), *ids]
    config["chat_template"] = VLM_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return ids


def _published_shapes(out: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, from transformers' class on the meta device (lm_head is tied)."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from pdserve.tiny_model.vlm import published_name

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(out))
    return {
        published_name(name): tuple(p.shape)
        for name, p in sorted(model.named_parameters())
        if name != "lm_head.weight"
    }


# ---------------------------------------------------------------------------- the load


def image_url(seed: int, size: int) -> str:
    """A distinct smooth random image (JPEG data URL): noise at 1/16 scale, upsampled."""
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (max(size // 16, 2),) * 2 + (3,))
    image = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, float]:
    """(TTFT s, end-to-end s) of one streamed chat completion; RuntimeError on an error. The
    router opens the stream (its first event, the role chunk) once the first token exists, and a
    random model's first token may decode to no text: TTFT is the first event's arrival."""
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            if ttft is None:
                ttft = time.perf_counter() - start
    end = time.perf_counter() - start
    return (end if ttft is None else ttft), end


def chat_body(model: str, urls: list[str], output_len: int) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": "Describe the pictures."})
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": output_len, "min_tokens": output_len, "temperature": 0}  # fmt: skip


async def run_load(url: str, plan: Plan, num_images: int, seed: int) -> dict[str, Any]:
    """`plan.num_requests` requests of `num_images` distinct images, `plan.concurrency` at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        bodies = [
            chat_body(model, [image_url(seed + r * 8 + k, plan.image_size)
                              for k in range(num_images)], plan.output_len)
            for r in range(plan.num_requests + 2)
        ]  # fmt: skip
        for body in bodies[:2]:  # warm-up: the first shapes through the tower and decoder
            await one_request(client, body)
        gate = asyncio.Semaphore(plan.concurrency)

        async def gated(body: dict[str, Any]) -> tuple[float, float] | Exception:
            async with gate:
                try:
                    return await one_request(client, body)
                except (RuntimeError, httpx.HTTPError) as e:
                    return e

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(b) for b in bodies[2:]))
        duration = time.perf_counter() - start
    ok = [r for r in results if isinstance(r, tuple)]
    errors = [str(r) for r in results if not isinstance(r, tuple)]
    ttfts, e2es = np.array([r[0] for r in ok] or [np.nan]), np.array([r[1] for r in ok] or [np.nan])
    return {
        "images_per_request": num_images, "completed": len(ok), "failed": len(errors),
        "errors": errors[:3], "duration_s": duration, "requests_per_s": len(ok) / duration,
        "images_per_s": len(ok) * num_images / duration,
        "ttft_mean_ms": float(ttfts.mean() * 1e3), "ttft_p50_ms": float(np.median(ttfts) * 1e3),
        "ttft_p90_ms": float(np.percentile(ttfts, 90) * 1e3),
        "e2e_mean_ms": float(e2es.mean() * 1e3),
    }  # fmt: skip


# ---------------------------------------------------------------------------- main


def serve_and_measure(model_dir: Path, plan: Plan) -> list[dict[str, Any]]:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster, _free_port

    # One GPU: prefill and decode share it, the pages go over CUDA IPC (tcp on the CPU).
    kv = "cuda_ipc" if plan.device == "cuda" else "tcp"
    topology = Topology.for_model(
        str(model_dir), mode="pd", device=plan.device, port=_free_port(), kv_transfer=kv,
        dtype=plan.dtype, num_pages=plan.num_pages, page_size=plan.page_size,
        mem_fraction=plan.mem_fraction,
    )  # fmt: skip
    with Cluster(topology, log_level="warning", start_timeout_s=900) as cluster:
        return [
            asyncio.run(run_load(cluster.url, plan, k, seed=1000 * k))
            for k in plan.images_per_request
        ]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| images / request | completed | failed | requests/s | images/s | TTFT mean ms "
        "| TTFT p50 ms | TTFT p90 ms | E2E mean ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images_per_request']} | {r['completed']} | {r['failed']} "
            f"| {r['requests_per_s']:.2f} | {r['images_per_s']:.2f} | {r['ttft_mean_ms']:.1f} "
            f"| {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['e2e_mean_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--requests", type=int, help="requests per images-per-request count")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--image-size", type=int, help="pixels a side")
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--model-dir", help="where to write (or find) the checkpoint")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"))
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    given = {"num_requests": args.requests, "concurrency": args.concurrency,
             "image_size": args.image_size, "output_len": args.output_len}  # fmt: skip
    plan = dataclasses.replace(plan, **{k: v for k, v in given.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / plan.model)
        write_checkpoint(CONFIGS[plan.model], model_dir, plan.device)
        rows = serve_and_measure(model_dir, plan)
    out = Path(args.out_dir or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlm_bench.json").write_text(json.dumps({"plan": dataclasses.asdict(plan), "rows": rows}, indent=1))  # fmt: skip
    (out / "vlm_bench.md").write_text(table(rows) + "\n")
    print(table(rows))
    if any(r["failed"] for r in rows):
        raise SystemExit(f"failed requests: {[r['errors'] for r in rows if r['failed']]}")


if __name__ == "__main__":
    main()
