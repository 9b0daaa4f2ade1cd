"""The router's settings: the JSON-able dict the launcher hands to `main(spec)`, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.config.request_limits import DEFAULT_MAX_RUNNING_BATCH_LINES, RequestLimits
from pdserve.config.sampling_params import REASONING_PARSERS

WorkerRole = Literal["prefill", "decode", "mixed"]
_ROLES = ("prefill", "decode", "mixed")
_POLICIES = ("round_robin", "least_load")


@dataclass(frozen=True)
class WorkerEntry:
    """One worker process as the router sees it: where to send aborts, which index it answers to."""

    name: str
    role: WorkerRole
    idx: int  # decode side (decode|mixed): GenerateReq.decode_idx; prefill: GenerateReq.prefill_idx
    inbox: str

    @property
    def is_decode_side(self) -> bool:
        return self.role in ("decode", "mixed")


@dataclass(frozen=True)
class RouterSpec:
    model_name: str
    inbox: str
    tokenizer_inboxes: tuple[str, ...]
    workers: tuple[WorkerEntry, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_path: str = ""
    tokenizer_path: str = ""  # "" -> model_path
    chat_template: str = ""  # Jinja text used instead of the model's ("": the model's own)
    routing_policy: str = "round_robin"
    max_context_len: int = 0  # 0: the model's own limit (the tokenizer knows it)
    # A process silent this long (no heartbeat, no load report) is down.
    liveness_timeout_s: float = 5.0
    request_timeout_s: float = 0.0  # 0: no limit; else a request still running is aborted
    health_generate_timeout_s: float = 20.0
    launcher_inbox: str | None = None
    topology: dict[str, Any] = field(default_factory=dict)
    default_max_tokens: int = 128
    limits: RequestLimits = field(default_factory=RequestLimits)
    data_dir: str = ""  # files and batches; "": $XDG_CACHE_HOME/pdserve/data (pdserve.env)
    max_file_bytes: int = 200 * 10**6  # one uploaded file (/v1/files); 413 above
    max_running_batch_lines: int = DEFAULT_MAX_RUNNING_BATCH_LINES
    tokenizer_names: tuple[str, ...] = ()  # by idx, as in heartbeats; (): tokenizer0, ..
    progress_timeout_s: float = 0.0  # a request with no new output this long ends; 0: never
    # Workers join and leave at runtime (router/membership.py); `advertised_tokenizer_inboxes`
    # are the tokenizers' addresses as joining workers get them (by idx).
    membership: bool = False
    advertised_tokenizer_inboxes: tuple[str, ...] = ()
    drain_timeout_s: float = 120.0  # a leaving worker's requests get this long to end
    reasoning_parser: str = ""  # "": chat answers as written (router/reasoning.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", RequestLimits.from_dict(self.limits))

        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"router spec: {key}={getattr(self, key)!r} is invalid: {expected}")

        if not self.model_name:
            raise bad("model_name", "expected a non-empty served model name")
        if not self.tokenizer_inboxes:
            raise bad("tokenizer_inboxes", "expected at least one tokenizer inbox")
        if not self.membership and not any(w.is_decode_side for w in self.workers):
            raise bad("workers", "expected at least one decode or mixed worker")
        if self.routing_policy not in _POLICIES:
            raise bad("routing_policy", f"expected one of {_POLICIES}")
        if self.liveness_timeout_s <= 0:
            raise bad("liveness_timeout_s", "expected a number > 0")
        if self.request_timeout_s < 0:
            raise bad("request_timeout_s", "expected a number >= 0")
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise bad("reasoning_parser", f"one of {list(REASONING_PARSERS)} or empty")
        if self.progress_timeout_s < 0:
            raise bad("progress_timeout_s", "expected a number >= 0")
        if self.tokenizer_names and len(self.tokenizer_names) != len(self.tokenizer_inboxes):
            raise bad("tokenizer_names", "expected one name per tokenizer inbox")
        if self.default_max_tokens < 0 or self.max_context_len < 0:
            raise bad("default_max_tokens", "expected default_max_tokens and max_context_len >= 0")
        if self.max_file_bytes < 1:
            raise bad("max_file_bytes", "expected a number of bytes >= 1")
        if self.max_running_batch_lines < 1:
            raise bad("max_running_batch_lines", "expected an integer >= 1")
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names):
            raise bad("workers", "expected unique worker names")
        for side in (True, False):
            idxs = [w.idx for w in self.workers if w.is_decode_side == side]
            if len(set(idxs)) != len(idxs):
                raise bad("workers", "expected unique idx per side (decode/mixed, prefill)")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> RouterSpec:
        d = dict(spec)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"router spec: unknown key(s) {unknown}")
        d["tokenizer_inboxes"] = tuple(d.get("tokenizer_inboxes") or ())
        d["tokenizer_names"] = tuple(d.get("tokenizer_names") or ())
        d["advertised_tokenizer_inboxes"] = tuple(d.get("advertised_tokenizer_inboxes") or ())
        d["workers"] = tuple(_worker_from_dict(w) for w in d.get("workers") or ())
        d = {k: v for k, v in d.items() if v is not None or k in ("api_key", "launcher_inbox")}
        return cls(**d)

    @property
    def tokenizer_path_or_model(self) -> str:
        return self.tokenizer_path or self.model_path

    def to_dict(self, secrets: bool = False) -> dict[str, Any]:
        """JSON-able again; the api key is left out unless `secrets` (the launcher's copy)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "api_key" or secrets}
        d["tokenizer_inboxes"] = list(self.tokenizer_inboxes)
        d["tokenizer_names"] = list(self.tokenizer_names)
        d["advertised_tokenizer_inboxes"] = list(self.advertised_tokenizer_inboxes)
        d["workers"] = [w.__dict__.copy() for w in self.workers]
        d["limits"] = self.limits.to_dict()
        return d


def _worker_from_dict(w: dict[str, Any]) -> WorkerEntry:
    missing = [k for k in ("name", "role", "idx", "inbox") if k not in w]
    if missing:
        raise ValueError(f"router spec: worker {w!r} lacks key(s) {missing}")
    if w["role"] not in _ROLES:
        raise ValueError(f"router spec: worker {w['name']!r} role={w['role']!r}: expected {_ROLES}")
    return WorkerEntry(
        name=str(w["name"]), role=w["role"], idx=int(w["idx"]), inbox=str(w["inbox"])
    )
