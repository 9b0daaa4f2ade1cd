"""Tensor parallelism on CPU with gloo: the sharded decoder against tp 1 and transformers.

One spawn of 4 gloo ranks serves the module: ranks 0-1 form a tp 2 group (the tiny models' 2 KV
heads split, one per rank) for every arch, and all 4 a tp 4 group (4 query heads over 2 KV heads:
each KV head replicated on two ranks) for llama (replication does not depend on the arch). Each group runs the same greedy generation over fresh random prompts
(a ragged prefill, then batched decode steps over the paged pool); rank 0 saves its tokens and
logits for the checks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models import load_model
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup, group_of

ARCHS = ("llama", "qwen2", "qwen3")
PAGE_SIZE = 4
NUM_NEW_TOKENS = 6
WORLD = 4


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    lens = [5, 9, 3]
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lens]


def _greedy(path: Path, prompts: list[list[int]], tp: TPGroup) -> tuple[list, list]:
    """(new token ids per prompt, [steps] logits [B, V]) of a greedy run with pdserve's model."""
    config = ModelConfig.from_hf(path)
    model = load_model(config, path, torch.float32, "cpu", "torch", tp)
    max_pages = -(-(max(map(len, prompts)) + NUM_NEW_TOKENS) // PAGE_SIZE)
    pool = KVPool(config, 1 + len(prompts) * max_pages, PAGE_SIZE, torch.float32, "cpu", tp)
    table = torch.tensor(
        [[1 + b * max_pages + p for p in range(max_pages)] for b in range(len(prompts))],
        dtype=torch.int32,
    )  # [B, max_pages]
    seqs = [list(p) for p in prompts]
    new_lens = [len(p) for p in prompts]  # tokens each sequence adds this step
    all_logits = []
    for _ in range(NUM_NEW_TOKENS):
        ids, positions, slots, logit_idx = [], [], [], []
        for b, seq in enumerate(seqs):
            for pos in range(len(seq) - new_lens[b], len(seq)):
                ids.append(seq[pos])
                positions.append(pos)
                slots.append(int(table[b, pos // PAGE_SIZE]) * PAGE_SIZE + pos % PAGE_SIZE)
            logit_idx.append(len(ids) - 1)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            slots=torch.tensor(slots),
            page_table=table,
            seq_lens=torch.tensor([len(s) for s in seqs], dtype=torch.int32),
            seq_lens_cpu=[len(s) for s in seqs],
            extend_lens_cpu=list(new_lens),
            logit_idx=torch.tensor(logit_idx),
            is_decode=all(n == 1 for n in new_lens),
        )
        with torch.inference_mode():
            logits = model(batch, pool)  # [B, V] float32
        all_logits.append(logits)
        for seq, token in zip(seqs, logits.argmax(-1).tolist()):
            seq.append(token)
        new_lens = [1] * len(seqs)
    return [s[len(p) :] for s, p in zip(seqs, prompts)], all_logits


def _rank_main(rank: int, port: int, paths: dict[str, Path], out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    tp2_group = dist.new_group([0, 1])  # every rank takes part in creating it
    results = {}
    for arch in ARCHS:
        prompts = torch.load(out / f"{arch}_prompts.pt")
        if rank < 2:
            results[(arch, 2)] = _greedy(paths[arch], prompts, group_of(tp2_group, rank, 2))
        if arch == "llama":
            results[(arch, 4)] = _greedy(paths[arch], prompts, group_of(dist.group.WORLD, rank, 4))
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    prompts = {}
    for arch in ARCHS:
        prompts[arch] = _prompts(ModelConfig.from_hf(tiny_models[arch]).vocab_size)
        torch.save(prompts[arch], out / f"{arch}_prompts.pt")
    mp.spawn(_rank_main, args=(_free_port(), dict(tiny_models), out), nprocs=WORLD)
    return {"prompts": prompts, "results": torch.load(out / "results.pt")}


@pytest.mark.parametrize(("arch", "tp_size"), [*((arch, 2) for arch in ARCHS), ("llama", 4)])
def test_tp_greedy_tokens_and_logits_equal_tp1(
    tp_run: dict, tiny_models: dict[str, Path], arch: str, tp_size: int
) -> None:
    prompts = tp_run["prompts"][arch]
    want_tokens, want_logits = _greedy(tiny_models[arch], prompts, SINGLE)
    tokens, logits = tp_run["results"][(arch, tp_size)]
    assert tokens == want_tokens
    for step, (got, want) in enumerate(zip(logits, want_logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_greedy_tokens_equal_transformers(
    tp_run: dict, tiny_models: dict[str, Path], arch: str
) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_models[arch], torch_dtype=torch.float32
    ).eval()
    tokens, logits = tp_run["results"][(arch, 2)]
    for b, prompt in enumerate(tp_run["prompts"][arch]):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NUM_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            first_logits = hf(torch.tensor([prompt])).logits[0, -1]
        assert tokens[b] == out[0, len(prompt) :].tolist()
        torch.testing.assert_close(logits[0][b], first_logits, atol=1e-4, rtol=1e-4)
