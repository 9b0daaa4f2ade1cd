"""Admission at the edge: a request's sub-requests, once built, are checked against
`router.limits` and the router's capacity before any of them is routed.

Every route builds its sub-requests through `build_checked`, so a value the models let through but
the builder chokes on is still the client's 400, never a 500; then `admit` refuses what is too big
(400) or what would overfill the router (429 with Retry-After, as OpenAI does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TypeVar

from pdserve.config.request_limits import RequestLimits
from pdserve.config.sampling_params import GRAMMAR_TEXT_KEYS
from pdserve.protocol import GenerateReq
from pdserve.router.errors import APIError, bad_request
from pdserve.router.openai_serving import Fanout
from pdserve.router.router import Router

logger = logging.getLogger(__name__)

T = TypeVar("T")


def build_checked(build: Callable[[], T]) -> T:
    """`build()`, with any failure but an APIError turned into a 400 naming the error."""
    try:
        return build()
    except APIError:
        raise
    except Exception as e:  # a gap in the validation: still the request's fault
        logger.warning("request refused while building it: %r", e, exc_info=True)
        raise bad_request(f"invalid request: {type(e).__name__}: {e}") from None


def admit(router: Router, fan: Fanout, prompt_param: str) -> None:
    """Refuse the request if it is over a size limit (400) or the router is full (429); stamp
    the tokenizer-side limit on each sub-request. `prompt_param`: the body's prompt field."""
    limits = router.spec.limits
    check_sizes(limits, fan.reqs, fan.route_keys, prompt_param)
    check_capacity(router, len(fan.reqs))
    for req in fan.reqs:
        req.max_prompt_tokens = limits.max_prompt_tokens


def check_sizes(
    limits: RequestLimits, reqs: list[GenerateReq], route_keys: list[int], prompt_param: str
) -> None:
    num_prompts = len(set(route_keys))
    if num_prompts > limits.max_prompts:
        raise bad_request(
            f"the request has {num_prompts} prompts: expected at most {limits.max_prompts}",
            prompt_param,
        )
    if len(reqs) > limits.max_choices:
        raise bad_request(
            f"the request asks for {len(reqs)} completions (n x prompts): expected at most "
            f"{limits.max_choices}",
            "n",
        )
    seen_keys: set[int] = set()
    for req, key in zip(reqs, route_keys):
        if key not in seen_keys:  # the n copies of a prompt share it: check it once
            seen_keys.add(key)
            _check_prompt(limits, req, prompt_param)
        _check_sampling(limits, req.sampling)


def _check_prompt(limits: RequestLimits, req: GenerateReq, prompt_param: str) -> None:
    if req.messages is not None:
        num_chars = sum(len(m.get("content") or "") for m in req.messages)
        what, param = "messages' content", "messages"
        if req.tools:  # rendered into the prompt by the chat template too
            num_chars += len(json.dumps(req.tools))
            what = "messages' content and tools"
    elif req.text is not None:
        num_chars, what, param = len(req.text), "prompt", prompt_param
    else:
        num_tokens = len(req.input_ids or ())
        limit = limits.max_prompt_tokens
        if limit and num_tokens > limit and not req.truncate_prompt_tokens:  # else: cut later
            param = "input_ids" if prompt_param == "text" else prompt_param
            raise bad_request(
                f"the prompt has {num_tokens} tokens: expected at most {limit}", param
            )
        return
    if num_chars > limits.max_prompt_chars:
        raise bad_request(
            f"the {what} has {num_chars} characters: expected at most {limits.max_prompt_chars}",
            param,
        )


def _check_sampling(limits: RequestLimits, sampling: dict) -> None:
    seed = sampling.get("seed")
    if seed is not None and not -(2**63) <= seed < 2**64:  # seed + i of the n copies
        raise bad_request(f"seed={seed} plus the sample index passes 2**64 - 1", "seed")
    stop = sampling.get("stop") or ()
    if len(stop) > limits.max_stop_strings:
        raise bad_request(
            f"{len(stop)} stop strings: expected at most {limits.max_stop_strings}", "stop"
        )
    longest = max((len(s) for s in stop), default=0)
    if longest > limits.max_stop_chars:
        raise bad_request(
            f"a stop string has {longest} characters: expected at most {limits.max_stop_chars}",
            "stop",
        )
    num_ids = len(sampling.get("stop_token_ids") or ())
    if num_ids > limits.max_stop_token_ids:
        raise bad_request(
            f"{num_ids} stop_token_ids: expected at most {limits.max_stop_token_ids}",
            "stop_token_ids",
        )
    for key in GRAMMAR_TEXT_KEYS:
        text = sampling.get(key)
        if isinstance(text, dict):  # a schema or structural tag sent as an object
            text = json.dumps(text)
        if isinstance(text, str) and len(text) > limits.max_grammar_chars:
            raise bad_request(
                f"{key} has {len(text)} characters: expected at most {limits.max_grammar_chars} "
                "(router.limits.max_grammar_chars)",
                key,
            )
    num_bias = len(sampling.get("logit_bias") or ())
    if num_bias > limits.max_logit_bias:
        raise bad_request(
            f"logit_bias has {num_bias} entries: expected at most {limits.max_logit_bias}",
            "logit_bias",
        )


def check_capacity(router: Router, num_new: int) -> None:
    """429 with Retry-After when `num_new` more sub-requests would pass `max_in_flight`."""
    limits = router.spec.limits
    if num_new > limits.max_in_flight:
        raise bad_request(
            f"the request asks for {num_new} completions but the server holds at most "
            f"{limits.max_in_flight} at once",
            "n",
        )
    num_in_flight = len(router.tracker)
    if num_in_flight + num_new > limits.max_in_flight:
        raise APIError(
            f"the server is busy ({num_in_flight} requests in flight, at most "
            f"{limits.max_in_flight}): retry after {limits.retry_after_s} s",
            429,
            code="rate_limit_exceeded",
            err_type="rate_limit_error",
            headers={"Retry-After": str(limits.retry_after_s)},
        )
