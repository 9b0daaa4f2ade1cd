"""Ask a Qwen2-VL server about images: one image, several images, and SGLang's native
`/generate` with `image_data` (SGLang's multimodal/*_server.py examples, for Qwen2-VL).

Usage:
    # against a running server (`pdserve launch --model /models/Qwen2-VL-2B-Instruct`):
    python examples/multimodal/qwen2_vl_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/qwen2_vl_server.py --launch --device cpu

Images go as OpenAI `image_url` content parts (data: URLs here; file:// paths and http(s) URLs
work too). With --launch and no --model it serves pdserve's tiny random-weight Qwen2-VL (built
offline in seconds), so the answers are gibberish; the serving path is the real one.
"""

from __future__ import annotations

from pathlib import Path

from vlm_client import parse_args, run

# The native API: the prompt holds one image placeholder per image.
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it."
    "<|im_end|>\n<|im_start|>assistant\n"
)


def tiny_model() -> Path:
    from pdserve.tiny_model.vlm import cached_tiny_vlm

    return cached_tiny_vlm()


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0]), tiny_model, PROMPT)
