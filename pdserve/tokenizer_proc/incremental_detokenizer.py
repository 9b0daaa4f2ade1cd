"""Incremental detokenization: token ids in, UTF-8-safe text deltas out, stop strings held back.

Each step decodes only a small window of ids (`prefix_offset:read_offset` is the context already
turned into text, `read_offset:` the new ids), as vLLM and SGLang do: decoding the context too keeps
tokenizers that strip a leading space (SentencePiece) or merge bytes (byte-level BPE) correct at
the window's edge. Text is released only when it ends in a whole character, and never past the
point where a stop string could still begin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish

# Prompt ids decoded as context before the first output token (SGLang and vLLM use 5 too).
PROMPT_TAIL_LEN = 5
_REPLACEMENT = "\ufffd"  # what a half-decoded multi-byte character turns into


def make_decoder(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool = True
) -> Callable[[Sequence[int]], str]:
    """A function ids -> text equal to `tokenizer.decode(ids, skip_special_tokens=...)`.

    Goes straight to the Rust backend when that gives the same text (a fast tokenizer with no
    space clean-up): three times faster than the transformers wrapper, and it runs every step.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        list(ids),
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
    )


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each id decoded alone (special tokens kept), for OpenAI logprobs `token`.

    A token holding part of a multi-byte character decodes to U+FFFD, as in vLLM and SGLang.
    """
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)


def top_token_texts(
    tokenizer: Any, top_logprobs: Sequence[Sequence[Sequence[float]]]
) -> list[list[str]]:
    """The text of every alternative in each token's top logprobs (rows of [id, logprob]),
    each id decoded alone as in `token_texts`; one batch decode for all of them."""
    flat = token_texts(tokenizer, [int(alt[0]) for row in top_logprobs for alt in row])
    texts, start = [], 0
    for row in top_logprobs:
        texts.append(flat[start : start + len(row)])
        start += len(row)
    return texts


def text_ids(ids: Sequence[int], matched_stop: str | int | None, no_stop_trim: bool) -> list[int]:
    """The ids of a request's last piece whose text is shown: the matched stop token is not
    (SGLang and vLLM leave it out of the text, and EOS is special anyway), unless no_stop_trim."""
    ids = list(ids)
    if isinstance(matched_stop, int) and not no_stop_trim and ids and ids[-1] == matched_stop:
        return ids[:-1]
    return ids


class IncrementalDetokenizer:
    """One request's output ids -> text deltas whose concatenation is the decoded output.

    `add(ids)` returns the next delta (possibly ""); `finish(matched_stop)` returns the rest,
    cut at the matched stop string. Deltas never end inside a character, and while a stop string
    might still complete, its possible beginning is held back, so no delta ever contains text
    that a stop string later removes.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids_tail: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        no_stop_trim: bool = False,
    ) -> None:
        self._decode = make_decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        tail = self._complete_tail(list(prompt_ids_tail or ())[-PROMPT_TAIL_LEN:])
        self._ids: list[int] = tail  # context tail, then every output id
        self._prefix_offset = 0  # ids[prefix_offset:read_offset]: context already in _text
        self._read_offset = len(tail)  # ids[read_offset:]: not yet turned into text
        self._text = ""  # output text so far, whole characters only
        self._num_sent = 0  # chars of _text already returned
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._num_searched = 0  # chars of _text already searched for whole stop strings
        self._stop_pos: int | None = None  # where the first whole stop string starts
        self._no_stop_trim = no_stop_trim
        self._is_finished = False

    @classmethod
    def for_request(
        cls, tokenizer: Any, prompt_ids: Sequence[int], sampling: SamplingParams
    ) -> IncrementalDetokenizer:
        """The detokenizer of one request's output, set up from its prompt and sampling."""
        return cls(
            tokenizer,
            prompt_ids_tail=prompt_ids,
            skip_special_tokens=sampling.skip_special_tokens,
            spaces_between_special_tokens=sampling.spaces_between_special_tokens,
            stop=sampling.stop,
            no_stop_trim=sampling.no_stop_trim,
        )

    @property
    def text(self) -> str:
        """The output text decoded so far (including what is held back)."""
        return self._text

    def add(self, ids: Sequence[int]) -> str:
        """Feed the next output ids; return the text that became safe to show."""
        if self._is_finished:
            raise RuntimeError("add() after finish()")
        if not ids:
            return ""
        self._ids.extend(ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD is (nearly always) a character whose remaining bytes are yet to come.
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(self._safe_end())

    def add_output(self, ids: Sequence[int], finish: Finish | None) -> str:
        """Feed the next ids a worker reported, with its finish (None while running); return
        the text to show. On a finish the rest is flushed: a matched stop token is left out of
        the text and a matched stop string cuts it (both kept with no_stop_trim)."""
        if finish is None:
            return self.add(ids)
        matched = finish.matched
        return self.add(text_ids(ids, matched, self._no_stop_trim)) + self.finish(matched)

    def finish(self, matched_stop: str | int | None = None) -> str:
        """Flush everything left. A matched stop string cuts the text at its first occurrence
        (or just after it with no_stop_trim); a stop token id is left to `text_ids`."""
        if self._is_finished:
            return ""
        self._is_finished = True
        if self._read_offset < len(self._ids):  # ids still waiting for the rest of a character
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._text += self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self._ids)
        end = len(self._text)
        if isinstance(matched_stop, str) and matched_stop:
            pos = self._text.find(matched_stop)
            if pos >= 0:
                end = pos + len(matched_stop) if self._no_stop_trim else pos
        return self._release(max(end, self._num_sent))

    # ------------------------------------------------------------------ internals

    def _complete_tail(self, tail: list[int]) -> list[int]:
        # A prompt (input_ids) may end inside a character; such a tail would misplace the
        # first delta's start, so drop ids until the tail decodes to whole characters.
        while tail and self._decode(tail).endswith(_REPLACEMENT):
            tail.pop()
        return tail

    def _safe_end(self) -> int:
        """How far into _text it is safe to release: before any stop string or its beginning."""
        if not self._stop:
            return len(self._text)
        if self._stop_pos is None:
            self._stop_pos = self._find_stop()
        if self._stop_pos is not None:
            return self._stop_pos
        text = self._text
        for k in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return len(text) - k
        return len(text)

    def _find_stop(self) -> int | None:
        # Only text added since the last search can hold a new occurrence (it must end there).
        start = max(0, self._num_searched - self._max_stop_len + 1)
        self._num_searched = len(self._text)
        hits = [p for s in self._stop if (p := self._text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _release(self, end: int) -> str:
        if end <= self._num_sent:
            return ""
        delta = self._text[self._num_sent : end]
        self._num_sent = end
        return delta
