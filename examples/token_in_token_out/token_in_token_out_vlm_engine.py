"""Token in, token out with images and the offline Engine: give `input_ids` and `image_data`, read
`output_ids` (SGLang's token_in_token_out/token_in_token_out_vlm_engine.py).

Usage:
    python examples/token_in_token_out/token_in_token_out_vlm_engine.py    # tiny Qwen2-VL
    python examples/token_in_token_out/token_in_token_out_vlm_engine.py \\
        --model /models/llava-onevision-qwen2-0.5b-ov-hf --image cat.png --image dog.png
    python examples/token_in_token_out/token_in_token_out_vlm_engine.py --device cpu --in-process

Two prompts, greedy: the first image with "Describe this image.", then every image with "What
differs between these images?". The ids hold one image placeholder per image (the chat template
writes them); the engine expands each into the image's tokens. Without --model it builds pdserve's
tiny random-weight Qwen2-VL (offline, seconds); without --image it draws two images.
"""

from __future__ import annotations

import argparse
import base64
import io

from transformers import AutoTokenizer

import pdserve


def drawn_image(seed: int, height: int, width: int) -> str:
    """A generated PNG as a data: URL."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_ids(tokenizer: AutoTokenizer, question: str, num_images: int) -> list[int]:
    """A user turn with `num_images` image parts and `question`, through the chat template."""
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face VLM directory (default: tiny Qwen2-VL)")
    parser.add_argument("--image", action="append", help="an image path or URL (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--in-process", action="store_true", help="run the engine core in this process"
    )
    args = parser.parse_args()
    if args.model is None:
        from pdserve.tiny_model.vlm import cached_tiny_vlm

        args.model = str(cached_tiny_vlm())
    images = args.image or [drawn_image(0, 64, 96), drawn_image(1, 96, 64)]

    # Tokenize here; the engine sees token ids (and images) and answers with token ids.
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    input_ids = [
        chat_ids(tokenizer, "Describe this image.", 1),
        chat_ids(tokenizer, "What differs between these images?", len(images)),
    ]
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens,
              "min_new_tokens": args.max_new_tokens}  # fmt: skip
    llm = pdserve.Engine(model_path=args.model, device=args.device, in_process=args.in_process)
    outputs = llm.generate(input_ids=input_ids, sampling_params=params,
                           image_data=[images[0], images])  # fmt: skip
    for ids, output in zip(input_ids, outputs):
        print("===============================")
        print(f"Input: {ids}\nGenerated token ids: {output['output_ids']}")
        print(f"Prompt tokens (image tokens included): {output['meta_info']['prompt_tokens']}")
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
