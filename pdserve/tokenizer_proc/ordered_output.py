"""One request's output on its way back to the router: the pieces of TokenOuts that carry its
tokens, buffered and released in index order as ReqOutput deltas.

Tokens of one request can arrive out of order (prefill's first token races the decode worker's
later ones, and a finish can come first); a resend that overlaps what was released keeps only the
rest; an abort ends the request at once, even with tokens still missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pdserve.protocol import Finish, ReqOutput, TokenOut
from pdserve.tokenizer_proc.incremental_detokenizer import (
    IncrementalDetokenizer,
    token_texts,
    top_token_texts,
)

logger = logging.getLogger(__name__)


@dataclass
class Piece:
    """One request's share of a TokenOut."""

    ids: list[int]
    finish: Finish | None
    logprobs: list[float] | None
    top_logprobs: list[list[list[float]]] | None
    prompt_tokens: int
    cached_tokens: int
    extra: Extra | None = None  # hidden states, prompt logprobs, an embedding
    spec_verify_ct: int = 0  # the request's speculative verify passes so far


@dataclass
class Extra:
    """A piece's outputs beside its tokens (TokenOut's optional per-request columns)."""

    hidden_states: list[list[float]]
    input_token_logprobs: list[list[float | None]]  # [[token_id, logprob|None], ...]
    input_top_logprobs: list[list[list[float]]]
    embedding: list[float] | None


@dataclass
class ReqState:
    """What the tokenizer remembers about a request between its TokenizedReq and its finish."""

    rid: str
    prompt_len: int
    return_logprob: bool
    top_logprobs_num: int
    detok: IncrementalDetokenizer | None  # None: text not asked for (token in, token out)
    prompt_text: str | None  # echo: sent once, with the first output
    next_idx: int = 0  # output index of the next token to release
    num_cached: int = 0
    num_spec_verify: int = 0
    pending: dict[int, list[Piece]] = field(default_factory=dict)  # by first_idx
    keeps_no_tokens: bool = False  # max_new_tokens 0: the output's tokens are dropped


def accept(tokenizer: Any, state: ReqState, first_idx: int, piece: Piece) -> ReqOutput | None:
    """Buffer one piece of `state`'s request; the output now releasable in index order, if
    any. Once an output carries the finish, the caller forgets the request."""
    if first_idx < state.next_idx:  # a resend overlapping what was released: keep the rest
        logger.warning(
            "rid=%s: tokens from %d resent (next %d)", state.rid, first_idx, state.next_idx
        )
        piece = _drop_first(piece, state.next_idx - first_idx)
        if not piece.ids and piece.finish is None:
            return None
        first_idx = state.next_idx
    state.pending.setdefault(first_idx, []).append(piece)
    released = _pop_in_order(state)
    # An abort ends the request now, even with tokens still missing (they may never come).
    is_abort = piece.finish is not None and piece.finish.is_abort
    if is_abort and not any(p.finish for p in released):
        released.append(Piece([], piece.finish, None, None, 0, 0))
    if not released:
        return None
    return _make_output(tokenizer, state, released)


def _pop_in_order(state: ReqState) -> list[Piece]:
    released: list[Piece] = []
    while state.next_idx in state.pending:
        # Tokens before a bare finish at the same index.
        pieces = sorted(state.pending.pop(state.next_idx), key=lambda p: not p.ids)
        for piece in pieces:
            released.append(piece)
            state.next_idx += len(piece.ids)
            if piece.finish is not None:
                return released
    return released


def _make_output(tokenizer: Any, state: ReqState, pieces: list[Piece]) -> ReqOutput | None:
    if state.keeps_no_tokens:
        pieces = [_without_tokens(p) for p in pieces]
    ids: list[int] = []
    logprobs: list[float] = []
    top: list[list[list[float]]] = []
    finish = None
    text = ""
    prompt_tokens = state.prompt_len
    for piece in pieces:
        ids += piece.ids
        logprobs += piece.logprobs or []
        top += piece.top_logprobs or []
        prompt_tokens = piece.prompt_tokens or prompt_tokens
        state.num_cached = max(state.num_cached, piece.cached_tokens)
        state.num_spec_verify = max(state.num_spec_verify, piece.spec_verify_ct)
        finish = piece.finish
        if state.detok is not None:
            text += state.detok.add_output(piece.ids, piece.finish)
    extras = _extra_fields(tokenizer, [p.extra for p in pieces if p.extra is not None])
    if finish is None and not ids and state.prompt_text is None and not extras:
        return None  # an empty piece: nothing to tell the router
    want_logprobs = state.return_logprob
    want_top = want_logprobs and state.top_logprobs_num > 0
    want_texts = want_logprobs and state.detok is not None  # token in, token out: no texts
    top_texts = top_token_texts(tokenizer, top) if want_top and want_texts else None
    prompt_text, state.prompt_text = state.prompt_text, None
    return ReqOutput(
        **extras,
        rid=state.rid,
        text_delta=text,
        output_ids=ids,
        finish=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=0 if state.keeps_no_tokens else state.next_idx,
        cached_tokens=state.num_cached,
        logprobs=logprobs if want_logprobs else None,
        top_logprobs=top if want_top else None,
        token_texts=token_texts(tokenizer, ids) if want_texts else None,
        prompt_text=prompt_text,
        top_token_texts=top_texts,
        spec_verify_ct=state.num_spec_verify,
    )


def piece_of(msg: TokenOut, i: int) -> Piece:
    return Piece(
        ids=list(msg.token_ids[i]),
        finish=msg.finish[i],
        logprobs=msg.logprobs[i] if msg.logprobs else None,
        top_logprobs=msg.top_logprobs[i] if msg.top_logprobs else None,
        prompt_tokens=msg.prompt_tokens[i] if msg.prompt_tokens else 0,
        cached_tokens=msg.cached_tokens[i] if msg.cached_tokens else 0,
        extra=_extra_of(msg, i),
        spec_verify_ct=msg.spec_verify_ct[i] if msg.spec_verify_ct else 0,
    )


def _extra_of(msg: TokenOut, i: int) -> Extra | None:
    columns = (msg.hidden_states, msg.input_token_logprobs, msg.input_top_logprobs, msg.embeddings)
    if all(c is None for c in columns):
        return None
    return Extra(
        hidden_states=msg.hidden_states[i] if msg.hidden_states else [],
        input_token_logprobs=msg.input_token_logprobs[i] if msg.input_token_logprobs else [],
        input_top_logprobs=msg.input_top_logprobs[i] if msg.input_top_logprobs else [],
        embedding=msg.embeddings[i] if msg.embeddings and msg.embeddings[i] else None,
    )


def _extra_fields(tokenizer: Any, extras: list[Extra]) -> dict[str, Any]:
    """ReqOutput's extra fields from the released pieces' extras; texts decoded here."""
    out: dict[str, Any] = {}
    hidden = [row for e in extras for row in e.hidden_states]
    if hidden:
        out["hidden_states"] = hidden
    prompt = [entry for e in extras for entry in e.input_token_logprobs]
    if prompt:
        ids = [int(entry[0] or 0) for entry in prompt]
        texts = token_texts(tokenizer, ids)
        out["input_token_logprobs"] = [
            [entry[1], tid, text] for entry, tid, text in zip(prompt, ids, texts)
        ]
        tops = [top for e in extras for top in e.input_top_logprobs]
        if any(tops):
            top_texts = top_token_texts(tokenizer, tops)
            out["input_top_logprobs"] = [
                [[lp, int(t), text] for (t, lp), text in zip(row, row_texts)] if row else None
                for row, row_texts in zip(tops, top_texts)
            ]
    embeddings = [e.embedding for e in extras if e.embedding is not None]
    if embeddings:
        out["embedding"] = embeddings[-1]
    return out


def _without_tokens(piece: Piece) -> Piece:
    """A piece of a request that asked for no new tokens: its extras (prompt logprobs, hidden
    states) and its finish, read as a length finish at 0 tokens (an abort stays one)."""
    finish = piece.finish
    if finish is not None and not finish.is_abort:
        finish = Finish.at_length(0)
    return Piece([], finish, None, None, piece.prompt_tokens, piece.cached_tokens, piece.extra)


def _drop_first(piece: Piece, n: int) -> Piece:
    return Piece(
        ids=piece.ids[n:],
        finish=piece.finish,
        logprobs=piece.logprobs[n:] if piece.logprobs else piece.logprobs,
        top_logprobs=piece.top_logprobs[n:] if piece.top_logprobs else piece.top_logprobs,
        prompt_tokens=piece.prompt_tokens,
        cached_tokens=piece.cached_tokens,
        spec_verify_ct=piece.spec_verify_ct,
    )


def error_output(rid: str, message: str) -> ReqOutput:
    """The one final output of a request that failed before it generated anything."""
    return ReqOutput(
        rid=rid,
        text_delta="",
        output_ids=[],
        finish=Finish.abort(message),
        error=message,
    )
