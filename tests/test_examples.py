"""The scripts in examples/ run as their users run them, with their command lines: output shape.

Clusters: custom_server.py's Engine (a process of its own: it is stopped by Ctrl-C), the session's
prefill + decode cluster (tests/conftest.py, shared with tests/e2e) for the client examples
(--base-url), and the two --launch examples' own. Every example but custom_server.py runs as
`__main__` in this process (tests/example_runner.py), the Engine ones with --in-process: a
process of their own would spend most of its time importing torch and transformers.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pdserve.entrypoints.launch import Cluster, _free_port
from tests.example_runner import EXAMPLES, run_example_in_process

pytestmark = pytest.mark.slow

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def pd_url(pd_cluster: Cluster) -> str:
    """The session's prefill + decode cluster (tests/conftest.py; its router keeps the batch
    examples' files in a temporary folder)."""
    return pd_cluster.url


RunClient = Callable[..., str]


@pytest.fixture
def run_client(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunClient:
    """What a client example (HTTP to a running server) printed, run as __main__ in this process
    with its command line: a process of its own spent most of its time on imports."""

    def run(script: str, *args: str) -> str:
        return run_example_in_process(script, list(args), monkeypatch, capsys)

    return run


@pytest.mark.parametrize(
    ("script", "markers"),
    [
        ("engine/launch_engine.py", ["Generated text: ", "Finish reason: {'type'"]),
        ("engine/offline_batch_inference.py", ["Prompt: The future of AI is\nGenerated text:"]),
        ("token_in_token_out/token_in_token_out_llm_engine.py", ["Generated token ids: ["]),
        ("engine/embedding.py", ["Embedding vector: [", "Dimensions: 64"]),  # a causal LM pooled
        ("hidden_states/hidden_states_engine.py", ["Hidden states: (", "Prompt_Tokens: "]),
    ],
)
def test_engine_example(
    tiny_llama: Path,
    script: str,
    markers: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--model", str(tiny_llama), "--device", "cpu", "--in-process"]
    out = run_example_in_process(script, args, monkeypatch, capsys)
    for marker in markers:
        assert marker in out, out
    if "offline_batch" in script or "token_in_token_out" in script or "embedding" in script:
        assert out.count("===============================") == 4, out


def test_custom_server(tiny_llama: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, str(EXAMPLES / "engine/custom_server.py")]
    args = ["--model", str(tiny_llama), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # uvicorn binds its port once the Engine has started
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "custom_server.py did not start"
            try:
                httpx.get(f"{url}/docs", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "The capital of France is"}
        res = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert res.status_code == 200 and res.text, res.text
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as res:
            assert res.status_code == 200
            pieces = [piece for piece in res.iter_text() if piece]
        assert pieces, "no streamed text"
        assert httpx.post(f"{url}/generate", json={}, timeout=10).status_code == 422
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn stops, the lifespan stops the Engine
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "engine ready" in out and "Application shutdown complete" in out, out


def test_token_in_token_out_server(tiny_llama: Path, pd_url: str, run_client: RunClient) -> None:
    script = "token_in_token_out/token_in_token_out_llm_server.py"
    out = run_client(script, "--base-url", pd_url, "--model", str(tiny_llama), "--device", "cpu")
    assert out.count("Generated token ids: [") == 4, out


def test_openai_chat_with_response_prefill(
    tiny_llama: Path, pd_url: str, run_client: RunClient
) -> None:
    script = "openai_chat_with_response_prefill.py"
    out = run_client(script, "--base-url", pd_url, "--model", str(tiny_llama), "--device", "cpu")
    assert "Continuation: " in out and "Full answer:\n{\n" in out, out


def test_structured_output(pd_url: str, run_client: RunClient) -> None:
    out = run_client("structured_output.py", "--base-url", pd_url)
    product = json.loads(out.split("Product: ", 1)[1].split("\n", 1)[0])
    assert product["color"] in ("black", "white", "red") and 0 <= product["price"] <= 1000, out
    assert re.search(r"\nDate: \d{4}-\d{2}-\d{2}\n", out), out
    tagged = re.search(r"\nTagged: <price>(.*)</price>\n", out, re.DOTALL)
    assert tagged and json.loads(tagged.group(1))["usd"] >= 0, out


def test_tool_calling(pd_url: str, run_client: RunClient) -> None:
    out = run_client("tool_calling.py", "--base-url", pd_url)
    call = re.search(r"\nCall: get_weather\((.*)\)\n", "\n" + out)
    assert call, out
    arguments = json.loads(call.group(1))
    assert arguments["city"] in ("Paris", "Oslo", "Lima") and 1 <= arguments["days"] <= 7, out
    assert "\nAnswer: " in out, out


def test_openai_batch_chat(pd_url: str, run_client: RunClient) -> None:
    out = run_client("openai_batch_chat.py", "--base-url", pd_url, "--max-tokens", "8",
                     "--poll-interval", "0.2")  # fmt: skip
    assert "Batch job status: completed" in out, out
    assert "request-1: " in out and "request-2: " in out, out


def test_openai_batch_complete(pd_url: str, run_client: RunClient) -> None:
    out = run_client("openai_batch_complete.py", "--base-url", pd_url, "--max-tokens", "8",
                     "--poll-interval", "0.2")  # fmt: skip
    assert "Batch job status: completed" in out, out
    assert all(f"request-{i}: " in out for i in (1, 2, 3)), out
    assert "Cancelled batch: cancelled, " in out and " of 20 answered" in out, out


def test_vertex_predict(pd_url: str, run_client: RunClient) -> None:
    out = run_client("vertex_predict.py", "--base-url", pd_url)
    assert out.count("\nPrediction: ") == 2 and "({'type': '" in out, out  # repr quotes vary


def test_hidden_states_server(pd_url: str, run_client: RunClient) -> None:
    out = run_client("hidden_states/hidden_states_server.py", "--base-url", pd_url)
    assert out.count("Hidden states: (") == 2 and "Prompt_Tokens: " in out, out


# The two --launch examples run as __main__ in this process: the cluster they start is processes
# of its own either way; a process for the script itself only added torch's and transformers'
# import.


def test_reward_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdserve.tiny_model.pooling_models import build_tiny_reward_model

    model = build_tiny_reward_model(tmp_path / "reward")
    url = f"http://127.0.0.1:{_free_port()}"
    args = ["--launch", "--base-url", url, "--model", str(model), "--device", "cpu"]
    out = run_example_in_process("reward_model.py", args, monkeypatch, capsys)
    assert out.count("reward: ") == 2, out


def test_lora(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its own server (--launch): the shared one has no adapters.
    url = f"http://127.0.0.1:{_free_port()}"
    args = ["--launch", "--device", "cpu", "--model", str(tiny_llama), "--base-url", url]
    out = run_example_in_process("lora.py", args, monkeypatch, capsys)
    names = [line.split(":")[0] for line in out.splitlines() if line.startswith("Adapter ")]
    assert names == ["Adapter test_lora", "Adapter lora1", "Adapter None", "Adapter lora1",
                     "Adapter test_lora"], out  # fmt: skip
