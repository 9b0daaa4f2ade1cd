"""Every message that crosses a process boundary, and the one msgpack codec that carries them.

One family per receiving process. Messages hold plain values only (ints, floats, str, bytes, lists,
dicts); sampling parameters travel as `SamplingParams.to_dict()`. Bulk KV bytes never ride here:
`KVChunk` is used only by the `tcp` transfer backend, on its own socket.
No pickle: decoding can only ever build the dataclasses registered below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

Role = Literal["prefill", "decode", "mixed"]
FinishKind = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Finish:
    """Why a request ended. `to_api()` is SGLang's `finish_reason` dict, the shape clients see.

    An abort carries the HTTP status its client gets when the abort is an error (400: the request's
    own fault or an explicit abort; 500: a lost process; 504: a timeout)."""

    kind: FinishKind
    matched: int | str | None = None  # stop: the stop token id or stop string that ended it
    length: int = 0  # length: output tokens when the limit was reached
    message: str = ""  # abort: why
    status_code: int = 400  # abort only

    @classmethod
    def stop(cls, matched: int | str | None) -> Finish:
        return cls("stop", matched=matched)

    @classmethod
    def at_length(cls, num_tokens: int) -> Finish:
        return cls("length", length=num_tokens)

    @classmethod
    def abort(cls, message: str = "aborted", status_code: int = 400) -> Finish:
        return cls("abort", message=message, status_code=status_code)

    @property
    def is_abort(self) -> bool:
        return self.kind == "abort"

    @property
    def is_error(self) -> bool:
        """An abort the server caused (a lost process, a timeout), not the client."""
        return self.is_abort and self.status_code >= 500

    def to_api(self) -> dict[str, Any]:
        if self.kind == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.kind == "length":
            return {"type": "length", "length": self.length}
        return {"type": "abort", "message": self.message}


# ---------------------------------------------------------------- to the tokenizer process


@dataclass
class GenerateReq:
    """router -> tokenizer_proc: one generation request, not yet tokenized."""

    rid: str
    sampling: dict[str, Any]  # SamplingParams.to_dict()
    text: str | None = None
    messages: list[dict[str, Any]] | None = None  # chat; the tokenizer applies the template
    input_ids: list[int] | None = None  # token in, token out
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text: bool = True  # False: tokenizer skipped on the way out (output_ids only)
    decode_idx: int = 0  # which decode (or mixed) worker
    prefill_idx: int = 0  # which prefill worker (ignored for a mixed worker)
    max_context_len: int = 0  # 0: the model's own limit
    echo: bool = False  # send the prompt's text back with the first delta (completions echo)


@dataclass
class TokenOut:
    """worker -> tokenizer_proc: new tokens of several requests from one step."""

    rids: list[str]
    token_ids: list[list[int]]  # new tokens per request
    first_idx: list[int]  # output index of each request's first new token (ordering)
    finish: list[Finish | None]  # None while running
    logprobs: list[list[float]] | None = None  # chosen-token logprob per new token
    top_logprobs: list[list[list[list[float]]]] | None = None  # [req][tok] -> [[id, logprob], ...]
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- to the router


@dataclass
class ReqOutput:
    """tokenizer_proc -> router: a delta of one request's output."""

    rid: str
    text_delta: str
    output_ids: list[int]  # new token ids in this delta
    finish: Finish | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None  # per token: [[id, logprob], ...]
    token_texts: list[str] | None = None  # per new token, for OpenAI logprobs
    error: str | None = None  # request failed before generating (400-class message)
    prompt_text: str | None = None  # sent once, with the first delta, when echo was asked
    top_token_texts: list[list[str]] | None = None  # per token: texts of its top_logprobs ids


@dataclass
class LoadReport:
    """worker -> router, every report interval: the numbers routing and /metrics read."""

    worker: str
    role: str
    num_running: int
    num_queued: int
    num_free_pages: int
    num_total_pages: int
    num_cached_pages: int
    cache_hit_rate: float
    step_time_ms: float
    kv_transfer_bytes: int = 0  # cumulative
    kv_transfer_seconds: float = 0.0  # cumulative
    num_kv_transfers: int = 0  # cumulative
    num_preemptions: int = 0  # cumulative


@dataclass
class WorkerDied:
    """launcher -> router: a child process exited; its requests end with an error."""

    name: str
    exit_code: int


@dataclass
class Ready:
    """any child -> launcher: the process finished starting."""

    name: str
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- to a worker


@dataclass
class TokenizedReq:
    """tokenizer_proc -> decode or mixed worker: a request ready to schedule."""

    rid: str
    input_ids: list[int]
    sampling: dict[str, Any]
    tokenizer_idx: int
    prefill_idx: int = 0
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class PrefillTask:
    """decode -> prefill: compute this prompt and write its KV into `dst_pages` on decode."""

    rid: str
    input_ids: list[int]
    sampling: dict[str, Any]
    tokenizer_idx: int
    decode_idx: int
    dst_pages: list[int]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    kv_handshake: dict[str, Any] | None = None  # how to reach decode's pool (KVReceiver.handshake)


@dataclass
class KVReady:
    """prefill -> decode: the pages of `rid` are written (or the prefill failed)."""

    rid: str
    first_token: int
    cached_tokens: int
    ok: bool = True
    error: str = ""
    logprob: float | None = None
    top_logprobs: list[list[float]] | None = None


@dataclass
class Abort:
    """router -> any process holding state for rid (or all requests): stop it and free it."""

    rid: str = ""
    abort_all: bool = False
    message: str = "aborted"


@dataclass
class FlushCache:
    """router -> worker: drop every unlocked prefix-cache page."""


@dataclass
class Shutdown:
    """launcher -> any process: stop accepting, finish within grace_s, then exit."""

    grace_s: float = 0.0


@dataclass
class KVChunk:
    """prefill -> decode over the tcp transfer socket: the KV bytes of some pages of one request."""

    rid: str
    dst_pages: list[int]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: list[int]  # [L, 2, n, page_size, Hkv, D]
    data: bytes
    is_last: bool = True


# ---------------------------------------------------------------- the codec

_REGISTRY: dict[int, type] = {}
_TAGS: dict[type, int] = {}


def _register(*classes: type) -> None:
    for cls in classes:
        tag = len(_REGISTRY) + 1
        _REGISTRY[tag] = cls
        _TAGS[cls] = tag


# Order is the wire format: append only.
_register(
    GenerateReq,
    TokenOut,
    ReqOutput,
    LoadReport,
    Ready,
    TokenizedReq,
    PrefillTask,
    KVReady,
    Abort,
    FlushCache,
    Shutdown,
    KVChunk,
    WorkerDied,
    Finish,
)

Message = Any  # one of the registered dataclasses

# A registered record nested inside a message (a Finish in a TokenOut) travels as a msgpack
# extension holding [tag, values], so the decoder rebuilds the same type.
_EXT_RECORD = 1


def _pack_record(obj: Any) -> msgpack.ExtType:
    tag = _TAGS.get(type(obj))
    if tag is None:
        raise TypeError(f"{type(obj).__name__} is not a registered message")
    values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return msgpack.ExtType(_EXT_RECORD, msgpack.packb([tag, values], default=_pack_record))


def _unpack_record(code: int, data: bytes) -> Any:
    if code != _EXT_RECORD:
        raise ValueError(f"unknown msgpack extension {code}")
    return _build(msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_record))


def _build(frame: Any) -> Message:
    if not isinstance(frame, list) or len(frame) != 2 or not isinstance(frame[1], list):
        raise ValueError("malformed message: expected [tag, values]")
    tag, values = frame
    cls = _REGISTRY.get(tag) if isinstance(tag, int) else None
    if cls is None:
        raise ValueError(f"unknown message tag {tag!r}")
    return cls(*values)


def encode(msg: Message) -> bytes:
    return _pack_record(msg).data


def decode(data: bytes) -> Message:
    """The message in `data`; ValueError (or a msgpack error) for bytes that are not one."""
    frame = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_record)
    return _build(frame)


def message_types() -> tuple[type, ...]:
    return tuple(_REGISTRY.values())
