"""Ask a LLaVA-OneVision server about images: one image, several images, and SGLang's native
`/generate` with `image_data` (SGLang's multimodal/*_server.py examples, for LLaVA-OneVision).

Usage:
    # against a running server (`pdserve launch --model /models/llava-onevision-qwen2-0.5b-ov-hf`):
    python examples/multimodal/llava_onevision_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/llava_onevision_server.py --launch --device cpu

One image is tiled at the resolution that fits it best (anyres); with several images each takes
one tile. With --launch and no --model it serves pdserve's tiny random-weight LLaVA-OneVision
(built offline in seconds), so the answers are gibberish; the serving path is the real one.
"""

from __future__ import annotations

from pathlib import Path

from vlm_client import cached_tiny, parse_args, run

# The native API: the prompt holds one `<image>` placeholder per image (the chat template's).
PROMPT = "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"


def tiny_model() -> Path:
    from pdserve.tiny_model.llava import build_tiny_llava_onevision

    return cached_tiny("llava-onevision", build_tiny_llava_onevision)


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0]), tiny_model, PROMPT)
