"""The prefix cache's key for a request with images: its token ids with each image's placeholder
tokens replaced by an id derived from the image's hash.

Placeholder tokens are the same id for every image, so the token ids alone would let a request
reuse KV computed for a different image. Keyed by hash, the same image twice shares its prefix
and a different image with the same text does not. Key ids start at 2**64, above every token id
(and every LoRA namespace offset), so they never equal a real token.
"""

from __future__ import annotations

from typing import Any

IMAGE_KEY_BASE = 1 << 64


def image_keyed_ids(token_ids: list[int], mm: Any) -> list[int]:
    """`token_ids` (a prefix of the request's ids) keyed by image; `mm`: MultimodalInputs."""
    out = list(token_ids)
    image_token_id = mm.image_token_id
    counts, hashes = mm.num_image_tokens, mm.image_hashes
    k, left = 0, counts[0] if counts else 0
    for i, tid in enumerate(out):
        if tid != image_token_id or k >= len(counts):
            continue
        out[i] = IMAGE_KEY_BASE + hashes[k]
        left -= 1
        if left == 0:
            k += 1
            left = counts[k] if k < len(counts) else 0
    return out
