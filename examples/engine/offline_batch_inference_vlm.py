"""Generate for prompts with images with the offline Engine (SGLang's
engine/offline_batch_inference_vlm.py).

Usage:
    python examples/engine/offline_batch_inference_vlm.py                  # tiny offline Qwen2-VL
    python examples/engine/offline_batch_inference_vlm.py --model /models/Qwen2-VL-2B-Instruct \
        --image cat.jpg --image dog.png
    python examples/engine/offline_batch_inference_vlm.py \
        --model /models/llava-onevision-qwen2-0.5b-ov-hf --image cat.jpg

Each prompt is a chat turn rendered by the model's chat template, with one image placeholder per
image; `image_data` gives the images (a path, a URL or base64; a list for several images). Without
--model it builds pdserve's tiny random-weight Qwen2-VL (a few seconds, offline), so the text is
gibberish; without --image it draws two images. The serving path is the real one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pdserve


def tiny_vlm() -> str:
    from pdserve.tiny_model.vlm import cached_tiny_vlm

    return str(cached_tiny_vlm())


def drawn_images(folder: Path) -> list[str]:
    """Two small generated images, written as PNG files; their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(64, 96), (96, 64)]):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def chat_prompt(tokenizer: object, question: str, num_images: int) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face VLM directory (default: tiny Qwen2-VL)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--image", action="append", help="an image path or URL (repeatable)")
    parser.add_argument(
        "--in-process", action="store_true", help="run the engine core in this process"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_path = args.model or tiny_vlm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with tempfile.TemporaryDirectory() as folder:
        images = args.image or drawn_images(Path(folder))
        prompts = [
            chat_prompt(tokenizer, "Describe this image.", 1),
            chat_prompt(tokenizer, "What differs between these images?", len(images)),
        ]
        image_data = [images[0], images]  # one entry per prompt: an image, or a list of them
        sampling_params = {"temperature": 0, "max_new_tokens": 16}

        llm = pdserve.Engine(model_path=model_path, device=args.device, in_process=args.in_process)
        outputs = llm.generate(prompts, sampling_params, image_data=image_data)
        for prompt, output in zip(prompts, outputs):
            print("===============================")
            print(f"Prompt: {prompt!r}\nGenerated text: {output['text']!r}")
            print(f"Prompt tokens (with image tokens): {output['meta_info']['prompt_tokens']}")
        llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
