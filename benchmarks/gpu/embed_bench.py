"""Embedding throughput on one GPU (issue 11): pdserve serving `/v1/embeddings` against the same
model's raw forward, in one call.

1. Writes a random-weight embedding model at Llama-3.2-1B's shape: a bare `LlamaModel` (no
   lm_head), bf16 std 0.02, the padded tiny tokenizer (as `random_checkpoint.py`), and a
   sentence-transformers config: mean pooling, then L2 normalization.
2. References, on the very prompts the server gets (random token ids, exact lengths):
   transformers `AutoModel` forward in batches of `--concurrency` (mean pool + normalize included),
   and pdserve's in-process engine `encode` on all prompts at once.
3. Starts a mixed-worker cluster (`pdserve.entrypoints.launch.Cluster`) and loads it with
   `pdserve bench serve --endpoint embeddings`'s client, per input length and encoding format;
   checks the served vectors against transformers' (cosine) first.

Prints a table last; writes `embed_bench.json`, `embed_bench.md` under $OUT (or --out-dir).
`--smoke`: tiny shapes on the CPU in seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in logs

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# The cluster's processes import pdserve from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import random_checkpoint as rc  # noqa: E402
import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    spec: rc.ModelSpec
    device: str
    dtype: str
    num_prompts: int
    input_lens: tuple[int, ...]
    concurrency: int
    formats: tuple[str, ...]  # encoding formats served at each length
    num_pages: int
    page_size: int
    check_prompts: int = 8  # served vectors compared with transformers'
    text_len: int | None = None  # one more served run with text prompts (the server tokenizes)


FULL = Plan(
    spec=rc.LLAMA_1B, device="cuda", dtype="bfloat16", num_prompts=2000, input_lens=(256, 512),
    concurrency=64, formats=("float", "base64"), num_pages=8192, page_size=16, text_len=256,
)  # fmt: skip
SMOKE = Plan(
    spec=rc.SMOKE_1B, device="cpu", dtype="float32", num_prompts=24, input_lens=(16, 32),
    concurrency=4, formats=("float", "base64"), num_pages=512, page_size=4, text_len=16,
)  # fmt: skip


# ---------------------------------------------------------------------------- the checkpoint


def embedding_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """transformers' `LlamaModel` parameter names and shapes (no `model.` prefix, no lm_head)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    return {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}


def write_sentence_transformers(out: Path, dim: int) -> None:
    """modules.json: Transformer -> mean Pooling -> Normalize."""
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_lasttoken": False,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")


def write_embedding_checkpoint(spec: rc.ModelSpec, out: Path, device: str) -> Path:
    """A random embedding model at `spec`'s shape (reused when complete and of the same spec)."""
    marker = out / "embed_checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == dataclasses.asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    special = rc.write_padded_tokenizer(out, spec.vocab_size, spec.max_position_embeddings)
    config = {**spec.hf_config(special), "architectures": ["LlamaModel"]}
    config["tie_word_embeddings"] = False  # no head to tie
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_sentence_transformers(out, spec.hidden_size)
    shapes = embedding_shapes(out)
    rc._write_shards(shapes, out, device, 4 << 30, seed=0)
    marker.write_text(json.dumps({"spec": dataclasses.asdict(spec)}) + "\n")
    return out


def flops_per_token(spec: rc.ModelSpec, shapes: dict[str, tuple[int, ...]], length: int) -> float:
    """2 per matmul weight, plus causal attention (QK^T and PV over half the context on average)."""
    matmul = sum(s[0] * s[1] for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n)
    attention = 4 * (length / 2) * spec.num_heads * spec.head_dim * spec.num_layers
    return 2 * matmul + attention


# ---------------------------------------------------------------------------- references


def prompts_for(plan: Plan, length: int) -> list[list[int]]:
    """The very token ids `bench serve --tokenizer none --seed 0` sends (the same function)."""
    from pdserve.bench.datasets import build_requests

    reqs = build_requests(None, plan.num_prompts, length, 1, 0.0, 0, plan.spec.vocab_size)
    return [list(r.prompt) for r in reqs]  # type: ignore[arg-type]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_embed(model: Any, batch: list[list[int]], device: str) -> torch.Tensor:
    ids = torch.tensor(batch, device=device)
    states = model(input_ids=ids).last_hidden_state
    return torch.nn.functional.normalize(states.float().mean(dim=1), dim=-1)


def hf_reference(
    plan: Plan, model_dir: Path, prompts: dict[int, list[list[int]]]
) -> dict[str, Any]:
    """transformers forward tok/s per length (batches of `concurrency`, after one warm-up batch),
    and the vectors of the first prompts for the correctness check."""
    from transformers import AutoModel

    dtype = getattr(torch, plan.dtype)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(plan.device).eval()
    out: dict[str, Any] = {"tok_s": {}, "vectors": {}}
    with torch.inference_mode():
        for length, ids in prompts.items():
            b = plan.concurrency
            for _ in range(2):  # warm-up: kernels chosen, allocator grown
                hf_embed(model, ids[:b], plan.device)
            sync(plan.device)
            start = time.perf_counter()
            for i in range(0, len(ids), b):
                hf_embed(model, ids[i : i + b], plan.device)
            sync(plan.device)
            out["tok_s"][length] = len(ids) * length / (time.perf_counter() - start)
            out["vectors"][length] = hf_embed(model, ids[: plan.check_prompts], plan.device).cpu()
    del model
    free_memory()
    return out


def engine_reference(
    plan: Plan, model_dir: Path, prompts: dict[int, list[list[int]]]
) -> dict[int, float]:
    """pdserve's in-process engine: `encode` on all prompts of a length at once, tok/s."""
    from pdserve.entrypoints.engine import Engine

    engine = Engine(
        str(model_dir), in_process=True, device=plan.device, dtype=plan.dtype,
        cuda_graph=False, num_pages=plan.num_pages, page_size=plan.page_size,
    )  # fmt: skip
    tok_s: dict[int, float] = {}
    try:
        for length, ids in prompts.items():
            engine.encode(input_ids=ids[: plan.concurrency])  # warm-up: kernels compile here
            start = time.perf_counter()
            results = engine.encode(input_ids=ids)
            tok_s[length] = len(ids) * length / (time.perf_counter() - start)
            assert len(results) == len(ids) and results[0]["embedding"]
    finally:
        engine.shutdown()
        del engine
        free_memory()
    return tok_s


# ---------------------------------------------------------------------------- the server


def start_cluster(plan: Plan, model_dir: Path) -> Any:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    # cuda_graph=False: a pooling model only prefills, and with graphs on (the default) the
    # worker dies at start on CUDA (CudaGraphRunner calls LlamaForPooling's missing forward).
    topology = Topology.for_model(
        str(model_dir), mode="mixed", device=plan.device, dtype=plan.dtype, port=0,
        num_pages=plan.num_pages, page_size=plan.page_size, cuda_graph=False,
    )  # fmt: skip
    return Cluster(topology, log_level="warning", start_timeout_s=150).start()


def served_cosines(url: str, ids: list[list[int]], reference: torch.Tensor) -> list[float]:
    """Cosine of each served vector (one request per prompt) with transformers' vector."""
    import httpx

    cosines = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for prompt, ref in zip(ids, reference):
            resp = client.post("/v1/embeddings", json={"input": prompt})
            resp.raise_for_status()
            vector = torch.tensor(resp.json()["data"][0]["embedding"])
            cosines.append(float(torch.nn.functional.cosine_similarity(vector, ref, dim=0)))
    return cosines


def serve_load(
    plan: Plan, url: str, length: int, encoding_format: str, text: bool = False
) -> dict[str, Any]:
    """`pdserve bench serve --endpoint embeddings --tokenizer none` with this plan's load; with
    `text`, text prompts built with the served model's tokenizer instead of token ids."""
    from pdserve.bench.serve import ServeConfig, run_serve

    config = ServeConfig(
        base_url=url, endpoint="/v1/embeddings", tokenizer=None if text else "none",
        vocab_size=plan.spec.vocab_size, input_len=length, num_prompts=plan.num_prompts,
        max_concurrency=plan.concurrency, num_warmups=plan.concurrency, disable_tqdm=True,
        encoding_format=encoding_format, timeout_s=300.0,
    )  # fmt: skip
    s = asyncio.run(asyncio.wait_for(run_serve(config), timeout=300.0)).summary
    return {
        "input_len": length, "encoding_format": encoding_format, "completed": s.completed,
        "prompts": "text" if text else "token ids",
        "failed": s.failed, "errors": s.errors, "duration_s": s.duration_s,
        "req_s": s.request_throughput, "tok_s": s.input_throughput,
        "p50_ms": s.e2el_ms.median, "p90_ms": s.e2el_ms.p90, "p99_ms": s.e2el_ms.p99,
    }  # fmt: skip


def serve_section(
    plan: Plan,
    model_dir: Path,
    prompts: dict[int, list[list[int]]],
    results: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Start the cluster, check its vectors, then run the load per length and format."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    cluster = start_cluster(plan, model_dir)
    results["cluster_start_s"] = time.perf_counter() - t0
    try:
        reference = results.pop("_vectors", {})
        for length, ids in prompts.items():
            if length in reference:
                cos = served_cosines(cluster.url, ids[: plan.check_prompts], reference[length])
                results["min_cosine"][str(length)] = min(cos)
        runs = [(n, fmt, False) for n in plan.input_lens for fmt in plan.formats]
        runs += [(plan.text_len, "float", True)] if plan.text_len else []
        for length, fmt, text in runs:
            results["served"].append(serve_load(plan, cluster.url, length, fmt, text))
            print(f"  served: {results['served'][-1]}", flush=True)
            save()
    finally:
        cluster.stop(grace_s=2)


# ---------------------------------------------------------------------------- the report


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(num: float, den: float | None) -> str:
    return f"{num / den:.2f}" if den else "-"


def table(results: dict[str, Any]) -> str:
    """Served rows, each with the same-call references at its length."""
    rows = [
        "| input tokens | format | served req/s | served input tok/s | latency p50 / p90 / p99 ms "
        "| transformers forward tok/s | served / forward | in-process encode tok/s "
        "| served / encode | prompts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["served"]:
        hf = results["hf_tok_s"].get(str(r["input_len"]))
        eng = results["engine_tok_s"].get(str(r["input_len"]))
        latency = f"{r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['p99_ms']:.1f}"
        rows.append(
            f"| {r['input_len']} | {r['encoding_format']} | {r['req_s']:.0f} | {r['tok_s']:.0f} "
            f"| {latency} | {_num(hf)} | {_ratio(r['tok_s'], hf)} | {_num(eng)} "
            f"| {_ratio(r['tok_s'], eng)} | {r['prompts']} |"
        )
    return "\n".join(rows)


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    gpu = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": plan.spec.name + " shape, LlamaModel, mean pooling + normalize, random weights",
        "dtype": plan.dtype,
        "num_prompts": plan.num_prompts,
        "concurrency": plan.concurrency,
    }


def run_step(name: str, results: dict[str, Any], step: Callable[[], None]) -> None:
    """Run one section; a failure is recorded and the next section still runs."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        step()
    except Exception as e:  # a benchmark reports what broke and carries on
        traceback.print_exc()
        results["failures"][name] = f"{type(e).__name__}: {str(e)[:500]}"
    results["seconds"][name] = round(time.perf_counter() - start, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or "/tmp/pdserve-embed-bench")
    p.add_argument("--model-dir", default=None, help="default: under /dev/shm or /tmp")
    args = p.parse_args()
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = "/dev/shm" if Path("/dev/shm").is_dir() and not args.smoke else "/tmp"
    model_dir = Path(args.model_dir or f"{root}/pdserve-embed-{plan.spec.name}")
    results: dict[str, Any] = {"env": environment(plan), "hf_tok_s": {}, "engine_tok_s": {},
                               "min_cosine": {}, "served": [], "failures": {}, "seconds": {}}  # fmt: skip
    prompts: dict[int, list[list[int]]] = {}

    def save() -> None:
        kept = {k: v for k, v in results.items() if not k.startswith("_")}
        (out / "embed_bench.json").write_text(json.dumps(kept, indent=2, default=str) + "\n")

    def checkpoint() -> None:
        write_embedding_checkpoint(plan.spec, model_dir, plan.device)
        shapes = embedding_shapes(model_dir)
        for n in plan.input_lens:
            prompts[n] = prompts_for(plan, n)
            flops = flops_per_token(plan.spec, shapes, n)
            results.setdefault("gflop_per_token", {})[str(n)] = round(flops / 1e9, 3)

    def hf() -> None:
        ref = hf_reference(plan, model_dir, prompts)
        results["hf_tok_s"] = {str(k): v for k, v in ref["tok_s"].items()}
        results["_vectors"] = ref["vectors"]

    def engine() -> None:
        tok_s = engine_reference(plan, model_dir, prompts)
        results["engine_tok_s"] = {str(k): v for k, v in tok_s.items()}

    run_step("checkpoint", results, checkpoint)
    for name, step in (("hf", hf), ("engine", engine)):
        run_step(name, results, step)
        save()
    run_step("serve", results, lambda: serve_section(plan, model_dir, prompts, results, save))
    save()
    report = table(results)
    (out / "embed_bench.md").write_text(report + "\n")
    print(
        json.dumps({k: results[k] for k in ("env", "seconds", "failures", "min_cosine")}, indent=1)
    )
    print(json.dumps({"gflop_per_token": results.get("gflop_per_token")}))
    print(report)
    return 0 if not results["failures"] and results["served"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
