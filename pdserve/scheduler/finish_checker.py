"""Decides, after each sampled token, whether a request is done and why (SGLang's finish_reason)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pdserve.protocol import Finish
from pdserve.scheduler.request import Request

logger = logging.getLogger(__name__)

DecodeFn = Callable[[Sequence[int]], str]

# Stop strings are searched in the decoded tail of the output; this many tokens beyond the longest
# stop string's length (in characters, a safe upper bound on its tokens) cover any token split.
_TAIL_MARGIN = 4


class FinishChecker:
    def __init__(
        self, eos_token_ids: Sequence[int], max_context_len: int, decode: DecodeFn | None = None
    ) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context_len = max_context_len
        self.decode = decode

    def check(self, req: Request, advance_grammar: bool = True) -> Finish | None:
        """The finish reason if the token just appended to req.output_ids ends it, else None.
        A constrained request's grammar advances past the token here (see worker/grammar.py),
        unless `advance_grammar` is False: the caller feeds the matcher itself and applies
        `grammar_finish`, whose verdict comes first."""
        params = req.sampling
        num_out = len(req.output_ids)
        last = req.output_ids[-1]
        if req.grammar is not None and advance_grammar:
            grammar_end = _advance_grammar(req, last)
            if grammar_end is not None:
                return grammar_end
        if num_out >= params.min_new_tokens:
            if last in params.stop_token_ids or (
                not params.ignore_eos and last in self.eos_token_ids
            ):
                return Finish.stop(last)
            if params.stop:
                matched = self._match_stop_string(req)
                if matched is not None:
                    return Finish.stop(matched)
        if num_out >= params.max_new_tokens:
            return Finish.at_length(num_out)
        if len(req.prompt_ids) + num_out >= self.max_context_len:
            return Finish.at_length(num_out)
        return None

    def _match_stop_string(self, req: Request) -> str | None:
        stops = req.sampling.stop
        if not stops or self.decode is None:
            return None
        window = max(len(s) for s in stops) + _TAIL_MARGIN
        tail = self.decode(req.output_ids[-window:])
        # A stop string first appears at the end of the output, so checking the tail each step
        # finds it on the step it completes.
        for stop in stops:
            if stop in tail:
                return stop
        return None


def _advance_grammar(req: Request, token_id: int) -> Finish | None:
    """Feed the request's grammar matcher its new token: a stop once the grammar is complete
    (whatever min_new_tokens says: nothing else may follow), an abort if the grammar refuses the
    token (the sampler masks what it does not allow, so this is a bug, never the client's) or
    could not be compiled."""
    problem = req.grammar.problem()  # waits for a compile still running
    if problem is not None:
        return Finish.abort(problem)
    return grammar_finish(req, token_id, req.grammar.accept_token(token_id))


def grammar_finish(
    req: Request, token_id: int, accepted: bool, terminated: bool | None = None
) -> Finish | None:
    """How the request ends after its matcher was fed `token_id` (`accepted`: whether the grammar
    took it; `terminated`: whether the grammar is now complete, asked of the matcher when None),
    or None while the grammar goes on."""
    if not accepted:
        logger.error("request %s: token %d breaks its grammar", req.rid, token_id)
        return Finish.abort(f"internal error: token {token_id} breaks the request's grammar", 500)
    if terminated is None:
        terminated = req.grammar.ended_by(token_id)
    if terminated:
        return Finish.stop(token_id)
    return None
