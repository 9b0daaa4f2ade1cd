"""Pixtral's tokenizer side: each image at its own resolution (transformers' image processor
resizes it to patch multiples); its placeholder becomes a row of `[IMG]` per patch row, each
row closed by `[IMG_BREAK]`, the last by `[IMG_END]` (transformers' `PixtralProcessor`). Mistral 3
merges each 2 x 2 block of patches into one token: a row per merged row (a row or column of
patches past the last whole block is left out, as the model's merger leaves it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pdserve.config.vision_config import PixtralVisionConfig
from pdserve.multimodal.image_loader import ImageLimits, load_images
from pdserve.multimodal.processor import ImageProcessor, Images, image_hash
from pdserve.protocol import MultimodalInputs

IMG_BREAK, IMG_END = "[IMG_BREAK]", "[IMG_END]"


class PixtralImageProcessor(ImageProcessor):
    def __init__(
        self,
        model_path: str | Path,
        vision: PixtralVisionConfig,
        tokenizer: Any,
        limits: ImageLimits,
    ) -> None:
        super().__init__(model_path, vision, tokenizer, limits)
        self.pixtral = vision
        self.break_id = tokenizer.convert_tokens_to_ids(IMG_BREAK)
        self.end_id = tokenizer.convert_tokens_to_ids(IMG_END)

    def preprocess(self, sources: list[Any]) -> Images:
        pil_images = load_images(sources, self.limits)
        out = self.hf(images=pil_images, return_tensors="np")
        sizes = [[int(h), int(w)] for h, w in out["image_sizes"]]  # resized, patch multiples
        flat, hashes, tokens = [], [], []
        p = self.pixtral.token_patch_size
        for k, (h, w) in enumerate(sizes):
            pixels = np.ascontiguousarray(out["pixel_values"][k][:, :h, :w], dtype=np.float32)
            flat.append(pixels.reshape(-1))
            hashes.append(image_hash(pixels, [h, w]))
            tokens.append((h // p) * (w // p))
        return Images(np.concatenate(flat), [], hashes, tokens, sizes, [1] * len(sizes))

    def _rows(self, size: list[int]) -> tuple[int, int]:
        p = self.pixtral.token_patch_size
        return size[0] // p, size[1] // p

    def expand(self, prompt: str, images: Images) -> str:
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(images.image_sizes):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} image placeholders ({self.image_token}) for "
                f"{len(images.image_sizes)} image(s): expected one per image (the chat template "
                "writes them for image_url parts)"
            )
        out = [pieces[0]]
        for size, piece in zip(images.image_sizes, pieces[1:]):
            rows, cols = self._rows(size)
            text = (self.image_token * cols + IMG_BREAK) * rows
            out.append(text[: -len(IMG_BREAK)] + IMG_END + piece)
        return "".join(out)

    def expand_ids(self, input_ids: list[int], images: Images) -> list[int]:
        img = self.pixtral.image_token_id
        num_pads = sum(1 for t in input_ids if t == img)
        if num_pads == sum(images.num_tokens):
            return list(input_ids)
        if num_pads != len(images.image_sizes):
            raise ValueError(
                f"input_ids hold {num_pads} image tokens ({img}) for {len(images.image_sizes)} "
                f"image(s): expected one per image, or {sum(images.num_tokens)} (expanded)"
            )
        out: list[int] = []
        sizes = iter(images.image_sizes)
        for t in input_ids:
            if t != img:
                out.append(t)
                continue
            rows, cols = self._rows(next(sizes))
            ids = ([img] * cols + [self.break_id]) * rows
            out.extend(ids[:-1] + [self.end_id])
        return out

    def inputs(self, input_ids: list[int], images: Images) -> MultimodalInputs:
        num_pads = sum(1 for t in input_ids if t == self.pixtral.image_token_id)
        if num_pads != sum(images.num_tokens):
            raise ValueError(
                f"the prompt holds {num_pads} image tokens: expected {sum(images.num_tokens)} "
                f"for {len(images.num_tokens)} image(s)"
            )
        pixels = images.pixel_values  # [sum of 3 * H * W] float32, image after image
        return MultimodalInputs(
            pixel_values=pixels.tobytes(),
            pixel_shape=list(pixels.shape),
            pixel_dtype="float32",
            image_grid_thw=[],
            image_hashes=images.hashes,
            num_image_tokens=images.num_tokens,
            image_token_id=self.pixtral.image_token_id,
            image_sizes=images.image_sizes,
            num_image_patches=images.num_patches,
        )
