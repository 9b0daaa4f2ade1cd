"""The compiled plain-torch peer (torch_peer.py) under the same workloads as pdserve's decode rows,
held to the same roofline, and its greedy output checked against pdserve's engine and against a
float32 reference of the same weights."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from device_timer import wall
from engine_bench import Roofline, random_prompts
from torch_peer import TorchPeer, reference_logits

# max |peer - float32 reference| / max |reference| over the decode steps' logits
LOGITS_TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


def _compile_and_warm(peer: TorchPeer, batch: int, max_len: int) -> float:
    """Seconds the first decode steps at this cache shape took (the compile, when compiled)."""
    peer.ensure_cache(batch, max_len)
    tokens = torch.zeros(batch, dtype=torch.long, device=peer.device)
    positions = torch.zeros(batch, dtype=torch.long, device=peer.device)
    t0 = wall(str(peer.device))
    peer.decode_steps(tokens, positions, 3)  # compile, warm-up run, graph record
    return wall(str(peer.device)) - t0


def _graph_facts() -> dict[str, Any]:
    """Whether inductor skipped CUDA graphs (its counter; the reason is in the log)."""
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def peer_batch1(
    peer: TorchPeer, roof: Roofline, input_len: int, output_len: int, seed: int = 0
) -> dict[str, Any]:
    """One prompt, greedy: the mean time of its decode steps after the first token, as pdserve's
    batch-1 row measures it (a host loop with no synchronize inside)."""
    device = str(peer.device)
    compile_s = _compile_and_warm(peer, 1, input_len + output_len)
    prompt = random_prompts(np.random.default_rng(seed + 1), 1, input_len, roof.spec.vocab_size)
    ids = torch.tensor(prompt, dtype=torch.long, device=peer.device)
    t0 = wall(device)
    first = peer.prefill(ids)
    t1 = wall(device)
    positions = torch.full((1,), input_len, dtype=torch.long, device=peer.device)
    peer.decode_steps(first, positions, output_len - 1)
    t2 = wall(device)
    step_s = (t2 - t1) / (output_len - 1)
    context = input_len + 1 + (output_len - 1) / 2  # mean over the decode steps, as pdserve's
    bytes_per_step = roof.step_bytes([int(context)])
    return {
        "compiled": peer.is_compiled,
        "compile_s": compile_s,
        "prefill_ms": (t1 - t0) * 1e3,
        "decode_step_ms": step_s * 1e3,
        "decode_tok_s": 1 / step_s,
        "cache_len": peer.cache_shape[1],
        "mbu": bytes_per_step / step_s / roof.copy_bw,
        **_graph_facts(),
    }


def peer_large_batch(
    peer: TorchPeer,
    roof: Roofline,
    batch: int,
    context_len: int,
    warmup_steps: int = 3,
    timed_steps: int = 10,
) -> dict[str, Any]:
    """`batch` sequences with cached K/V (random, as a prefill leaves) of `context_len` tokens at
    the first timed step, then decode steps timed one by one (median), as pdserve's batch rows."""
    device = str(peer.device)
    max_len = context_len + timed_steps + 1
    compile_s = _compile_and_warm(peer, batch, max_len)
    start = context_len - warmup_steps
    peer.fill_cache_randomly(start)
    rng = np.random.default_rng(batch)
    tokens = torch.tensor(rng.integers(0, roof.spec.vocab_size, batch), device=peer.device)
    positions = torch.full((batch,), start, dtype=torch.long, device=peer.device)
    tokens = peer.decode_steps(tokens, positions, warmup_steps)
    contexts = [int(positions[0])] * batch
    times = []
    for _ in range(timed_steps):
        t = wall(device)
        tokens = peer.decode_steps(tokens, positions, 1)
        times.append(wall(device) - t)
    step_s = statistics.median(times)
    return {
        "batch": batch,
        "context": contexts[0],
        "cache_len": peer.cache_shape[1],
        "compile_s": compile_s,
        "step_ms": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "ratio_to_roofline": step_s / roof.step_seconds(contexts),
        "mbu": roof.step_bytes(contexts) / step_s / roof.copy_bw,
        **_graph_facts(),
    }


def peer_offline(
    peer: TorchPeer, vocab: int, batch: int, input_len: int, output_len: int, seed: int = 0
) -> dict[str, Any]:
    """One wave of `batch` prompts: prefill (eager, chunked) and `output_len` greedy tokens each.
    Every prompt has the same length, so a wave is what a static batch does best."""
    device = str(peer.device)
    compile_s = _compile_and_warm(peer, batch, input_len + output_len)
    prompts = random_prompts(np.random.default_rng(seed), batch, input_len, vocab)
    ids = torch.tensor(prompts, dtype=torch.long, device=peer.device)
    t0 = wall(device)
    first = peer.prefill(ids)
    positions = torch.full((batch,), input_len, dtype=torch.long, device=peer.device)
    peer.decode_steps(first, positions, output_len - 1)
    seconds = wall(device) - t0
    return {
        "batch": batch,
        "input_len": input_len,
        "output_len": output_len,
        "compile_s": compile_s,
        "seconds": seconds,
        "output_tokens": batch * output_len,
        "output_tok_s": batch * output_len / seconds,
        **_graph_facts(),
    }


def check_against_engine(
    engine: Any, peer: TorchPeer, vocab: int, prompt_len: int = 16, num_new: int = 16
) -> dict[str, Any]:
    """The peer's greedy tokens against pdserve's for one short prompt; and, since bf16 near-ties
    may break differently, the peer's decode-step logits against a float32 forward of the same
    weights over the same tokens. It passes when the tokens are equal or the logits are close."""
    prompt = random_prompts(np.random.default_rng(1234), 1, prompt_len, vocab)[0]
    sampling = {"max_new_tokens": num_new, "temperature": 0, "ignore_eos": True}
    ours = engine.generate(input_ids=prompt, sampling_params=sampling)["output_ids"]
    t0 = time.perf_counter()
    gen = peer.generate([prompt], num_new)
    peer_ids = gen.token_ids[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, peer_ids)) if a != b), len(peer_ids))
    ref = reference_logits(peer, prompt + peer_ids[:-1])  # [prompt_len + num_new - 1, V]
    ref_steps = ref[prompt_len:]  # the rows each decode step predicted
    err = (gen.decode_logits[0] - ref_steps).abs().max().item()
    rel = err / max(ref_steps.abs().max().item(), 1e-9)
    argmax_agree = (ref[prompt_len - 1 :].argmax(-1).cpu() == gen.token_ids[0].cpu()).float()
    # Where pdserve and the peer first differ, how far apart float32 puts the two choices: a gap
    # within bf16's error is a near-tie, not a bug on either side.
    row = ref[prompt_len - 1 + same] if same < len(peer_ids) else None
    gap = None if row is None else (row[ours[same]] - row[peer_ids[same]]).item()
    ours_ref = reference_logits(peer, prompt + ours[:-1])[prompt_len - 1 :].argmax(-1).cpu()
    ours_agree = (ours_ref == torch.tensor(ours)).float().mean().item()
    tol = LOGITS_TOLERANCE.get(peer.dtype, 5e-2)
    del ref, ref_steps, row  # the float32 copy of the model is gone with them
    if peer.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "prompt_len": prompt_len,
        "num_new": num_new,
        "pdserve_ids": ours,
        "peer_ids": peer_ids,
        "tokens_equal": ours == peer_ids,
        "equal_prefix": same,
        "logits_max_rel_err": rel,
        "logits_tolerance": tol,
        "peer_argmax_vs_fp32": argmax_agree.mean().item(),
        "pdserve_argmax_vs_fp32": ours_agree,
        "fp32_gap_at_divergence": gap,  # float32 logit of pdserve's choice - the peer's
        "logits_abs_err": err,
        "logits_ok": rel <= tol,
        "passed": ours == peer_ids or rel <= tol,
        "check_s": time.perf_counter() - t0,
    }
