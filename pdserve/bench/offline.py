"""`pdserve bench offline`: throughput of the in-process Engine on random token-id prompts
(like `vllm bench throughput`): every request generates exactly its output length, greedily."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pdserve.bench.datasets import BenchRequest, load_tokenizer, random_token_requests, token_pool
from pdserve.bench.stats import OfflineSummary, format_offline_table, summarize_offline
from pdserve.config.engine_config import SCHEDULER_KEYS, EngineConfig

logger = logging.getLogger(__name__)

# Engine options the CLI may carry; `seed` stays out: --seed picks the prompts (decoding is greedy).
ENGINE_OPTION_KEYS = tuple(
    f.name
    for f in dataclasses.fields(EngineConfig)
    if f.name not in ("model_path", "scheduler", "seed")
) + tuple(SCHEDULER_KEYS)


@dataclass(frozen=True)
class OfflineConfig:
    """One offline run; the Engine's own options travel separately, as `engine_options`."""

    model: str
    dataset: str = "random"
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    num_prompts: int = 1000
    seed: int = 0
    warmup: int = 0  # requests run (and not timed) before the measured batch

    def __post_init__(self) -> None:
        checks = [
            (self.dataset == "random", "dataset", "'random'"),
            (self.input_len >= 1, "input_len", ">= 1"),
            (self.output_len >= 1, "output_len", ">= 1"),
            (0.0 <= self.range_ratio < 1.0, "range_ratio", "in [0, 1)"),
            (self.num_prompts >= 1, "num_prompts", ">= 1"),
            (self.warmup >= 0, "warmup", ">= 0"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid: expected {expected}")


def _sampling(req: BenchRequest) -> dict[str, Any]:
    return {"max_new_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0}


def _make_engine(model: str, engine_options: dict[str, Any]) -> Any:
    """The in-process Engine; asks for `in_process=True` where the Engine knows that option."""
    from pdserve.entrypoints.engine import Engine

    options = dict(engine_options)
    config_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    if "in_process" in inspect.signature(Engine).parameters or "in_process" in config_keys:
        options["in_process"] = True
    return Engine(model, **options)


def _generate(engine: Any, requests: list[BenchRequest]) -> tuple[int, float]:
    """Run one batch; returns (output tokens, seconds)."""
    start = time.perf_counter()
    outputs = engine.generate(
        input_ids=[list(r.prompt) for r in requests],
        sampling_params=[_sampling(r) for r in requests],
    )
    duration = time.perf_counter() - start
    return sum(len(o["output_ids"]) for o in outputs), duration


def run_offline(
    config: OfflineConfig, engine_options: dict[str, Any]
) -> tuple[OfflineSummary, list[BenchRequest]]:
    pool = token_pool(load_tokenizer(config.model))

    def sample(num: int, seed: int) -> list[BenchRequest]:
        return random_token_requests(
            num, config.input_len, config.output_len, config.range_ratio, seed, pool
        )

    # Warm-up prompts come from another seed: the measured ones neither change with --warmup nor
    # hit the prefix cache it filled.
    requests, warmups = (
        sample(config.num_prompts, config.seed),
        sample(config.warmup, config.seed + 1),
    )
    engine = _make_engine(config.model, engine_options)
    with engine:
        if warmups:
            _generate(engine, warmups)
        num_output, duration = _generate(engine, requests)
    num_input = sum(r.prompt_len for r in requests)
    return summarize_offline(len(requests), num_input, num_output, duration), requests


def handle(args: Any) -> int:
    """`pdserve bench offline`: run, print the table, write --output-json."""
    config = OfflineConfig(
        **{name: getattr(args, name) for name in OfflineConfig.__dataclass_fields__}
    )
    engine_options = {k: getattr(args, k) for k in ENGINE_OPTION_KEYS if hasattr(args, k)}
    summary, requests = run_offline(config, engine_options)
    print(format_offline_table(summary))
    if args.output_json:
        result = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": asdict(config),
            "engine_options": engine_options,
            **asdict(summary),
            "input_lens": [r.prompt_len for r in requests],
        }
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
