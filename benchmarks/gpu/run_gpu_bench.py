"""pdserve's GPU speed in one call: ceilings, batch-1 MBU, large-batch decode steps against the
roofline, offline throughput against transformers, nano-vllm's workload, mixed vs prefill + decode
serving, KV transfer bandwidth, and paged attention kernels beside FlashInfer's. Every decode row
also times a compiled plain-torch decoder (torch_peer.py) on the same weights in the same call.
Random bf16 weights at real shapes, nothing downloaded.

    python benchmarks/gpu/run_gpu_bench.py                  # everything, about 8 minutes on an H100
    python benchmarks/gpu/run_gpu_bench.py --sections b1,batch
    python benchmarks/gpu/run_gpu_bench.py --smoke          # tiny shapes on the CPU (the test)

Each section is guarded: an error is printed and recorded, and the next section runs. The table and
the raw JSON are rewritten after every section (README.md beside this file explains the numbers).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in logs

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _path in (str(HERE), str(REPO)):  # the helper modules beside this file, and pdserve
    if _path not in sys.path:
        sys.path.insert(0, _path)
# Child processes (cluster workers, the HF and KV helpers) import pdserve from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import torch  # noqa: E402
from bench_session import FULL, SECTIONS, SMOKE, Bench, Plan  # noqa: E402
from report import Report, size_text  # noqa: E402

# Seconds a section needs at least on the H100 (engine start included): skipped with less left.
MIN_SECONDS = {"ceilings": 5, "b1": 45, "batch": 30, "offline": 40, "hf": 40, "kv": 10,
               "b1_8b": 60, "nano": 50, "serve": 90, "hf_static": 60, "kernels": 30}  # fmt: skip
# The engine each section drives (one lives at a time; sections without one free the GPU).
ENGINE_OF = {"b1": "1b", "batch": "1b", "offline": "1b", "b1_8b": "8b", "nano": "qwen"}
# The compiled plain-torch peer each section times beside pdserve (same checkpoint).
PEER_OF = {"b1": "1b", "batch": "1b", "offline": "1b", "b1_8b": "8b"}


# ---------------------------------------------------------------------------- the sections


def sec_ceilings(b: Bench) -> dict[str, Any]:
    c = b.measure_ceilings()
    b.say(f"copy {c['copy_gb_s']:.0f} GB/s, matmul {c['matmul_tflops']:.1f} TFLOP/s")
    return c


def _with_peer(b: Bench, key: str, label: str, fn: Callable[[Any], dict]) -> dict[str, Any]:
    """{"peer": fn(peer)} for the peer of checkpoint `key`; its error is recorded beside pdserve's
    numbers (never the section's), and the peer is rebuilt for the next row."""
    if not b.args.peer:
        return {}
    try:
        r = fn(b.use_peer(key))
    except Exception as e:  # pdserve's numbers of the row still count
        traceback.print_exc()
        b.say(f"peer error ({label}): {type(e).__name__}: {str(e)[:300]}")
        b.use_peer(None)
        return {"peer_error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"peer": r}


def _peer_b1(b: Bench, peer: Any, engine: Any, roof: Any, pd_ms: float) -> dict[str, Any]:
    from peer_bench import check_against_engine, peer_batch1

    input_len, output_len = b.plan.b1_lens
    peer.ensure_cache(1, input_len + output_len)  # one cache shape: one compile for both
    check = check_against_engine(engine, peer, roof.spec.vocab_size)
    b.say(f"peer check: {check_text(check)}")
    r = peer_batch1(peer, roof, input_len, output_len)
    b.say(
        f"peer batch 1: {r['decode_step_ms']:.2f} ms/step, MBU {r['mbu']:.0%}; pdserve / peer "
        f"speed {r['decode_step_ms'] / pd_ms:.2f}x (CUDA graph skips: {r['cudagraph_skips']})"
    )
    return {**r, "check": check}


def check_text(c: dict[str, Any]) -> str:
    gap = c["fp32_gap_at_divergence"]
    tie = (
        ""
        if gap is None
        else f" (float32 gap there {gap:+.3f}, bf16 abs err {c['logits_abs_err']:.3f})"
    )
    return (
        f"greedy tokens equal pdserve's for {c['equal_prefix']}/{c['num_new']}{tie}; logits vs "
        f"float32 max rel err {c['logits_max_rel_err']:.1e} (tol {c['logits_tolerance']:.0e}); "
        f"argmax = float32's for {c['peer_argmax_vs_fp32']:.0%} of the peer's tokens, "
        f"{c['pdserve_argmax_vs_fp32']:.0%} of pdserve's: {'PASS' if c['passed'] else 'FAIL'}"
    )


def _sec_b1(b: Bench, key: str) -> dict[str, Any]:
    from engine_bench import decode_batch1

    engine, roof = b.use_engine(key), b.roofline(key)
    input_len, output_len = b.plan.b1_lens
    r = decode_batch1(engine, roof, input_len, output_len, b.plan.device)
    b.say(
        f"{key} batch 1: {r['decode_tok_s']:.0f} tok/s ({r['decode_step_ms']:.2f} ms/step), "
        f"MBU {r['mbu']:.0%}, prefill {r['prefill_ms']:.1f} ms"
    )
    pd_ms = r["decode_step_ms"]
    r.update(_with_peer(b, key, f"{key} b1", lambda p: _peer_b1(b, p, engine, roof, pd_ms)))
    return r


def sec_batch(b: Bench) -> dict[str, Any]:
    from engine_bench import decode_large_batch
    from peer_bench import peer_large_batch

    engine, roof = b.use_engine("1b"), b.roofline("1b")
    rows = []
    for batch in b.plan.batch_sizes:
        r = decode_large_batch(
            engine, roof, batch, b.plan.batch_context, b.plan.device, timed_steps=b.plan.batch_steps
        )
        b.say(
            f"batch {batch}: {r['step_ms']:.2f} ms/step vs roofline {r['roofline_ms']:.2f} ms "
            f"({r['ratio_to_roofline']:.2f}x), pure decode: {r['is_pure_decode']}"
        )
        timed = functools.partial(
            peer_large_batch, roof=roof, batch=batch, context_len=round(r["mean_context"]),
            timed_steps=b.plan.batch_steps,
        )  # fmt: skip
        r.update(_with_peer(b, "1b", f"batch {batch}", timed))
        if "peer" in r:
            p = r["peer"]
            b.say(f"peer batch {batch}: {p['step_ms']:.2f} ms/step ({p['ratio_to_roofline']:.2f}x "
                  f"roofline); pdserve / peer speed {p['step_ms'] / r['step_ms']:.2f}x")  # fmt: skip
        rows.append(r)
    return {"batches": rows}


def sec_offline(b: Bench) -> dict[str, Any]:
    from engine_bench import offline_throughput
    from peer_bench import peer_offline

    num, input_len, output_len = b.plan.offline
    num = _offline_prompts_within_cap(b, num, input_len, output_len)
    engine = b.use_engine("1b")
    vocab = b.plan.models["1b"].vocab_size
    r = offline_throughput(engine, vocab, num, input_len, output_len, b.plan.device)
    b.say(f"offline: {r['output_tok_s']:.0f} output tok/s over {r['seconds']:.1f} s")
    wave = functools.partial(
        peer_offline, vocab=vocab, batch=b.plan.peer_offline_batch, input_len=input_len,
        output_len=output_len,
    )  # fmt: skip
    r.update(_with_peer(b, "1b", "offline", wave))
    if "peer" in r:
        p = r["peer"]
        b.say(f"peer offline (one wave of {p['batch']}): {p['output_tok_s']:.0f} output tok/s; "
              f"pdserve / peer {r['output_tok_s'] / p['output_tok_s']:.2f}x")  # fmt: skip
    return {"model": b.plan.models["1b"].name, **r}


def _offline_prompts_within_cap(b: Bench, num: int, input_len: int, output_len: int) -> int:
    """Fewer prompts (a multiple of the batch) when the batch-256 step time says `num` would
    overrun the cap: a rate needs a full batch, not every prompt."""
    batches = (b.report.sections.get("batch") or {}).get("batches", [])
    step_ms = next((r["step_ms"] for r in batches if r["batch"] == 256), None)
    if step_ms is None:
        return num
    waves = -(-num // 256)
    estimate_s = waves * output_len * step_ms * 1.5 / 1e3 + num * input_len / 20000
    cap = min(b.plan.offline_cap_s, max(b.remaining_s() - 60, 30))
    if estimate_s <= cap:
        return num
    reduced = max(256, int(num * cap / estimate_s) // 256 * 256)
    b.say(f"offline: {num} prompts would take ~{estimate_s:.0f} s; running {reduced}")
    return min(num, reduced)


def _hf(b: Bench, mode: str, timeout_s: float) -> dict[str, Any]:
    from child_process import run_child

    _, input_len, output_len = b.plan.offline
    args = ["--model-dir", str(b.checkpoint("1b")), "--device", b.plan.device]
    args += ["--dtype", b.plan.dtype, "--mode", mode, "--batch", str(b.plan.hf_batch)]
    args += ["--input-len", str(input_len), "--output-len", str(output_len)]
    args += ["--num-batches", str(b.args.hf_batches)]
    r = run_child("hf_generate.py", args, timeout_s)
    b.say(f"HF {mode}: {r['output_tok_s']:.0f} output tok/s ({r['step_ms']:.1f} ms/step)")
    return r


def sec_hf(b: Bench) -> dict[str, Any]:
    return _hf(b, "eager", min(b.plan.hf_timeout_s, max(b.remaining_s(), 30)))


def sec_hf_static(b: Bench) -> dict[str, Any]:
    if b.plan.device != "cuda":
        raise _Skip("transformers compiles generate only on CUDA")
    return _hf(b, "static", min(b.plan.hf_static_cap_s, b.remaining_s() - 5))


def sec_nano(b: Bench) -> dict[str, Any]:
    from engine_bench import nano_vllm_throughput

    engine = b.use_engine("qwen")
    num, low, high = b.plan.nano
    vocab = b.plan.models["qwen"].vocab_size
    r = nano_vllm_throughput(engine, num, low, high, vocab, b.plan.device)
    b.say(f"nano-vllm workload: {r['output_tok_s']:.0f} tok/s ({r['seconds']:.1f} s)")
    return {**r, "model": b.plan.models["qwen"].name}


def sec_serve(b: Bench) -> dict[str, Any]:
    from engine_bench import graphs_available
    from serve_bench import serve_once

    num, input_len, output_len, concurrency = b.plan.serve
    out: dict[str, Any] = {"model": b.plan.models["1b"].name, "num_prompts": num}
    out.update(input_len=input_len, output_len=output_len, max_concurrency=concurrency)
    flags = {"attention_backend": b.args.attention_backend}
    if not b.args.cuda_graph or (b.plan.device == "cuda" and not graphs_available()):
        flags["cuda_graph"] = False
    out["cuda_graph"] = flags.get("cuda_graph", True) and b.plan.device == "cuda"
    for mode in ("mixed", "pd"):
        try:
            r = serve_once(
                b.checkpoint("1b"), mode, device=b.plan.device,
                vocab_size=b.plan.models["1b"].vocab_size, num_prompts=num, input_len=input_len,
                output_len=output_len, max_concurrency=concurrency,
                engine_overrides={**b.plan.serve_options, **flags},
                start_timeout_s=max(60, min(240, b.remaining_s() / 2)),
                run_timeout_s=max(30, min(150, b.remaining_s() / 2)),
            )  # fmt: skip
        except Exception as e:  # one mode failing still leaves the other's numbers
            traceback.print_exc()
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"
            continue
        b.say(
            f"serve {mode}: {r['output_tok_s']:.0f} tok/s, TTFT {r['mean_ttft_ms']:.0f} ms, "
            f"TPOT {r['mean_tpot_ms']:.1f} ms, {r['failed']} failed "
            f"(cluster start {r['cluster_start_s']:.0f} s)"
        )
        out[mode] = r
    if "mixed" not in out and "pd" not in out:
        raise RuntimeError(f"both serving runs failed: {out}")
    return out


def sec_kv(b: Bench) -> dict[str, Any]:
    from kv_bench import PageLayout, measure_kv_transfer

    spec = b.plan.models[b.plan.kv_layout_model]
    dtype = torch.bfloat16 if b.plan.device == "cuda" else torch.float32
    layout = PageLayout(
        spec.num_layers, b.plan.kv_page_size, spec.num_kv_heads, spec.head_dim, dtype
    )
    copy_gb_s = b.measure_ceilings()["copy_gb_s"]
    work_dir = Path(tempfile.mkdtemp(prefix="pdserve-kv-bench-"))
    r = measure_kv_transfer(
        b.plan.kv_backend, b.plan.device, layout, list(b.plan.kv_sizes), copy_gb_s * 1e9, work_dir
    )
    for row in r["sizes"]:
        b.say(
            f"kv {size_text(row['size_bytes'])}: {row['payload_gb_s']:.1f} GB/s, "
            f"{row['ratio_to_copy']:.0%} of copy; checksum ok: {r['checksum_matches']}"
        )
    return {**r, "copy_gb_s": copy_gb_s}


def sec_kernels(b: Bench) -> dict[str, Any]:
    from attention_bench import run_kernels

    c = b.measure_ceilings()
    out = os.environ.get("OUT")
    log_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="pdserve-kernels-"))
    warm_s = max(30.0, b.remaining_s() - 60)  # FlashInfer's JIT builds; the timings need ~60 s
    return run_kernels(b.plan.kernels, c["copy_gb_s"], c["matmul_tflops"], b.say, log_dir, warm_s)


class _Skip(Exception):
    """A section that cannot run here (not an error)."""


SECTION_FUNCS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ceilings": sec_ceilings,
    "b1": lambda b: _sec_b1(b, "1b"),
    "batch": sec_batch,
    "offline": sec_offline,
    "hf": sec_hf,
    "kv": sec_kv,
    "b1_8b": lambda b: _sec_b1(b, "8b"),
    "nano": sec_nano,
    "serve": sec_serve,
    "hf_static": sec_hf_static,
    "kernels": sec_kernels,
}


# ---------------------------------------------------------------------------- running


def run_section(b: Bench, name: str) -> None:
    if b.remaining_s() < MIN_SECONDS[name] and not b.args.smoke:
        b.report.skipped[name] = f"out of time budget ({b.remaining_s():.0f} s left)"
        b.say(f"skip {name}: {b.report.skipped[name]}")
        return
    b.say(f"== {name}")
    t0 = time.perf_counter()
    try:
        if b.peer_key != PEER_OF.get(name):
            b.use_peer(None)  # built again when a row needs it
        b.use_engine(ENGINE_OF.get(name))
        result = SECTION_FUNCS[name](b)
        if b.engine is not None:
            from engine_bench import engine_facts

            result["engine"] = engine_facts(b.engine)
        b.report.sections[name] = {**result, "section_s": time.perf_counter() - t0}
    except _Skip as e:
        b.report.skipped[name] = str(e)
        b.say(f"skip {name}: {e}")
    except Exception as e:  # a benchmark reports a broken section and goes on to the next
        traceback.print_exc()
        sys.stderr.flush()
        b.report.errors[name] = f"{type(e).__name__}: {e}"
        b.say(f"error in {name}: {type(e).__name__}: {str(e)[:300]}")
        try:
            b.use_engine(None)  # its state is unknown: the next section starts a fresh one
            b.use_peer(None)
        except Exception:  # freeing after a CUDA error can fail too; the next section will say
            traceback.print_exc()


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": plan.device,
    }
    if plan.device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = "CPU"
    env["weights"] = "smoke shapes (tiny)" if plan.device == "cpu" else "real shapes"
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    out = os.environ.get("OUT")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections", default=None, help=f"subset of {SECTIONS} (default: all; --smoke: all "
        "but kernels)"
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the CPU test)")
    p.add_argument(
        "--model-dir-root",
        default=None,
        help="where checkpoints are written "
        "(default: /dev/shm/pdserve-bench if it has room, else /tmp/pdserve-bench)",
    )
    p.add_argument(
        "--out-md",
        default=str(Path(out) / "BENCHMARKS.md") if out else str(REPO / "docs" / "BENCHMARKS.md"),
    )
    p.add_argument(
        "--out-json",
        default=str(Path(out) / "gpu_bench.json") if out else "/tmp/pdserve-gpu-bench.json",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="sections that would start past this many seconds are skipped",
    )
    p.add_argument(
        "--attention-backend", default="auto", choices=["auto", "torch", "triton", "flashinfer"]
    )
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hf-batches", type=int, default=1, help="timed transformers batches")
    p.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True,
        help="time the compiled plain-torch peer beside every decode row",
    )  # fmt: skip
    p.add_argument(
        "--fused-decode", action=argparse.BooleanOptionalAction, default=None,
        help="the Triton decode kernel does the rotary and new-token KV store itself "
        "(attention.TRITON_FUSED_DECODE; default: as the tree sets it)",
    )  # fmt: skip
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.sections is None:
        args.sections = ",".join(plan.default_sections)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}: expected some of {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.budget_s is None:
        args.budget_s = plan.budget_s
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU shapes", file=sys.stderr)
        return 2
    command = "python benchmarks/gpu/run_gpu_bench.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.fused_decode is not None:
        from pdserve.kernels import attention

        attention.TRITON_FUSED_DECODE = args.fused_decode
    b = Bench(plan, args, Report(command.strip(), environment(plan)))
    md_path, json_path = Path(args.out_md), Path(args.out_json)
    chosen = args.sections.split(",")
    for name in [s for s in SECTIONS if s in chosen]:
        run_section(b, name)
        b.report.write(md_path, json_path)
    try:
        b.use_engine(None)
        b.use_peer(None)
    except Exception:  # after a CUDA error even freeing can fail; the results are written
        traceback.print_exc()
    b.say(f"done; wrote {md_path} and {json_path}")
    print("\n" + b.report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
