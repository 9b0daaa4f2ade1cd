"""The benchmark's results: raw numbers per section (JSON) and the short table (markdown) built from
them, rewritten after every section so that a run cut short still leaves what it measured."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Readings on the H100 of the shared device README (2026-11-25), shown beside the measured ones.
README_COPY_GB_S = 3000.0
README_MATMUL_TFLOPS = 800.0
NANO_VLLM_README_TOK_S = 1434.13  # nano-vllm's README: RTX 4070 Laptop, Qwen3-0.6B, same workload

TARGET_MBU = {"b1": 0.55, "b1_8b": 0.85}  # issue 17
TARGET_BATCH64_RATIO = 1.5
TARGET_OFFLINE_VS_HF = 20.0
TARGET_KV_RATIO = 0.5
# pdserve's speed over the compiled plain-torch peer's (issue 17); per row kind
TARGET_VS_PEER = {"b1": 1.25, "b1_8b": 1.1, "batch": 1.25, "offline": 1.5}
_TABLE_HEADER = "| what | pdserve | reference | ratio | target |\n|---|---|---|---|---|"


@dataclass
class Report:
    command: str
    environment: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        s = self.sections
        rows = _ceiling_rows(s.get("ceilings"))
        for key in ("b1", "b1_8b"):
            rows += _b1_rows(key, s.get(key))
        rows += _batch_rows(s.get("batch"))
        rows += _offline_rows(s.get("offline"), s.get("hf"), s.get("hf_static"))
        rows += _nano_rows(s.get("nano"))
        rows += _serve_rows(s.get("serve"))
        rows += _kv_rows(s.get("kv"))
        rows += _kernel_rows(s.get("kernels"))
        return rows

    def markdown(self) -> str:
        env = self.environment
        lines = [
            "## GPU benchmark: `benchmarks/gpu/run_gpu_bench.py`",
            "",
            f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
            f"transformers {env.get('transformers', '?')}, {env.get('date', '?')}; "
            f"random weights, {env.get('weights', 'real shapes')}. Command:",
            "",
            f"    {self.command}",
            "",
            _TABLE_HEADER,
            *("| " + " | ".join(row) + " |" for row in self.rows()),
        ]
        notes = [
            f"- `{k}`: {r['engine']['note']}"
            for k, r in self.sections.items()
            if (r.get("engine") or {}).get("note")
        ]
        serve = self.sections.get("serve") or {}
        if env.get("device") == "cuda" and serve.get("cuda_graph") is False:
            notes.append("- `serve`: workers ran with cuda_graph=False")
        notes += [
            f"- error in `serve` ({mode}): {serve[f'{mode}_error'].splitlines()[0][:300]}"
            for mode in ("mixed", "pd")
            if f"{mode}_error" in serve
        ]
        notes += _peer_notes(self.sections)
        notes += [f"- skipped `{k}`: {v}" for k, v in self.skipped.items()]
        notes += [f"- error in `{k}`: {v.splitlines()[0][:300]}" for k, v in self.errors.items()]
        if notes:
            lines += ["", *notes]
        return "\n".join(lines) + "\n"

    def write(self, md_path: Path, json_path: Path) -> None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(self.markdown())
        data = {
            "command": self.command,
            "environment": self.environment,
            "sections": self.sections,
            "errors": self.errors,
            "skipped": self.skipped,
            "table": [list(r) for r in self.rows()],
        }
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- rows per section


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ceiling_rows(c: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not c:
        return []
    copy, tflops = c["copy_gb_s"], c["matmul_tflops"]
    return [
        ("device copy bandwidth, GB/s (read + write)", f"{copy:.0f}",
         f"{README_COPY_GB_S:.0f} (device README)", f"{copy / README_COPY_GB_S:.2f}", "-"),
        (f"{c['matmul_dtype']} matmul {c['matmul_n']}^3, TFLOP/s", f"{tflops:.0f}",
         f"{README_MATMUL_TFLOPS:.0f} (device README)", f"{tflops / README_MATMUL_TFLOPS:.2f}",
         "-"),
    ]  # fmt: skip


def _b1_rows(key: str, r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not r:
        return []
    target = TARGET_MBU[key]
    rows = [
        (f"decode batch 1, {r['model']}, {r['input_len']} in / {r['output_tokens']} out: tok/s",
         f"{r['decode_tok_s']:.0f} ({r['decode_step_ms']:.2f} ms/step)",
         f"{r['roofline_tok_s']:.0f} (roofline)", f"MBU {r['mbu']:.0%}",
         f"MBU >= {target:.0%}: {_met(r['mbu'] >= target)}"),
    ]  # fmt: skip
    peer = r.get("peer")
    if peer:
        ours = f"{r['decode_step_ms']:.2f} (MBU {r['mbu']:.0%})"
        theirs = f"{peer['decode_step_ms']:.2f} (MBU {peer['mbu']:.0%})"
        rows.append(_peer_row("same, ms/step", ours, theirs, peer["decode_step_ms"],
                              r["decode_step_ms"], TARGET_VS_PEER[key]))  # fmt: skip
    return rows


def _peer_row(
    what: str, ours: str, theirs: str, peer_cost: float, our_cost: float, target: float
) -> tuple[str, ...]:
    """A row against the compiled plain-torch peer: ratio = pdserve's speed / the peer's."""
    ratio = peer_cost / our_cost
    return (f"{what} vs compiled plain torch", ours, f"{theirs} (compiled torch, same call)",
            f"{ratio:.2f}x", f">= {target}x: {_met(ratio >= target)}")  # fmt: skip


def _batch_rows(r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    rows = []
    for b in (r or {}).get("batches", []):
        ratio = b["ratio_to_roofline"]
        target = (
            f"<= {TARGET_BATCH64_RATIO}x: {_met(ratio <= TARGET_BATCH64_RATIO)}"
            if b["batch"] == 64
            else "-"
        )
        pure = "" if b["is_pure_decode"] else " (not pure decode!)"
        rows.append(
            (f"decode step, batch {b['batch']} x {b['mean_context']:.0f} ctx, {b['model']}: "
             f"ms{pure}",
             f"{b['step_ms']:.2f}", f"{b['roofline_ms']:.2f} (roofline)", f"{ratio:.2f}x",
             target)
        )  # fmt: skip
        peer = b.get("peer")
        if peer:
            mbu = b["roofline_bytes_ms"] / b["step_ms"]
            ours = f"{b['step_ms']:.2f} (MBU {mbu:.0%})"
            theirs = f"{peer['step_ms']:.2f} (MBU {peer['mbu']:.0%})"
            rows.append(_peer_row("same, ms/step", ours, theirs, peer["step_ms"], b["step_ms"],
                                  TARGET_VS_PEER["batch"]))  # fmt: skip
    return rows


def _offline_rows(
    r: dict[str, Any] | None, hf: dict[str, Any] | None, hf_static: dict[str, Any] | None
) -> list[tuple[str, ...]]:
    if not r:
        return []
    what = (
        f"offline {r['num_prompts']} x ({r['input_len']} in / {r['output_len']} out), "
        f"{r['model']}: output tok/s"
    )
    ours = f"{r['output_tok_s']:.0f}"
    rows = []
    for ref, name, target in ((hf, "HF generate", TARGET_OFFLINE_VS_HF), (hf_static, None, None)):
        if not ref:
            continue
        label = name or "HF static cache + compile"
        ratio = r["output_tok_s"] / ref["output_tok_s"]
        goal = f">= {target:.0f}x: {_met(ratio >= target)}" if target else "-"
        rows.append(
            (what, ours, f"{ref['output_tok_s']:.0f} ({label}, batch {ref['batch']})",
             f"{ratio:.1f}x", goal)
        )  # fmt: skip
    rows = rows or [(what, ours, "-", "-", "-")]
    peer = r.get("peer")
    if peer:
        theirs = f"{peer['output_tok_s']:.0f} (one wave of {peer['batch']})"
        rows.append(_peer_row("same, output tok/s", ours, theirs, 1 / peer["output_tok_s"],
                              1 / r["output_tok_s"], TARGET_VS_PEER["offline"]))  # fmt: skip
    return rows


def _nano_rows(r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not r:
        return []
    return [
        (f"nano-vllm workload ({r['num_seqs']} seqs, {r['total_tokens']} tokens), "
         f"{r['model']}: tok/s", f"{r['output_tok_s']:.0f} ({r['seconds']:.1f} s)",
         f"{NANO_VLLM_README_TOK_S:.0f} (nano-vllm README, RTX 4070 laptop)", "-", "-"),
    ]  # fmt: skip


def _serve_cell(r: dict[str, Any]) -> str:
    failed = f", {r['failed']} failed" if r["failed"] else ""
    return (
        f"{r['output_tok_s']:.0f} tok/s, TTFT {r['mean_ttft_ms']:.0f} ms, "
        f"TPOT {r['mean_tpot_ms']:.1f} ms{failed}"
    )


def _serve_rows(r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not r:
        return []
    what = (
        f"serving {r['model']}, {r['num_prompts']} x ({r['input_len']} in / "
        f"{r['output_len']} out), concurrency {r['max_concurrency']}"
    )
    mixed, pd = r.get("mixed"), r.get("pd")
    rows = []
    if mixed:
        rows.append((f"{what}: mixed worker", _serve_cell(mixed), "-", "-", "-"))
    if pd:
        ref = _serve_cell(mixed) if mixed else "-"
        ratio = f"{pd['output_tok_s'] / mixed['output_tok_s']:.2f}x tok/s" if mixed else "-"
        backend = pd.get("kv_transfer")
        rows.append((f"{what}: prefill + decode ({backend})", _serve_cell(pd), ref, ratio, "-"))
    return rows


def _kv_rows(r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    if not r:
        return []
    rows = []
    copy_gb_s = r["copy_gb_s"]
    check = "" if r["checksum_matches"] else " (pages differ!)"
    for row in r["sizes"]:
        ratio = row["ratio_to_copy"]
        rows.append(
            (f"KV transfer {r['backend']}, {size_text(row['size_bytes'])} of pages{check}: "
             "GB/s payload",
             f"{row['payload_gb_s']:.1f} ({row['median_ms']:.3f} ms)",
             f"{copy_gb_s:.0f} (copy, read + write)", f"{ratio:.0%}",
             f">= {TARGET_KV_RATIO:.0%}: {_met(ratio >= TARGET_KV_RATIO)}")
        )  # fmt: skip
    return rows


def _kernel_rows(r: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """pdserve's paged attention kernel beside FlashInfer's, per (kind, shape, head dim)."""
    if not r:
        return []
    found = {(x["kind"], x["batch"], x["context"], x["head_dim"], x["impl"]): x for x in r["rows"]}
    rows = []
    for (kind, batch, ctx, dim, impl), ours in found.items():
        if impl != "pdserve":
            continue
        rate = "of copy rate" if kind == "decode" else "of matmul rate"
        what = f"paged {kind} attention, {r['dtype']}, {batch} x {ctx}, D{dim}: us ({rate})"
        fi = found.get((kind, batch, ctx, dim, "flashinfer"))
        theirs = f"FlashInfer {_kernel_cell(fi)}" if fi else _no_flashinfer(r, kind, dim)
        ratio = f"{fi['us'] / ours['us']:.2f}x" if fi and "us" in fi and "us" in ours else "-"
        rows.append((what, _kernel_cell(ours), theirs, ratio, "-"))
    return rows


def _no_flashinfer(r: dict[str, Any], kind: str, dim: int) -> str:
    """Why a kernel row has no FlashInfer figure: not installed, or its JIT build's state."""
    if r["flashinfer"] != "available":
        return r["flashinfer"]
    return f"FlashInfer JIT build: {r['flashinfer_warmup'].get(f'{kind}-{dim}', 'not tried')}"


def _kernel_cell(x: dict[str, Any]) -> str:
    if "error" in x:
        return f"error: {x['error'][:80]}"
    share = x["of_copy"] if x["kind"] == "decode" else x["of_matmul"]
    check = "" if x["ok"] else f", check FAILED ({x['max_rel_err']:.1e})"
    return f"{x['us']:.1f} ({share:.0%}{check})"


def _peer_notes(sections: dict[str, dict[str, Any]]) -> list[str]:
    """The peer's correctness checks and errors, one line each."""
    notes = []
    for key in ("b1", "b1_8b"):
        check = ((sections.get(key) or {}).get("peer") or {}).get("check")
        if check:
            verdict = "PASS" if check["passed"] else "**FAIL**"
            notes.append(
                f"- peer check `{key}`: greedy tokens equal pdserve's for "
                f"{check['equal_prefix']}/{check['num_new']}; decode logits vs a float32 forward "
                f"of the same weights: max rel err {check['logits_max_rel_err']:.1e} "
                f"(tol {check['logits_tolerance']:.0e}): {verdict}"
            )
    for key, r in sections.items():
        errors = [r.get("peer_error")] + [b.get("peer_error") for b in r.get("batches", [])]
        notes += [f"- peer error in `{key}`: {e.splitlines()[0][:300]}" for e in errors if e]
    return notes


def size_text(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"
