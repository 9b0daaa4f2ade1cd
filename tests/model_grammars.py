"""A request's grammar as a worker binds it, on a real model directory's tokenizer (the tiny
model's), and what its matcher accepts: shared by the tests of constraints built from other
constraints (thinking first, structural tags, strict tool calls, guided_choice)."""

from __future__ import annotations

from pathlib import Path

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.worker.grammar import RequestGrammar, backend_for, bind_grammar


def bound_grammar(model: Path, sampling: SamplingParams) -> RequestGrammar:
    """The grammar `bind_grammar` gives a request with `sampling`, compiled (asserted)."""
    path = str(model)
    req = Request(rid="r", prompt_ids=[1], sampling=sampling)
    bind_grammar(req, backend_for(512, path).vocab_size, path)
    assert req.grammar is not None and req.grammar.problem() is None
    return req.grammar


def takes(g: RequestGrammar, text: str) -> bool:
    """Whether the matcher accepts `text` (as one string: any tokenization of it)."""
    return bool(g.matcher.accept_string(text))


def completes(g: RequestGrammar, text: str) -> bool:
    """`text` is a whole output: accepted, and the grammar may end (its stop token) there."""
    return takes(g, text) and bool(g.matcher.is_completed())
