"""The tokenizer process: prompts -> token ids for workers, token ids -> text deltas for the router.

Messages in (one inbox): GenerateReq and Abort from the router, TokenOut from prefill (a request's
first token) and from decode/mixed workers (the rest), Shutdown from the launcher; TokenizeReq and
DetokenizeReq from the router (/tokenize, /detokenize), answered at once with a TokenizeOut.
Messages out: TokenizedReq to `worker_inboxes[req.decode_idx]`, ReqOutput to the router, Ready
to the launcher. Tokens of one request can arrive out of order (prefill's first token races the
decode worker's later ones, and a finish can come first): they are released in index order
(`ordered_output.py`). Each message reaches `TokenizerCore` through `message_dispatch.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import zmq
import zmq.asyncio

from pdserve.config.engine_config import sliding_window_of
from pdserve.config.process_specs import TokenizerSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.grammar_check import check_grammar
from pdserve.heartbeat import HeartbeatSender
from pdserve.ipc import AsyncInbox, AsyncOutbox
from pdserve.membership import update_outboxes
from pdserve.multimodal.image_loader import ImageLimits
from pdserve.multimodal.processor import ImageProcessor, Images
from pdserve.multimodal.video_loader import VideoLimits
from pdserve.protocol import (
    Abort,
    DetokenizeReq,
    GenerateReq,
    MultimodalInputs,
    PeerTable,
    PeerTableAck,
    Ready,
    ReqOutput,
    Shutdown,
    TokenizedReq,
    TokenizeOut,
    TokenizeReq,
    TokenOut,
)
from pdserve.tokenizer_proc.chat_template import render_chat
from pdserve.tokenizer_proc.incremental_detokenizer import IncrementalDetokenizer
from pdserve.tokenizer_proc.message_dispatch import dispatch
from pdserve.tokenizer_proc.ordered_output import ReqState, accept, error_output, piece_of

if TYPE_CHECKING:
    from pdserve.tokenizer_proc.joining import JoinedTokenizer

logger = logging.getLogger(__name__)

# Prompts longer than this are tokenized in a thread, so other streams keep flowing.
_INLINE_MAX_CHARS = 8192
_INLINE_MAX_IDS = 32768
# A text over this many characters per allowed token is first tokenized in part (a probe).
_PROBE_CHARS_PER_TOKEN = 8
_PROBE_SLACK = 16
_IMAGE_THREADS = 4  # images of different requests are fetched and preprocessed at once
_CONFIG_LEN_KEYS = ("max_position_embeddings", "max_sequence_length", "max_seq_len", "n_positions")


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer  # heavy: only when the process starts

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def model_context_len(model_path: str, tokenizer: Any) -> int:
    """The model's own context length: config.json, else the tokenizer's; 0 if neither says."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        text_config = config.get("text_config") or config  # a vision-language model's decoder
        window = sliding_window_of(text_config)  # the workers serve no more than the window
        for key in _CONFIG_LEN_KEYS:
            if isinstance(config.get(key), int) and config[key] > 0:
                return min(config[key], window) if window else config[key]
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else 0


class Prepared(NamedTuple):
    """A request checked and tokenized, not yet registered."""

    sampling: SamplingParams
    input_ids: list[int]
    prompt_text: str | None  # echo: the prompt's text
    mm: MultimodalInputs | None = None  # the request's images, preprocessed


def prompt_too_long(num_tokens: int, limit: int, is_lower_bound: bool = False) -> ValueError:
    at_least = "at least " if is_lower_bound else ""
    return ValueError(
        f"prompt has {at_least}{num_tokens} tokens: expected at most {limit} "
        "(the context length or router.limits.max_prompt_tokens)"
    )


class TokenizerCore:
    """The process's logic without sockets: each handler returns the messages to send."""

    def __init__(self, tokenizer: Any, idx: int, max_context_len: int, num_workers: int) -> None:
        self.tokenizer = tokenizer
        self.idx = idx
        self.max_context_len = max_context_len  # 0: no limit known
        self.num_workers = num_workers
        self.vocab_size = len(tokenizer)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.states: dict[str, ReqState] = {}
        self.tokenizing: set[str] = set()  # rids being tokenized off the loop
        self.images: ImageProcessor | None = None  # a vision-language model's (serve() sets it)
        self.image_pool: Executor | None = None  # threads that fetch and preprocess images

    # ------------------------------------------------------------------ requests in

    def on_generate(self, req: GenerateReq) -> tuple[int, TokenizedReq]:
        """Tokenize and check a request; returns (worker index, message). Raises ValueError."""
        return self.admit(req, self.prepare(req))

    def prepare(self, req: GenerateReq, images: Images | None = None) -> Prepared:
        """Every check of the request and its tokenization, without touching `states`: safe to
        run in a worker thread while the loop serves other requests. Raises ValueError.
        `images`: the request's, loaded already (else they are loaded here)."""
        if not 0 <= req.decode_idx < self.num_workers:
            raise ValueError(f"decode_idx={req.decode_idx} is out of range (0..{self.num_workers})")
        sampling = SamplingParams.from_dict(req.sampling)
        self.check_vocab(sampling)
        check_grammar(sampling)  # a bad schema or regex is refused before it is queued
        if images is None:
            images = self.load_images(req)
        input_ids = self.prompt_ids(req, images)
        self.check_length(req, len(input_ids), sampling.max_new_tokens)
        prompt_text = None
        if req.echo:
            prompt_text = req.text if req.text is not None else self.tokenizer.decode(input_ids)
        mm = self.images.inputs(input_ids, images) if self.images and images else None
        return Prepared(sampling, input_ids, prompt_text, mm)

    def load_images(self, req: GenerateReq) -> Images | None:
        """The request's images and videos, loaded and preprocessed (None: it has none).
        ValueError naming a bad image or video or an exceeded limit."""
        if not req.image_data and not req.video_data:
            return None
        if self.images is None:
            name = "image_data" if req.image_data else "video_data"
            raise ValueError(f"{name}: this model takes text only (it has no vision tower)")
        return self.images.preprocess_media(req.image_data, req.video_data)

    def with_images(self, prompt: Any, images: Images | None) -> Any:
        """The prompt with each image placeholder repeated as many times as its image has
        tokens (the Hugging Face processor's expansion)."""
        if images is None or self.images is None or not isinstance(prompt, str):
            return prompt
        return self.images.expand(prompt, images)

    def admit(self, req: GenerateReq, prepared: Prepared) -> tuple[int, TokenizedReq]:
        """Register a prepared request (on the loop); returns (worker index, message)."""
        if req.rid in self.states or req.rid in self.tokenizing:
            raise ValueError(f"rid {req.rid!r} is already in flight")
        sampling, input_ids, prompt_text, mm = prepared
        detok = None
        if req.return_text:
            detok = IncrementalDetokenizer.for_request(self.tokenizer, input_ids, sampling)
        self.states[req.rid] = ReqState(
            rid=req.rid,
            prompt_len=len(input_ids),
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            detok=detok,
            prompt_text=prompt_text,
            # max_new_tokens 0 (scoring a prompt: its logprobs, an echo): the workers still
            # sample the one token a prefill makes; it is not passed on
            keeps_no_tokens=sampling.max_new_tokens == 0 and not req.embed,
        )
        msg = TokenizedReq(
            rid=req.rid,
            input_ids=input_ids,
            sampling=req.sampling,
            tokenizer_idx=self.idx,
            prefill_idx=req.prefill_idx,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            priority=req.priority,
            return_hidden_states=req.return_hidden_states,
            logprob_start_len=req.logprob_start_len,
            embed=req.embed,
            lora_name=req.lora_name,
            mm=mm,
        )
        return req.decode_idx, msg

    def is_long(self, req: GenerateReq) -> bool:
        """Whether tokenizing the request takes long enough to move it off the event loop."""
        if req.image_data or req.video_data:  # fetched and preprocessed: never on the loop
            return True
        if req.input_ids is not None:
            return len(req.input_ids) > _INLINE_MAX_IDS
        if req.text is not None:
            return len(req.text) > _INLINE_MAX_CHARS
        content = (m.get("content") if isinstance(m, dict) else "" for m in req.messages or ())
        return sum(len(c) for c in content if isinstance(c, str)) > _INLINE_MAX_CHARS

    def check_vocab(self, sampling: SamplingParams) -> None:
        """Token ids the sampler would index with must be in the vocabulary."""
        for key, ids in (
            ("stop_token_ids", sampling.stop_token_ids),
            ("logit_bias", sampling.logit_bias),
        ):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{key}={bad[:8]} is invalid: expected token ids in [0, {self.vocab_size})"
                )

    def prompt_limit(self, req: GenerateReq) -> int:
        """The most tokens the prompt may have (0: no limit known)."""
        limits = [
            n for n in (req.max_prompt_tokens, self.max_context_len, req.max_context_len) if n > 0
        ]
        return min(limits, default=0)

    def prompt_ids(self, req: GenerateReq, images: Images | None = None) -> list[int]:
        given = [
            name for name in ("text", "messages", "input_ids") if getattr(req, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(f"exactly one of text, messages, input_ids must be given, got {given}")
        keep = self.kept_tokens(req, images)
        limit = 0 if keep else self.prompt_limit(req)  # truncated: the whole text is encoded
        if req.messages is not None:
            prompt = render_chat(
                self.tokenizer,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                template_kwargs=req.chat_template_kwargs,
                tools=req.tools,
            )
            prompt = self.with_images(prompt, images)
            # The template writes its own BOS: adding one more would double it.
            ids = self.encode(prompt, add_special_tokens=False, limit=limit)
        elif req.text is not None:
            ids = self.encode_text(self.with_images(req.text, images), limit)
        else:
            ids = self.check_input_ids(req.input_ids)
            if images is not None and self.images is not None:  # token in with images
                ids = self.images.expand_ids(ids, images)
        if keep and len(ids) > keep:
            ids = ids[-keep:]  # vLLM's truncation: the prompt's start goes
        if req.max_prompt_tokens and len(ids) > req.max_prompt_tokens:
            raise prompt_too_long(len(ids), req.max_prompt_tokens)
        return ids

    def kept_tokens(self, req: GenerateReq, images: Images | None) -> int:
        """How many of the prompt's last tokens truncate_prompt_tokens keeps (0: all of it;
        -1: as many as the context allows). ValueError naming it with images, whose tokens a
        cut could split."""
        keep = req.truncate_prompt_tokens
        if keep == 0:
            return 0
        if images is not None:
            raise ValueError(
                "truncate_prompt_tokens cannot be used with images or videos (a cut could "
                "split an image's tokens)"
            )
        return self.prompt_limit(req) if keep < 0 else keep

    def encode(self, text: str, add_special_tokens: bool, limit: int = 0) -> list[int]:
        """`text`'s token ids. A text far longer than `limit` tokens is refused after
        tokenizing only a prefix, so an oversized prompt costs little."""
        probe_chars = _PROBE_CHARS_PER_TOKEN * limit
        if limit and len(text) > probe_chars:
            num_probe = len(self.tokenizer.encode(text[:probe_chars], add_special_tokens=False))
            if num_probe > limit + _PROBE_SLACK:  # the cut may split a word: a few tokens slack
                raise prompt_too_long(num_probe - _PROBE_SLACK, limit, is_lower_bound=True)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_text(self, text: Any, limit: int = 0) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        ids = self.encode(text, add_special_tokens=True, limit=limit)
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
        if prompt_len == 0:  # named first, so the router's 400 names the parameter
            where = "messages" if req.messages is not None else "prompt"
            raise ValueError(f"{where} has no tokens: the prompt is empty, expected at least one")
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
            self.tokenizing.clear()
        else:
            self.states.pop(msg.rid, None)
            self.tokenizing.discard(msg.rid)

    def start_tokenizing(self, rid: str) -> None:
        """Note a request handed to the tokenizing thread (an Abort may come meanwhile)."""
        if rid in self.states or rid in self.tokenizing:
            raise ValueError(f"rid {rid!r} is already in flight")
        self.tokenizing.add(rid)

    def end_tokenizing(self, rid: str) -> bool:
        """False when the request was aborted while it was being tokenized: drop it."""
        if rid not in self.tokenizing:
            return False
        self.tokenizing.discard(rid)
        return True

    def on_tokenize(self, msg: TokenizeReq | DetokenizeReq) -> TokenizeOut:
        """Answer /tokenize (texts, or one chat through its template, to ids as /generate would
        tokenize them) or /detokenize (id lists to texts). Never raises: a bad request is
        answered with `error`."""
        try:
            if isinstance(msg, DetokenizeReq):
                bad = [t for ids in msg.token_ids for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(
                        f"tokens={bad[:8]} is invalid: expected token ids in [0, {self.vocab_size})"
                    )
                skip = msg.skip_special_tokens
                texts = [
                    self.tokenizer.decode(ids, skip_special_tokens=skip) for ids in msg.token_ids
                ]
                return TokenizeOut(rid=msg.rid, texts=texts, max_context_len=self.max_context_len)
            if msg.messages is not None:
                chat = render_chat(
                    self.tokenizer,
                    msg.messages,
                    add_generation_prompt=msg.add_generation_prompt,
                    continue_final_message=msg.continue_final_message,
                    template_kwargs=msg.chat_template_kwargs,
                )
                ids = [self.encode(chat, add_special_tokens=msg.add_special_tokens)]
            elif msg.add_special_tokens:  # with BOS kept single, as /generate and completions do
                ids = [self.encode_text(text) for text in msg.texts or []]
            else:
                ids = [self.encode(text, add_special_tokens=False) for text in msg.texts or []]
            strs = None
            if msg.return_token_strs:
                strs = [list(self.tokenizer.convert_ids_to_tokens(x)) for x in ids]
        except ValueError as e:
            return TokenizeOut(rid=msg.rid, error=str(e))
        except Exception as e:  # a tokenizer's own failure: still an answer, never a hang
            logger.exception("rid=%s: tokenize failed", msg.rid)
            return TokenizeOut(rid=msg.rid, error=f"internal error in tokenizer{self.idx}: {e!r}")
        return TokenizeOut(
            rid=msg.rid, token_ids=ids, token_strs=strs, max_context_len=self.max_context_len
        )

    # ------------------------------------------------------------------ tokens in

    def on_token_out(self, msg: TokenOut) -> list[ReqOutput]:
        """Buffer each request's piece; return the outputs now releasable in index order."""
        outputs = []
        for i, rid in enumerate(msg.rids):
            state = self.states.get(rid)
            if state is None:
                continue  # aborted or finished already: late tokens are expected
            try:
                out = accept(self.tokenizer, state, msg.first_idx[i], piece_of(msg, i))
                if out is not None and out.finish is not None:
                    self.states.pop(rid, None)
            except Exception as e:
                logger.exception("rid=%s: detokenizing failed", rid)
                self.states.pop(rid, None)
                out = error_output(rid, f"internal error in tokenizer{self.idx}: {e!r}")
            if out is not None:
                outputs.append(out)
        return outputs


# ---------------------------------------------------------------------- the process


def _load_core(spec: TokenizerSpec) -> TokenizerCore:
    """The tokenizer, its context limit and (a vision-language model) its image processor."""
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    if spec.chat_template:  # the topology's, instead of the model's own
        tokenizer.chat_template = spec.chat_template
    max_context_len = spec.max_context_len or model_context_len(spec.model_path, tokenizer)
    core = TokenizerCore(tokenizer, spec.idx, max_context_len, len(spec.worker_inboxes))
    limits = ImageLimits(**spec.image_limits) if spec.image_limits else None
    core.images = ImageProcessor.for_model(spec.model_path, tokenizer, limits)
    if core.images is not None and spec.video_limits:
        core.images.video_limits = VideoLimits(**spec.video_limits)
    if core.images is not None:
        prefix = f"{spec.name}-images"
        core.image_pool = ThreadPoolExecutor(_IMAGE_THREADS, thread_name_prefix=prefix)
    return core


async def serve(spec: TokenizerSpec, member: JoinedTokenizer | None = None) -> None:
    """Run the tokenizer process until Shutdown. `member`: a tokenizer that joins a running
    router (`pdserve tokenizer --router`, tokenizer_proc/joining.py)."""
    name = spec.name
    core = _load_core(spec)
    max_context_len = core.max_context_len
    ctx = zmq.asyncio.Context()
    from_peers = AsyncInbox(spec.inbox, ctx)
    to_router = AsyncOutbox(spec.router_inbox, ctx)
    to_workers = [AsyncOutbox(address, ctx) for address in spec.worker_inboxes]
    sockets: list[AsyncInbox | AsyncOutbox] = [from_peers, to_router]  # and to_workers
    if spec.launcher_inbox:
        to_launcher = AsyncOutbox(spec.launcher_inbox, ctx)
        sockets.append(to_launcher)
        to_launcher.send(
            Ready(
                name=name, info={"vocab_size": core.vocab_size, "max_context_len": max_context_len}
            )
        )
    logger.info("%s ready (%s, context %d)", name, spec.model_path, max_context_len)
    # One thread for long prompts: the loop keeps streaming others' tokens meanwhile (the fast
    # tokenizer releases the GIL while it encodes).
    encoder = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-encode")
    heartbeat = HeartbeatSender(name, spec.router_inbox, spec.heartbeat_interval_s).start()
    if member is not None:
        member.start(from_peers, to_router)
    try:
        while True:
            try:
                msg = await from_peers.recv()
            except Exception:
                logger.exception("%s: undecodable message dropped", name)
                continue
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, PeerTable):  # workers joined or left (router/membership.py)
                if member is not None and not member.on_peer_table(msg, core):
                    continue
                update_outboxes(to_workers, msg.decode_inboxes, lambda a: AsyncOutbox(a, ctx))
                core.num_workers = len(to_workers)
                to_router.send(PeerTableAck(name, msg.version))
                continue
            dispatch(core, msg, to_router, to_workers, encoder)
            # pyzmq returns a queued frame without yielding: under a steady stream of TokenOuts
            # the loop would never run the callbacks of prompts tokenized off the loop.
            await asyncio.sleep(0)
    finally:
        if member is not None:
            member.close()
        heartbeat.stop()
        encoder.shutdown(wait=False, cancel_futures=True)
        if core.image_pool is not None:
            core.image_pool.shutdown(wait=False, cancel_futures=True)
        for sock in [*sockets, *to_workers]:  # to_workers: with those that joined since
            sock.close()
        ctx.term()
        logger.info("%s stopped", name)


def main(spec: dict[str, Any]) -> None:
    """Process entry point: run `serve` on uvloop when it is installed."""
    tokenizer_spec = TokenizerSpec.from_dict(spec)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(tokenizer_spec))
    else:
        uvloop.run(serve(tokenizer_spec))
