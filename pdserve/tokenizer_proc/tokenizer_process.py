"""The tokenizer process: prompts -> token ids for workers, token ids -> text deltas for the router.

Messages in (one inbox): GenerateReq and Abort from the router, TokenOut from prefill (a request's
first token) and from decode/mixed workers (the rest), Shutdown from the launcher.
Messages out: TokenizedReq to `worker_inboxes[req.decode_idx]`, ReqOutput to the router, Ready
to the launcher. Tokens of one request can arrive out of order (prefill's first token races the
decode worker's later ones, and a finish can come first): they are released in index order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.ipc import AsyncInbox, AsyncOutbox
from pdserve.protocol import (
    Abort,
    Finish,
    GenerateReq,
    Message,
    Ready,
    ReqOutput,
    Shutdown,
    TokenizedReq,
    TokenOut,
)
from pdserve.tokenizer_proc.chat_template import apply_chat_template
from pdserve.tokenizer_proc.incremental_detokenizer import (
    IncrementalDetokenizer,
    token_texts,
    top_token_texts,
)

logger = logging.getLogger(__name__)

_CONFIG_LEN_KEYS = ("max_position_embeddings", "max_sequence_length", "max_seq_len", "n_positions")


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer  # heavy: only when the process starts

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def model_context_len(model_path: str, tokenizer: Any) -> int:
    """The model's own context length: config.json, else the tokenizer's; 0 if neither says."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in _CONFIG_LEN_KEYS:
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else 0


@dataclass
class _Piece:
    """One request's share of a TokenOut."""

    ids: list[int]
    finish: Finish | None
    logprobs: list[float] | None
    top_logprobs: list[list[list[float]]] | None
    prompt_tokens: int
    cached_tokens: int


@dataclass
class _ReqState:
    """What the tokenizer remembers about a request between its TokenizedReq and its finish."""

    rid: str
    prompt_len: int
    return_logprob: bool
    top_logprobs_num: int
    detok: IncrementalDetokenizer | None  # None: text not asked for (token in, token out)
    prompt_text: str | None  # echo: sent once, with the first output
    next_idx: int = 0  # output index of the next token to release
    num_cached: int = 0
    pending: dict[int, list[_Piece]] = field(default_factory=dict)  # by first_idx


class TokenizerCore:
    """The process's logic without sockets: each handler returns the messages to send."""

    def __init__(self, tokenizer: Any, idx: int, max_context_len: int, num_workers: int) -> None:
        self.tokenizer = tokenizer
        self.idx = idx
        self.max_context_len = max_context_len  # 0: no limit known
        self.num_workers = num_workers
        self.vocab_size = len(tokenizer)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.states: dict[str, _ReqState] = {}

    # ------------------------------------------------------------------ requests in

    def on_generate(self, req: GenerateReq) -> tuple[int, TokenizedReq]:
        """Tokenize and check a request; returns (worker index, message). Raises ValueError."""
        if not 0 <= req.decode_idx < self.num_workers:
            raise ValueError(f"decode_idx={req.decode_idx} is out of range (0..{self.num_workers})")
        if req.rid in self.states:
            raise ValueError(f"rid {req.rid!r} is already in flight")
        sampling = SamplingParams.from_dict(req.sampling)
        input_ids = self.prompt_ids(req)
        self.check_length(req, len(input_ids), sampling.max_new_tokens)
        detok = None
        if req.return_text:
            detok = IncrementalDetokenizer.for_request(self.tokenizer, input_ids, sampling)
        prompt_text = None
        if req.echo:
            prompt_text = req.text if req.text is not None else self.tokenizer.decode(input_ids)
        self.states[req.rid] = _ReqState(
            rid=req.rid,
            prompt_len=len(input_ids),
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            detok=detok,
            prompt_text=prompt_text,
        )
        msg = TokenizedReq(
            rid=req.rid,
            input_ids=input_ids,
            sampling=req.sampling,
            tokenizer_idx=self.idx,
            prefill_idx=req.prefill_idx,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
        )
        return req.decode_idx, msg

    def prompt_ids(self, req: GenerateReq) -> list[int]:
        given = [
            name for name in ("text", "messages", "input_ids") if getattr(req, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(f"exactly one of text, messages, input_ids must be given, got {given}")
        if req.messages is not None:
            return apply_chat_template(
                self.tokenizer,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
            )
        if req.text is not None:
            return self.encode_text(req.text)
        return self.check_input_ids(req.input_ids)

    def encode_text(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        ids = list(self.tokenizer.encode(text, add_special_tokens=True))
        # Text that was chat-templated by the caller already starts with BOS: keep just one.
        bos = self.bos_token_id
        if bos is not None and ids[:2] == [bos, bos] and text.startswith(self.tokenizer.bos_token):
            ids = ids[1:]
        return ids

    def check_input_ids(self, input_ids: Any) -> list[int]:
        if not isinstance(input_ids, list):
            raise ValueError(
                f"input_ids must be a list of token ids, got {type(input_ids).__name__}"
            )
        for i, tid in enumerate(input_ids):
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < self.vocab_size:
                raise ValueError(
                    f"input_ids[{i}]={tid!r} is not a token id: expected an integer in "
                    f"[0, {self.vocab_size})"
                )
        return list(input_ids)

    def check_length(self, req: GenerateReq, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise ValueError("the prompt is empty: expected at least one token")
        limits = [n for n in (self.max_context_len, req.max_context_len) if n > 0]
        if not limits:
            return
        limit = min(limits)
        total = prompt_len + max_new_tokens
        if total > limit:
            where = "messages" if req.messages is not None else "prompt"
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{total} tokens ({prompt_len} in the {where}, {max_new_tokens} in the "
                f"completion). Please reduce the length of the {where} or completion."
            )

    def on_abort(self, msg: Abort) -> None:
        if msg.abort_all:
            self.states.clear()
        else:
            self.states.pop(msg.rid, None)

    # ------------------------------------------------------------------ tokens in

    def on_token_out(self, msg: TokenOut) -> list[ReqOutput]:
        """Buffer each request's piece; return the outputs now releasable in index order."""
        outputs = []
        for i, rid in enumerate(msg.rids):
            state = self.states.get(rid)
            if state is None:
                continue  # aborted or finished already: late tokens are expected
            try:
                piece = _piece_of(msg, i)
                out = self._accept(state, msg.first_idx[i], piece)
            except Exception as e:
                logger.exception("rid=%s: detokenizing failed", rid)
                self.states.pop(rid, None)
                out = error_output(rid, f"internal error in tokenizer{self.idx}: {e!r}")
            if out is not None:
                outputs.append(out)
        return outputs

    def _accept(self, state: _ReqState, first_idx: int, piece: _Piece) -> ReqOutput | None:
        if first_idx < state.next_idx:  # a resend overlapping what was released: keep the rest
            logger.warning(
                "rid=%s: tokens from %d resent (next %d)", state.rid, first_idx, state.next_idx
            )
            piece = _drop_first(piece, state.next_idx - first_idx)
            if not piece.ids and piece.finish is None:
                return None
            first_idx = state.next_idx
        state.pending.setdefault(first_idx, []).append(piece)
        released = self._pop_in_order(state)
        # An abort ends the request now, even with tokens still missing (they may never come).
        is_abort = piece.finish is not None and piece.finish.is_abort
        if is_abort and not any(p.finish for p in released):
            released.append(_Piece([], piece.finish, None, None, 0, 0))
        if not released:
            return None
        return self._make_output(state, released)

    def _pop_in_order(self, state: _ReqState) -> list[_Piece]:
        released: list[_Piece] = []
        while state.next_idx in state.pending:
            # Tokens before a bare finish at the same index.
            pieces = sorted(state.pending.pop(state.next_idx), key=lambda p: not p.ids)
            for piece in pieces:
                released.append(piece)
                state.next_idx += len(piece.ids)
                if piece.finish is not None:
                    return released
        return released

    def _make_output(self, state: _ReqState, pieces: list[_Piece]) -> ReqOutput | None:
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
            finish = piece.finish
            if state.detok is not None:
                text += state.detok.add_output(piece.ids, piece.finish)
        if finish is not None:
            self.states.pop(state.rid, None)
        elif not ids and state.prompt_text is None:
            return None  # an empty piece: nothing to tell the router
        want_logprobs = state.return_logprob
        want_top = want_logprobs and state.top_logprobs_num > 0
        want_texts = want_logprobs and state.detok is not None  # token in, token out: no texts
        top_texts = top_token_texts(self.tokenizer, top) if want_top and want_texts else None
        prompt_text, state.prompt_text = state.prompt_text, None
        return ReqOutput(
            rid=state.rid,
            text_delta=text,
            output_ids=ids,
            finish=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=state.next_idx,
            cached_tokens=state.num_cached,
            logprobs=logprobs if want_logprobs else None,
            top_logprobs=top if want_top else None,
            token_texts=token_texts(self.tokenizer, ids) if want_texts else None,
            prompt_text=prompt_text,
            top_token_texts=top_texts,
        )


def _piece_of(msg: TokenOut, i: int) -> _Piece:
    return _Piece(
        ids=list(msg.token_ids[i]),
        finish=msg.finish[i],
        logprobs=msg.logprobs[i] if msg.logprobs else None,
        top_logprobs=msg.top_logprobs[i] if msg.top_logprobs else None,
        prompt_tokens=msg.prompt_tokens[i] if msg.prompt_tokens else 0,
        cached_tokens=msg.cached_tokens[i] if msg.cached_tokens else 0,
    )


def _drop_first(piece: _Piece, n: int) -> _Piece:
    return _Piece(
        ids=piece.ids[n:],
        finish=piece.finish,
        logprobs=piece.logprobs[n:] if piece.logprobs else piece.logprobs,
        top_logprobs=piece.top_logprobs[n:] if piece.top_logprobs else piece.top_logprobs,
        prompt_tokens=piece.prompt_tokens,
        cached_tokens=piece.cached_tokens,
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


# ---------------------------------------------------------------------- the process


async def serve(spec: TokenizerSpec) -> None:
    """Run the tokenizer process until Shutdown."""
    name = spec.name
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    max_context_len = spec.max_context_len or model_context_len(spec.model_path, tokenizer)
    core = TokenizerCore(tokenizer, spec.idx, max_context_len, len(spec.worker_inboxes))

    ctx = zmq.asyncio.Context()
    from_peers = AsyncInbox(spec.inbox, ctx)
    to_router = AsyncOutbox(spec.router_inbox, ctx)
    to_workers = [AsyncOutbox(address, ctx) for address in spec.worker_inboxes]
    sockets: list[AsyncInbox | AsyncOutbox] = [from_peers, to_router, *to_workers]
    if spec.launcher_inbox:
        to_launcher = AsyncOutbox(spec.launcher_inbox, ctx)
        sockets.append(to_launcher)
        to_launcher.send(
            Ready(
                name=name, info={"vocab_size": core.vocab_size, "max_context_len": max_context_len}
            )
        )
    logger.info("%s ready (%s, context %d)", name, spec.model_path, max_context_len)
    try:
        while True:
            try:
                msg = await from_peers.recv()
            except Exception:
                logger.exception("%s: undecodable message dropped", name)
                continue
            if isinstance(msg, Shutdown):
                break
            _dispatch(core, msg, to_router, to_workers)
    finally:
        for sock in sockets:
            sock.close()
        ctx.term()
        logger.info("%s stopped", name)


def _dispatch(
    core: TokenizerCore, msg: Message, to_router: AsyncOutbox, to_workers: list[AsyncOutbox]
) -> None:
    """Handle one message; a bad request is answered with an error, never raised."""
    if isinstance(msg, TokenOut):
        for out in core.on_token_out(msg):
            to_router.send(out)
    elif isinstance(msg, GenerateReq):
        try:
            worker_idx, tokenized = core.on_generate(msg)
        except ValueError as e:
            logger.info("rid=%s: refused: %s", msg.rid, e)
            to_router.send(error_output(msg.rid, str(e)))
        except Exception as e:
            logger.exception("rid=%s: tokenization failed", msg.rid)
            to_router.send(error_output(msg.rid, f"internal error in tokenizer{core.idx}: {e!r}"))
        else:
            to_workers[worker_idx].send(tokenized)
    elif isinstance(msg, Abort):
        core.on_abort(msg)
    else:
        logger.warning("tokenizer%d: unexpected %s dropped", core.idx, type(msg).__name__)


def main(spec: dict[str, Any]) -> None:
    """Process entry point: run `serve` on uvloop when it is installed."""
    tokenizer_spec = TokenizerSpec.from_dict(spec)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(tokenizer_spec))
    else:
        uvloop.run(serve(tokenizer_spec))
