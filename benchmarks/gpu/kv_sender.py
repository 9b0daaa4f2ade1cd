"""The prefill side of the KV transfer benchmark: `python kv_sender.py SPEC.json` (a child process:
CUDA IPC opens memory of another process only).

SPEC.json: backend, device, shape ([L, 2, num_pages, page_size, Hkv, D]), dtype, seed,
handshake_path (the receiver's handshake, msgpack), timeout_s, and transfers
([[rid, label, src_pages, dst_pages, is_timed], ...]) sent in order to decode 0. Prints one
`RESULT {json}` line: the wall seconds of each timed send by label, and the float64 sum of the last
transfer's source pages, which the receiver compares with what landed.
"""

from __future__ import annotations

import json
import sys

import msgpack
import torch


def main(spec_path: str) -> None:
    from pdserve.kv_transfer import make_sender

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["handshake_path"], "rb") as f:
        handshake = msgpack.unpackb(f.read(), raw=False)
    device = spec["device"]
    generator = torch.Generator(device=device).manual_seed(spec["seed"])
    pool = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    pool.normal_(generator=generator)  # [L, 2, num_pages, page_size, Hkv, D]
    sender = make_sender(spec["backend"], pool, [handshake])
    seconds: dict[str, list[float]] = {}
    num_bytes: dict[str, int] = {}
    for rid, label, src_pages, dst_pages, is_timed in spec["transfers"]:
        result = sender.send(rid, 0, src_pages, dst_pages, timeout_s=spec["timeout_s"])
        if is_timed:
            seconds.setdefault(label, []).append(result.seconds)
            num_bytes[label] = result.num_bytes
    last_src = spec["transfers"][-1][2]
    checksum = float(pool[:, :, last_src].double().sum())
    sender.close()
    print("RESULT " + json.dumps({"seconds": seconds, "bytes": num_bytes, "checksum": checksum}))


if __name__ == "__main__":
    main(sys.argv[1])
