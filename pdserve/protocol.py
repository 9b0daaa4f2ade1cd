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
    finish: list[dict[str, Any] | None]  # SGLang finish_reason, or None while running
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
    finish: dict[str, Any] | None
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
)

Message = Any  # one of the registered dataclasses


def encode(msg: Message) -> bytes:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    return msgpack.packb([tag, values], use_bin_type=True)


def decode(data: bytes) -> Message:
    tag, values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise ValueError(f"unknown message tag {tag}")
    return cls(*values)


def message_types() -> tuple[type, ...]:
    return tuple(_REGISTRY.values())
