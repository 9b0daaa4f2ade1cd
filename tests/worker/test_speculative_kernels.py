"""The Triton tree-attention kernel (kernels/triton_tree_attention.py) against its torch
reference on random draft trees over scattered pages: on CPU under Triton's interpreter (a child
process, as TRITON_INTERPRET must be set before triton is imported), on CUDA directly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import random, sys
    import torch
    from pdserve.kernels.tree_attention_ref import tree_extend_attention_ref
    from pdserve.kernels.triton_tree_attention import tree_attention
    from pdserve.worker.speculative.draft_tree import DraftTree

    device = sys.argv[1]
    rng = random.Random(0)
    torch.manual_seed(0)
    for heads, kv_heads, dim, page in [(4, 2, 16, 4), (8, 8, 24, 16), (6, 1, 32, 1)]:
        trees, prefixes = [], []
        for _ in range(3):
            n = rng.randint(0, 9)
            trees.append(DraftTree(list(range(n)), [rng.randint(0, i) for i in range(n)]))
            prefixes.append(rng.choice([0, 1, 5, 70]))
        masks = [t.ancestor_mask() for t in trees]
        width = max(m.shape[0] for m in masks)
        total = sum(m.shape[0] for m in masks)
        mask = torch.zeros(total, width, dtype=torch.bool)
        row = 0
        for m in masks:
            mask[row : row + m.shape[0], : m.shape[0]] = m
            row += m.shape[0]
        seq_lens = [p + m.shape[0] for p, m in zip(prefixes, masks)]
        pages_per = -(-max(seq_lens) // page)
        perm = torch.randperm(3 * pages_per + 8)[: 3 * pages_per] + 1
        table = perm.view(3, pages_per).to(torch.int32)
        k = torch.randn(3 * pages_per + 9, page, kv_heads, dim)
        v = torch.randn_like(k)
        q = torch.randn(total, heads, dim)
        args = (table, seq_lens, [m.shape[0] for m in masks], prefixes, mask, 0.25)
        ref = tree_extend_attention_ref(q, k, v, *args)
        dev = [t.to(device) for t in (q, k, v, table, mask)]
        out = tree_attention(dev[0], dev[1], dev[2], dev[3], *args[1:4], dev[4], 0.25)
        err = (out.cpu() - ref).abs().max().item()
        assert err < 1e-4, (heads, kv_heads, dim, page, err)
    print("ok")
    """
)


def test_triton_tree_attention_matches_the_reference() -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
