"""Ask a Pixtral server about images: one image, several images, and SGLang's native
`/generate` with `image_data` (SGLang's multimodal/*_server.py examples, for Pixtral).

Usage:
    # against a running server (`pdserve launch --model /models/pixtral-12b`, the -hf layout):
    python examples/multimodal/pixtral_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/pixtral_server.py --launch --device cpu

Each image keeps its own resolution: its `[IMG]` placeholder becomes one row of image tokens per
patch row, closed by `[IMG_BREAK]` (`[IMG_END]` after the last). With --launch and no --model it
serves pdserve's tiny random-weight Pixtral (built offline in seconds), so the answers are
gibberish; the serving path is the real one.
"""

from __future__ import annotations

from pathlib import Path

from vlm_client import cached_tiny, parse_args, run

# The native API: Pixtral's instruction format with one `[IMG]` placeholder per image.
PROMPT = "[INST][IMG]Describe it.[/INST]"


def tiny_model() -> Path:
    from pdserve.tiny_model.llava import build_tiny_pixtral

    return cached_tiny("pixtral", build_tiny_pixtral)


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0]), tiny_model, PROMPT)
