"""The prefix cache's key for a request with images (and videos): its token ids with each image's
(video's) placeholder tokens replaced by an id derived from its hash.

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
    placeholders = {mm.image_token_id, mm.video_token_id}  # a video is one item, as an image
    counts, hashes = mm.num_image_tokens, mm.image_hashes
    k, left = 0, counts[0] if counts else 0
    for i, tid in enumerate(out):
        if tid not in placeholders or k >= len(counts):
            continue
        out[i] = IMAGE_KEY_BASE + hashes[k]
        left -= 1
        if left == 0:
            k += 1
            left = counts[k] if k < len(counts) else 0
    return out
