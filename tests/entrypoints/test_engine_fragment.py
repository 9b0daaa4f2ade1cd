"""The torchrun engine: examples/engine/offline_batch_inference_torchrun.py under
`torchrun --nproc_per_node=4` on CPU (tp 2 x dp 2, gloo). Each dp group's rank 0 prints its share
of the prompts, and greedy texts equal the tp 1 in-process engine's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.entrypoints.engine import Engine

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).parents[2] / "examples" / "engine" / "offline_batch_inference_torchrun.py"
PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
MAX_NEW_TOKENS = 8
# A small KV pool per rank: four ranks sizing theirs from memory (up to 2 GiB each) made the
# run twice as long on a 2-core box, for pages these four prompts never touch.
NUM_PAGES = 256


def test_torchrun_tp2_dp2_example_prints_tp1_greedy_texts(tiny_llama: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=4", str(EXAMPLE), "--model", str(tiny_llama)]
    cmd += ["--device", "cpu", "--tp-size", "2", "--dp-size", "2", "--temperature", "0"]
    cmd += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--num-pages", str(NUM_PAGES)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    greedy = {"temperature": 0, "top_p": 0.95, "max_new_tokens": MAX_NEW_TOKENS}
    with Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=NUM_PAGES) as engine:
        want = engine.generate(PROMPTS, greedy)
    for i, (prompt, result) in enumerate(zip(PROMPTS, want)):
        line = f"[dp {i % 2}] Prompt: {prompt}\nGenerated text: {result['text']!r}"
        assert line in out.stdout, out.stdout
