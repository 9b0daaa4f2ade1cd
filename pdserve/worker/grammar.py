"""Constrained decoding: each constrained request's grammar matcher on the worker that samples.

Placeholder until structured output lands (issue 18): requests carry no grammar yet.
"""

from __future__ import annotations

from pdserve.scheduler.request import Request


def bind_grammar(req: Request, vocab_size: int) -> None:
    """Give req its grammar matcher when its sampling parameters ask for constrained output;
    ValueError naming the problem when the grammar cannot be compiled."""
    req.grammar = None
