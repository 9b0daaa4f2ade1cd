"""Ask a LLaVA-NeXT server with a Qwen2 decoder (LLaVA-NeXT-72B/110B) about images: one image,
several images, and SGLang's native `/generate` with `image_data` (SGLang's
multimodal/qwen_llava_server.py).

Usage:
    # against a running server (`pdserve launch --model /models/llava-next-72b-hf`):
    python examples/multimodal/qwen_llava_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/qwen_llava_server.py --launch --device cpu

Each image is tiled at the resolution that fits it best (anyres, a CLIP tower). With --launch and
no --model it serves pdserve's tiny random-weight LLaVA-NeXT with a Qwen2 decoder (built offline
in seconds), so the answers are gibberish; the serving path is the real one.
"""

from __future__ import annotations

import functools
from pathlib import Path

from vlm_client import cached_tiny, parse_args, run

# The native API: Qwen's chat format with one `<image>` placeholder per image.
PROMPT = "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"


def tiny_model() -> Path:
    from pdserve.tiny_model.llava import build_tiny_llava_next

    return cached_tiny("qwen-llava", functools.partial(build_tiny_llava_next, decoder="qwen2"))


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0]), tiny_model, PROMPT)
