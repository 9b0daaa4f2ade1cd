"""Offline throughput of the in-process Engine against how many requests it runs at once (issue
17's offline row: 1,000 prompts of 512 random tokens, 256 generated greedily each), Llama-3.2-1B's
shape with random bf16 weights, one engine per setting in one call.

    python benchmarks/gpu/offline_sweep.py --max-running 256,512,1024
    python benchmarks/gpu/offline_sweep.py --max-running 256 --ab-mixed-split
    python benchmarks/gpu/offline_sweep.py --max-running 256 --prefill-budgets 512,1024
    python benchmarks/gpu/offline_sweep.py --smoke       # tiny shapes on the CPU: the plumbing

--ab-mixed-split runs each setting twice: as shipped, and with a mixed step's decode rows left in
the extend kernel (`ForwardBatch.leading_decodes` patched to none), the A/B of that split.

Each setting gets a KV pool for all its running requests (`--num-pages`, default: enough for
every prompt at once) and CUDA graphs up to min(max_running, --graph-max) rows. Printed: output
tokens/s and the seconds of the run, per setting, and the ratio to the first setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402
from engine_bench import free_device_memory, make_engine, offline_throughput  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-running", default="256,512,1024", help="comma-separated settings")
    p.add_argument("--graph-max", type=int, default=512, help="most rows of a CUDA graph")
    p.add_argument(
        "--prefill-budgets", default="",
        help="comma-separated decode_step_prefill_tokens settings (empty: the default)",
    )  # fmt: skip
    p.add_argument(
        "--piecewise-max-tokens", default="",
        help="comma-separated piecewise_graph_max_tokens settings (empty: the default; 0: off)",
    )  # fmt: skip
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-pages", type=int, default=0, help="0: every prompt's pages at once")
    p.add_argument("--ab-mixed-split", action="store_true", help="also without the mixed split")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each variant, alternating (the first run "
        "of a process also compiles the kernels' new specializations)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args()
    if args.smoke:
        spec, device, dtype, root = rc.SMOKE_1B, "cpu", "float32", "/tmp/pdserve-bench-smoke"
        args.prompts, args.input_len, args.output_len = 12, 16, 8
    else:
        spec, device, dtype, root = rc.LLAMA_1B, "cuda", "bfloat16", "/dev/shm/pdserve-bench"
    model = rc.write_checkpoint(spec, Path(root) / spec.name, device)
    page = 16
    pages = args.num_pages or args.prompts * (args.input_len + args.output_len + page) // page + 64
    rows = []
    from pdserve.worker.forward_batch import ForwardBatch

    shipped = ForwardBatch.leading_decodes
    variants = [("as shipped", shipped)]
    if args.ab_mixed_split:
        variants.append(("decodes in the extend kernel", property(lambda batch: (0, 0))))
    settings = [int(x) for x in args.max_running.split(",")]
    budgets = [int(x) for x in args.prefill_budgets.split(",") if x] or [None]
    piecewise = [int(x) for x in args.piecewise_max_tokens.split(",") if x] or [None]
    for max_running, budget, pw, (name, split) in (
        (m, b, w, v)
        for m in settings
        for _ in range(args.repeat)
        for b in budgets
        for w in piecewise
        for v in variants
    ):
        ForwardBatch.leading_decodes = split
        extra = {} if budget is None else {"decode_step_prefill_tokens": budget}
        if pw is not None:
            extra["piecewise_graph_max_tokens"] = pw
        engine = make_engine(
            model, device, dtype, "auto", num_pages=pages, max_running_requests=max_running,
            cuda_graph=device == "cuda", cuda_graph_max_batch=min(max_running, args.graph_max),
            **extra,
        )  # fmt: skip
        r = offline_throughput(
            engine, spec.vocab_size, args.prompts, args.input_len, args.output_len, device
        )
        label = f"{max_running}, {name}" + ("" if budget is None else f", budget {budget}")
        label += "" if pw is None else f", piecewise graphs up to {pw} tokens"
        rows.append((label, r["output_tok_s"], r["seconds"]))
        print(f"max_running {label}: {r['output_tok_s']:.0f} tok/s", flush=True)
        engine.shutdown()
        del engine
        free_device_memory()
    ForwardBatch.leading_decodes = shipped
    print("| max_running_requests, variant | output tok/s | seconds | vs first |")
    print("|---|---|---|---|")
    for max_running, tok_s, seconds in rows:
        print(f"| {max_running} | {tok_s:,.0f} | {seconds:.1f} | {tok_s / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
