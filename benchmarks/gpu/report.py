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

TARGET_MBU = {"b1": 0.70, "b1_8b": 0.85}
TARGET_BATCH64_RATIO = 1.5
TARGET_OFFLINE_VS_HF = 20.0
TARGET_KV_RATIO = 0.5
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
    return [
        (f"decode batch 1, {r['model']}, {r['input_len']} in / {r['output_tokens']} out: tok/s",
         f"{r['decode_tok_s']:.0f} ({r['decode_step_ms']:.2f} ms/step)",
         f"{r['roofline_tok_s']:.0f} (roofline)", f"MBU {r['mbu']:.0%}",
         f"MBU >= {target:.0%}: {_met(r['mbu'] >= target)}"),
    ]  # fmt: skip


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
    return rows or [(what, ours, "-", "-", "-")]


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


def size_text(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"
