"""Every message that crosses a process boundary, registered with the one msgpack codec that
carries them (`codec.py`).

One family per receiving process. Messages hold plain values only (ints, floats, str, bytes, lists,
dicts); sampling parameters travel as `SamplingParams.to_dict()`. Bulk KV bytes never ride here:
`KVChunk` is used only by the `tcp` transfer backend, on its own socket.
No pickle: decoding can only ever build the dataclasses registered below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.codec import Message as Message
from pdserve.codec import decode as decode
from pdserve.codec import encode as encode
from pdserve.codec import message_types as message_types
from pdserve.codec import register as _register

Role = Literal["prefill", "decode", "mixed"]
MemberRole = Literal["prefill", "decode", "mixed", "tokenizer"]  # who may Register
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
    chat_template_kwargs: dict[str, Any] | None = None  # messages only: template variables
    tools: list[dict[str, Any]] | None = None  # messages only: OpenAI tools, for the template
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text: bool = True  # False: tokenizer skipped on the way out (output_ids only)
    decode_idx: int = 0  # which decode (or mixed) worker
    prefill_idx: int = 0  # which prefill worker (ignored for a mixed worker)
    max_context_len: int = 0  # 0: the model's own limit
    max_prompt_tokens: int = 0  # 0: no limit but the context length (router.limits)
    truncate_prompt_tokens: int = 0  # keep the prompt's last N tokens; -1: the context; 0: all
    echo: bool = False  # send the prompt's text back with the first delta (completions echo)
    priority: int = ONLINE_PRIORITY  # batch API lines: lower (router/batch_line.py)
    return_hidden_states: bool = False  # final-layer hidden states of prompt and output
    logprob_start_len: int = -1  # first prompt token with an input logprob; -1: none
    embed: bool = False  # an embedding / score request: one forward pass, no decode
    lora_name: str | None = None  # the LoRA adapter to run under; None: the base model
    image_data: list[str] | None = None  # images (URL, path, base64), in prompt order
    video_data: list[Any] | None = None  # videos (a file's URL/path/base64, or a list of frames)


@dataclass
class MultimodalInputs:
    """A request's images, preprocessed by the tokenizer process (the model's Hugging Face image
    processor), riding inside TokenizedReq and PrefillTask. Pixels travel as raw bytes."""

    pixel_values: bytes  # [num_patches, C * T * P * P] row-major, all images concatenated
    pixel_shape: list[int]
    pixel_dtype: str  # torch dtype name, e.g. "float32"
    image_grid_thw: list[list[int]]  # per image: (t, h, w) in patches
    image_hashes: list[int]  # per image: a 63-bit hash of its pixels (prefix and encoder caches)
    num_image_tokens: list[int]  # per image: its placeholder tokens in the prompt
    image_token_id: int  # the placeholder token
    mrope_delta: int = 0  # M-RoPE: a token at index i >= prompt length sits at position i + delta
    image_sizes: list[list[int]] = field(default_factory=list)  # LLaVA: (height, width) as sent
    num_image_patches: list[int] = field(default_factory=list)  # LLaVA: tiles (pixel rows) each
    # Videos ride as items beside the images: every per-image list above holds one entry per
    # item (image or video) in prompt order; a video's tokens are `video_token_id`.
    video_token_id: int = -1  # -1: no video token
    is_video: list[bool] = field(default_factory=list)  # per item; []: all images
    second_per_grid_ts: list[float] = field(default_factory=list)  # per item (Qwen2.5-VL videos)


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
    spec_verify_ct: list[int] = field(default_factory=list)  # speculative verify passes so far


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
    spec_verify_ct: int = 0  # speculative verify passes the request took part in so far


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
    num_loaded_adapters: int = 0  # LoRA adapters loaded on the worker
    num_adapter_slots_used: int = 0  # distinct adapters held by requests (<= max_loras_per_batch)
    num_spec_row_steps: int = 0  # cumulative: rows verified by speculative decoding
    num_spec_tokens: int = 0  # cumulative: tokens those rows produced (accepted drafts + 1 each)


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
    mm: MultimodalInputs | None = None  # images: the prefill worker encodes them


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
    mm: MultimodalInputs | None = None  # images (TokenizedReq.mm), carried through decode
    # An EAGLE decode worker's head: send the final hidden states of this many last prompt
    # positions back with KVReady (worker/speculative/prompt_hidden.py); 0: none.
    spec_hidden_rows: int = 0


@dataclass
class KVReady:
    """prefill -> decode: the pages of `rid` are written; here is the prompt's first token."""

    rid: str
    first_token: int
    cached_tokens: int
    logprob: float | None = None
    top_logprobs: list[list[float]] | None = None
    # PrefillTask.spec_hidden_rows' hidden states: raw bytes of a [n, hidden] tensor, row-major.
    spec_hidden: bytes = b""
    spec_hidden_shape: list[int] = field(default_factory=list)
    spec_hidden_dtype: str = ""  # float32 | float16 | bfloat16; "": none


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
    shape: list[int]  # [L, 2, n, page_size, num_heads or Hkv, D]
    data: bytes
    is_last: bool = True
    # Tensor parallelism (kv_transfer/head_map.py): the run of the receiving rank's KV heads the
    # data holds, from head_start; num_heads 0: all of them (whole pages).
    head_start: int = 0
    num_heads: int = 0


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
    chat_template_kwargs: dict[str, Any] | None = None  # messages only: template variables
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


# ---------------------------------------------------------------- membership (issue 19)


@dataclass
class Register:
    """a worker or tokenizer started on its own (`pdserve worker|tokenizer --router`) -> router:
    join the cluster. Sent again every few seconds until it leaves, so a restarted router learns
    it too. `kv_handshake` (decode side) tells prefill workers how to reach its KV pool."""

    name: str
    role: MemberRole
    pid: int
    inbox: str  # where the router, tokenizers and peer workers reach it (tcp://host:port)
    kv_handshake: dict[str, Any] | None = None
    num_pages: int = 0


@dataclass
class PeerTable:
    """router -> every worker and tokenizer, whenever membership changes: who is in the cluster.
    Index i of a list is the peer that messages name with idx i; "" is a slot whose worker
    left. To a joining worker it is also the welcome (`for_name`, `idx`), or its refusal
    (`error`). Each receiver answers with a PeerTableAck."""

    version: int
    decode_inboxes: list[str]
    prefill_inboxes: list[str]
    tokenizer_inboxes: list[str]
    decode_kv_handshakes: list[dict[str, Any] | None] = field(default_factory=list)
    for_name: str = ""  # the welcome of this joining worker ("": a plain update)
    idx: int = -1  # the welcomed worker's idx on its side
    error: str = ""  # registration refused: why (the worker exits with this message)


@dataclass
class PeerTableAck:
    """worker or tokenizer -> router: PeerTable `version` is applied here. A worker that joined
    gets traffic once every member has applied the table that holds it."""

    name: str
    version: int


@dataclass
class Leave:
    """worker or tokenizer -> router, on SIGTERM: route nothing new here. The router answers
    with Shutdown once the requests that depend on it have ended (or its drain timeout passed)."""

    name: str
    pid: int


# ---------------------------------------------------------------- the registry

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
    Register,
    PeerTable,
    PeerTableAck,
    Leave,
    MultimodalInputs,
)
