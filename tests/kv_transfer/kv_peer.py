"""The prefill side of the two-process KV transfer tests: `python kv_peer.py SPEC.json`.

SPEC.json: backend, device, seed, shape ([L, 2, num_pages, page_size, Hkv, D]), dtype,
handshake_path (the receiver's handshake as msgpack: it carries bytes), transfers
([[rid, src_pages, dst_pages], ...]) and timeout_s; optionally handshake_paths (decode 0, 1, ...
instead of handshake_path) and batches ([[[rid, decode_idx, src_pages, dst_pages], ...], ...],
each sent with one send_many after the transfers). Builds its pool with `make_pool(seed, ...)`,
sends every transfer to decode 0, and prints the sender's stats and each batched transfer's
outcome (bytes moved, or the exception's type name) as one JSON line.
"""

from __future__ import annotations

import json
import sys

import msgpack
import torch


def make_pool(seed: int, shape: list[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random pool contents, the same in every process for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)  # [L, 2, N, ps, Hkv, D]


def main(spec_path: str) -> None:
    from pdserve.kv_transfer import Transfer, make_sender

    with open(spec_path) as f:
        spec = json.load(f)
    handshakes = []
    for path in spec.get("handshake_paths") or [spec["handshake_path"]]:
        with open(path, "rb") as f:
            handshakes.append(msgpack.unpackb(f.read(), raw=False))
    pool = make_pool(spec["seed"], spec["shape"], getattr(torch, spec["dtype"]), spec["device"])
    sender = make_sender(spec["backend"], pool, handshakes)
    for rid, src_pages, dst_pages in spec["transfers"]:
        sender.send(rid, 0, src_pages, dst_pages, timeout_s=spec["timeout_s"])
    outcomes = []
    for batch in spec.get("batches", []):
        results = sender.send_many([Transfer(*t) for t in batch], timeout_s=spec["timeout_s"])
        outcomes += [r.num_bytes if isinstance(r, tuple) else type(r).__name__ for r in results]
    stats = sender.stats
    report = {"bytes_sent": stats.bytes_sent, "num_transfers": stats.num_transfers}
    print(json.dumps({**report, **({"outcomes": outcomes} if outcomes else {})}))
    sender.close()


if __name__ == "__main__":
    main(sys.argv[1])
