"""Constrained decoding on the worker that samples: each constrained request's xgrammar matcher.

1. `bind_grammar` (at admission, on every role) checks the grammar and starts compiling it on a
   thread, so the compile overlaps the request's wait and prefill and never stalls the loop. The
   model's vocabulary is prepared for xgrammar once per process (`GrammarBackend`, on that thread
   for the first constrained request), and xgrammar's compiler keeps each grammar by its text.
2. The sampler fills each constrained row's token bitmask from the matcher (`grammar_mask.py`).
3. `FinishChecker.check` feeds the matcher every token appended to the output, the prefill's
   first token included (a decode worker binds a fresh matcher and feeds it that token: the
   matcher's state travels as the tokens themselves), and ends the request when the grammar has.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pdserve.config.sampling_params import GrammarSpec
from pdserve.grammar_check import (
    check_grammar,
    full_grammar_text,
    structural_tag_json,
    xgrammar_reason,
)
from pdserve.scheduler.request import Request

logger = logging.getLogger(__name__)

_COMPILE_THREADS = 1  # compiles are rare (cached by text) and release the GIL only in part
_CACHE_LIMIT_BYTES = 512 << 20  # xgrammar's cache of compiled grammars, per process


class GrammarBackend:
    """One model's vocabulary prepared for xgrammar, and a compiler whose cache keeps each
    compiled grammar by its text. Built once per (model, process)."""

    def __init__(self, model_path: str, vocab_size: int) -> None:
        import xgrammar as xgr
        from transformers import AutoTokenizer

        from pdserve.config.engine_config import ModelConfig

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"structured output needs the model's tokenizer: {e}") from None
        stop_ids = list(ModelConfig.from_hf(model_path).eos_token_ids) or None
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_CACHE_LIMIT_BYTES)

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (xgrammar.CompiledGrammar); RuntimeError when it cannot be."""
        if spec.after_reasoning is not None:  # thinking first: compiled (and cached) by text
            return self.compiler.compile_grammar(full_grammar_text(spec))
        if spec.kind == "regex":
            return self.compiler.compile_regex(spec.text)
        if spec.kind == "ebnf":
            return self.compiler.compile_grammar(spec.text)
        if spec.kind == "structural_tag":
            return self.compiler.compile_structural_tag(structural_tag_json(spec.text))
        # A json_schema is enforced strictly (no properties or items beyond the schema's, as
        # SGLang and vLLM do); json_object is any object.
        return self.compiler.compile_json_schema(spec.text, strict_mode=spec.kind == "json_schema")


class RequestGrammar:
    """One request's grammar: its compile (running on the backend's thread) and its matcher,
    created from the compiled grammar on first use."""

    def __init__(self, spec: GrammarSpec, compiled: Future[Any]) -> None:
        self.spec = spec
        self._compiled = compiled
        self._matcher: Any = None  # xgrammar.GrammarMatcher once compiled
        self._problem: str | None = None
        # The matcher's stop tokens: it terminates only by accepting one (xgrammar's default,
        # terminate_without_stop_token=False), so no other token needs `is_terminated` asked.
        self.stop_ids: frozenset[int] = frozenset()

    def is_ready(self) -> bool:
        """The compile has ended (well or not): nothing that needs the matcher will wait."""
        return self._matcher is not None or self._compiled.done()

    def problem(self) -> str | None:
        """Why this grammar cannot constrain sampling (its compile failed), or None; waits for
        the compile."""
        if self._matcher is None:  # read every step for every constrained row: the fast path
            self._resolve()
        return self._problem

    @property
    def matcher(self) -> Any:
        """The xgrammar.GrammarMatcher (waits for the compile); ValueError if it failed."""
        if self._matcher is None:
            self._resolve()
            if self._matcher is None:
                raise ValueError(self._problem)
        return self._matcher

    def accept_token(self, token_id: int) -> bool:
        """Advance past `token_id`; False (state unchanged) when the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted its stop token: nothing may follow."""
        return bool(self.matcher.is_terminated())

    def ended_by(self, token_id: int) -> bool:
        """`is_terminated`, just after the matcher accepted `token_id`: asked of xgrammar only
        for a stop token."""
        return token_id in self.stop_ids and self.is_terminated()

    def _resolve(self) -> None:
        if self._matcher is not None or self._problem is not None:
            return
        import xgrammar as xgr

        try:
            compiled = self._compiled.result()
        except Exception as e:  # xgrammar raises RuntimeError; anything else is reported too
            self._problem = f"{self.spec.kind} could not be compiled: {xgrammar_reason(e)}"
            return
        self._matcher = xgr.GrammarMatcher(compiled)
        self.stop_ids = frozenset(self._matcher.stop_token_ids)


# ---- the process's backends --------------------------------------------------------------

_lock = threading.Lock()
_backends: dict[tuple[str, int], GrammarBackend] = {}
_compile_pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar-compile")


def backend_for(vocab_size: int, model_path: str) -> GrammarBackend:
    """The process's backend for the model, built on first use (loading the tokenizer: seconds
    for a large vocabulary)."""
    with _lock:
        path = str(model_path)
        backend = _backends.get((path, vocab_size))
        if backend is None:
            backend = GrammarBackend(path, vocab_size)
            _backends[(path, vocab_size)] = backend
            logger.info("grammar backend ready for %s (vocab %d)", path, vocab_size)
        return backend


def bind_grammar(req: Request, vocab_size: int, model_path: str) -> None:
    """Give req its grammar matcher when its sampling parameters ask for constrained output;
    ValueError naming the problem when the grammar cannot be compiled. model_path: the model
    whose tokenizer the grammar is compiled for."""
    spec = req.sampling.grammar
    if spec is None:
        req.grammar = None
        return
    check_grammar(req.sampling)
    compiled = _compile_pool.submit(lambda: backend_for(vocab_size, model_path).compile(spec))
    req.grammar = RequestGrammar(spec, compiled)
