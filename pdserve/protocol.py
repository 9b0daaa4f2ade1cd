"""Every message that crosses a process boundary, and the one msgpack codec that carries them.

One family per receiving process. Messages hold plain values only (ints, floats, str, bytes, lists,
dicts); sampling parameters travel as `SamplingParams.to_dict()`. Bulk KV bytes never ride here:
`KVChunk` is used only by the `tcp` transfer backend, on its own socket.
No pickle: decoding can only ever build the dataclasses registered below.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

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

# Every online request's priority; a higher one is served first (scheduler/waiting_queue.py).
ONLINE_PRIORITY = 0


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
    max_prompt_tokens: int = 0  # 0: no limit but the context length (router.limits)
    echo: bool = False  # send the prompt's text back with the first delta (completions echo)
    priority: int = ONLINE_PRIORITY  # batch API lines: lower (router/batch_line.py)
    return_hidden_states: bool = False  # final-layer hidden states of prompt and output
    logprob_start_len: int = -1  # first prompt token with an input logprob; -1: none
    embed: bool = False  # an embedding / score request: one forward pass, no decode
    lora_name: str | None = None  # the LoRA adapter to run under; None: the base model


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
    # Per request, when asked for (else [] or None):
    hidden_states: list[list[list[float]]] | None = None  # new rows [n][hidden], position order
    input_token_logprobs: list[list[list[float | None]]] | None = None  # [[token_id, lp|None]]
    input_top_logprobs: list[list[list[list[float]]]] | None = None  # per prompt token [[id, lp]]
    embeddings: list[list[float]] | None = None  # pooled vector or scores ([] for a generation)


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
    hidden_states: list[list[float]] | None = None  # new rows: prompt tokens, then fed outputs
    input_token_logprobs: list[list[Any]] | None = None  # SGLang's [logprob|None, id, text]
    input_top_logprobs: list[Any] | None = None  # per prompt token: [[lp, id, text]...] or None
    embedding: list[float] | None = None  # an embedding / score request's result


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
    priority: int = ONLINE_PRIORITY  # GenerateReq.priority
    return_hidden_states: bool = False  # final-layer hidden states of prompt and output
    logprob_start_len: int = -1  # first prompt token with an input logprob; -1: none
    embed: bool = False  # an embedding / score request: one forward pass, no decode
    lora_name: str | None = None  # the LoRA adapter to run under; None: the base model


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
    priority: int = ONLINE_PRIORITY  # GenerateReq.priority
    return_hidden_states: bool = False  # final-layer hidden states of prompt and output
    logprob_start_len: int = -1  # first prompt token with an input logprob; -1: none
    embed: bool = False  # an embedding / score request: no decode, no KV goes back
    lora_name: str | None = None  # the LoRA adapter to run under; None: the base model


@dataclass
class KVReady:
    """prefill -> decode: the pages of `rid` are written; here is the prompt's first token."""

    rid: str
    first_token: int
    cached_tokens: int
    logprob: float | None = None
    top_logprobs: list[list[float]] | None = None


@dataclass
class KVFailed:
    """prefill -> decode: no KV will come for `rid` (its prefill failed or was aborted, or the push
    failed), and the prefill will not write its pages again: decode ends it and frees them."""

    rid: str
    error: str
    status_code: int = 500  # what the client gets (Finish.abort): 400 for the request's own fault


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


# ---------------------------------------------------------------- liveness (to the router)


@dataclass
class Heartbeat:
    """tokenizer or worker -> router, every heartbeat interval, from a thread that never waits on the
    process's own loop: the router's view of a process does not depend on how long a step runs.
    `pid` tells a restarted process from messages its dead predecessor left queued."""

    name: str
    pid: int


@dataclass
class ProcessExited:
    """launcher -> router: a tokenizer or worker exited; the requests it held end with an error.
    `restarting`: the launcher starts it again, and its heartbeats (a new pid) say when it is back."""

    name: str
    pid: int
    exit_code: int
    restarting: bool = False


# ---------------------------------------------------------------- /tokenize, /detokenize
# The router holds no tokenizer: it asks a tokenizer process, which answers by rid.


@dataclass
class TokenizeReq:
    """router -> tokenizer_proc: token ids of texts, or of one chat as its template renders it."""

    rid: str
    texts: list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # messages only
    continue_final_message: bool = False  # messages only
    return_token_strs: bool = False  # also each id's vocabulary string (vLLM's token_strs)


@dataclass
class DetokenizeReq:
    """router -> tokenizer_proc: the text of each list of token ids."""

    rid: str
    token_ids: list[list[int]]
    skip_special_tokens: bool = True


@dataclass
class TokenizeOut:
    """tokenizer_proc -> router: the answer to a TokenizeReq or a DetokenizeReq of `rid`."""

    rid: str
    token_ids: list[list[int]] = field(default_factory=list)  # TokenizeReq: one list per text
    token_strs: list[list[str]] | None = None
    texts: list[str] = field(default_factory=list)  # DetokenizeReq: one text per id list
    max_context_len: int = 0  # the tokenizer's context length; 0: unknown
    error: str | None = None  # the request's fault (a 400): why


@dataclass
class LoraUpdate:
    """router -> every worker: load (from lora_path) or unload one LoRA adapter; each worker
    answers with a LoraUpdateDone of the same op_id."""

    op_id: str
    action: Literal["load", "unload"]
    lora_name: str
    lora_path: str = ""


@dataclass
class LoraUpdateDone:
    """worker -> router: the outcome of a LoraUpdate on this worker."""

    op_id: str
    worker: str
    success: bool
    error: str = ""  # why it failed, naming the problem
    loaded: list[str] = field(default_factory=list)  # the worker's adapters afterwards


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
    KVFailed,
    Heartbeat,
    ProcessExited,
    TokenizeReq,
    DetokenizeReq,
    TokenizeOut,
    LoraUpdate,
    LoraUpdateDone,
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
    if type(frame) is not list or len(frame) != 2 or type(frame[1]) is not list:
        raise ValueError("malformed message: expected [tag, values]")
    tag, values = frame
    cls = _REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise ValueError(f"unknown message tag {tag!r}")
    record = _record_spec(cls)
    if not record.num_required <= len(values) <= len(record.names):
        raise ValueError(
            f"{cls.__name__}: {len(values)} values, expected {record.num_required}.."
            f"{len(record.names)}"
        )
    for name, check, value in zip(record.names, record.checks, values):
        if not check(value):
            raise ValueError(
                f"{cls.__name__}.{name}: expected {record.annotations[name]}, "
                f"got {type(value).__name__} {_short(value)}"
            )
    return cls(*values)


def encode(msg: Message) -> bytes:
    return _pack_record(msg).data


def decode(data: bytes) -> Message:
    """The message in `data`. Raises ValueError, and only ValueError, for bytes that are not a
    registered message whose every field holds a value of its annotated type."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_record)
        return _build(frame)
    except ValueError:
        raise
    except Exception as e:  # msgpack's own errors, unhashable keys, records nested too deep
        raise ValueError(f"undecodable frame: {type(e).__name__}: {e}") from None


def message_types() -> tuple[type, ...]:
    return tuple(_REGISTRY.values())


# ---------------------------------------------------------------- field type checks
# Each registered dataclass's annotations are compiled once into predicates, so a frame of the
# right shape but the wrong types (a str where page ids go) is refused at the socket, naming the
# field, before any handler sees it. Lists of plain values are checked with set(map(type, ...)),
# which runs in C: the token path pays a few microseconds per step.

Check = Callable[[Any], bool]
_NONE = type(None)
_LEAVES: dict[Any, frozenset[type]] = {
    str: frozenset({str}),
    int: frozenset({int}),  # exact: a bool is not an int here
    float: frozenset({float, int}),  # msgpack keeps 0.0 a float, but a sender may write 0
    bool: frozenset({bool}),
    bytes: frozenset({bytes}),
    _NONE: frozenset({_NONE}),
    None: frozenset({_NONE}),
}
_PLAIN = frozenset({str, int, float, bool, bytes, _NONE})
_LIST = frozenset({list})


class _RecordSpec(NamedTuple):
    names: tuple[str, ...]
    checks: tuple[Check, ...]
    num_required: int
    annotations: dict[str, str]


_SPECS: dict[type, _RecordSpec] = {}


def _record_spec(cls: type) -> _RecordSpec:
    """The compiled field checks of a registered dataclass (built on first use)."""
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        spec = _RecordSpec(
            names=tuple(f.name for f in fields),
            checks=tuple(_checker(hints[f.name], f"{cls.__name__}.{f.name}") for f in fields),
            num_required=sum(
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for f in fields
            ),
            annotations={f.name: str(f.type) for f in fields},
        )
        _SPECS[cls] = spec
    return spec


def _leaf_types(tp: Any) -> frozenset[type] | None:
    """The exact types a value of `tp` may have when `tp` is a plain type, a registered record
    or a union of those; None for anything else (containers, Any, Literal)."""
    if tp in _LEAVES:
        return _LEAVES[tp]
    if isinstance(tp, type) and tp in _TAGS:
        return frozenset({tp})
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_leaf_types(a) for a in typing.get_args(tp)]
        if all(p is not None for p in parts):
            return frozenset().union(*parts)
    return None


def _checker(tp: Any, where: str) -> Check:
    """A predicate for values of annotation `tp`; TypeError for annotations the codec cannot
    carry faithfully (a tuple comes back a list), so a new message fails at its first use."""
    leaves = _leaf_types(tp)
    if leaves is not None:
        return lambda v: type(v) in leaves
    if tp is Any or tp is object:
        return _is_plain
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        kinds = frozenset(type(a) for a in args)  # exact: True is not Literal[1]
        return lambda v: type(v) in kinds and v in args
    if origin in (typing.Union, types.UnionType):
        checks = [_checker(a, where) for a in args if a is not _NONE]
        if _NONE in args and len(checks) == 1:
            inner = checks[0]
            return lambda v: v is None or inner(v)
        return lambda v: (v is None and _NONE in args) or any(c(v) for c in checks)
    if origin is list:
        return _list_checker(args[0], where)
    if origin is dict:
        return _dict_checker(args[0], args[1], where)
    raise TypeError(f"{where}: annotation {tp!r} cannot travel in a message")


def _list_checker(item: Any, where: str) -> Check:
    depth = 1  # list[list[int]]: depth 2, items int
    while typing.get_origin(item) is list:
        depth, item = depth + 1, typing.get_args(item)[0]
    leaves = _leaf_types(item)
    if leaves is not None:
        return lambda v: (
            (items := _flatten(v, depth)) is not None and set(map(type, items)) <= leaves
        )
    check = _checker(item, where)
    return lambda v: (items := _flatten(v, depth)) is not None and all(map(check, items))


def _flatten(value: Any, depth: int) -> Iterable[Any] | None:
    """The items of a list nested `depth` deep (the last level lazily, as set(map(...)) then
    costs no copy), or None where some level is not a list."""
    if type(value) is not list:
        return None
    for level in range(depth - 1):
        if not set(map(type, value)) <= _LIST:
            return None
        value = itertools.chain.from_iterable(value)
        if level < depth - 2:
            value = list(value)
    return value


def _dict_checker(key: Any, value: Any, where: str) -> Check:
    keys = _leaf_types(key)
    if keys is None or not keys <= _PLAIN:
        raise TypeError(f"{where}: dict keys of {key!r} cannot travel in a message")
    if value is Any:
        return lambda v: type(v) is dict and set(map(type, v)) <= keys and _is_plain(v)
    check = _checker(value, where)
    return lambda v: type(v) is dict and set(map(type, v)) <= keys and all(map(check, v.values()))


def _is_plain(value: Any) -> bool:
    """Only msgpack's plain values (no records) at any depth; iterative, so depth cannot
    exhaust the stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        kind = type(v)
        if kind in _PLAIN:
            continue
        if kind is list:
            stack.extend(v)
        elif kind is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            return False
    return True


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
