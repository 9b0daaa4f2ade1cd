"""Ask a LLaVA-NeXT server with a Llama-3 decoder (llama3-llava-next-8b) about images: one image,
several images, and SGLang's native `/generate` with `image_data` (SGLang's
multimodal/llama3_llava_server.py).

Usage:
    # against a running server (`pdserve launch --model /models/llama3-llava-next-8b-hf`):
    python examples/multimodal/llama3_llava_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/llama3_llava_server.py --launch --device cpu

Each image is tiled at the resolution that fits it best (anyres, a CLIP tower). With --launch and
no --model it serves pdserve's tiny random-weight LLaVA-NeXT (a Llama decoder, built offline in
seconds), so the answers are gibberish; the serving path is the real one.
"""

from __future__ import annotations

from pathlib import Path

from vlm_client import cached_tiny, parse_args, run

# The native API: Llama 3's chat format with one `<image>` placeholder per image.
PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nDescribe it.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def tiny_model() -> Path:
    from pdserve.tiny_model.llava import build_tiny_llava_next

    return cached_tiny("llava-next", build_tiny_llava_next)


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0]), tiny_model, PROMPT)
