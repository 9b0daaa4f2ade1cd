"""Native `/generate`, in SGLang's shapes: `text` or `input_ids` (one or a batch), `sampling_params`
(one dict or one per item), cumulative text when streaming, `meta_info` with usage and logprobs.

A client-side abort (`/abort_request`) is a normal finish here (finish_reason type "abort"), as in
SGLang; a lost worker or a timeout is an HTTP error / an error event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import ONLINE_PRIORITY, GenerateReq, ReqOutput
from pdserve.router.admission import admit, build_checked
from pdserve.router.choice_state import ChoiceState
from pdserve.router.errors import bad_request, sampling_error
from pdserve.router.generate_result import generate_result
from pdserve.router.group_reader import (
    failure_of,
    guarded,
    iter_outputs,
    open_stream,
    run_to_end,
)
from pdserve.router.lora_adapters import generate_loras, set_lora
from pdserve.router.openai_models import GenerateRequest
from pdserve.router.openai_serving import Fanout, Prompt
from pdserve.router.request_fields import check_fields
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router
from pdserve.router.sse import DONE, SSEResponse, sse, sse_error


def _prompts(body: GenerateRequest) -> tuple[list[Prompt], bool]:
    """The prompts, and whether the input was a batch (a list)."""
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("exactly one of text and input_ids is required", "text")
    if isinstance(body.text, str):
        return [Prompt(text=body.text)], False
    if body.text is not None:
        if not body.text:
            raise bad_request("text must not be an empty list", "text")
        return [Prompt(text=t) for t in body.text], True
    ids = body.input_ids or []
    if not ids:
        raise bad_request("input_ids must not be empty", "input_ids")
    if all(isinstance(t, int) for t in ids):
        return [Prompt(input_ids=list(ids))], False
    if any(not p for p in ids):
        raise bad_request("input_ids lists must not be empty", "input_ids")
    return [Prompt(input_ids=list(p)) for p in ids], True


def _samplings(body: GenerateRequest, num_prompts: int, default_max: int) -> list[SamplingParams]:
    given = body.sampling_params
    if isinstance(given, list):
        if len(given) != num_prompts:
            raise bad_request(
                f"sampling_params has {len(given)} entries for {num_prompts} prompts",
                "sampling_params",
            )
    else:
        given = [given or {}] * num_prompts
    out = []
    for d in given:
        d = {"max_new_tokens": default_max, **d}
        try:
            out.append(SamplingParams.from_dict(d))
        except ValueError as e:
            raise sampling_error(e, openai_names=False) from None
    return out


def _image_lists(image_data: Any, num_prompts: int, is_batch: bool) -> list[list[str] | None]:
    """SGLang's `image_data` per prompt: one image (a URL, path or base64 string) or a list of
    them; for a batch, a list with one such entry per prompt."""
    if image_data is None:
        return [None] * num_prompts
    entries = image_data if is_batch else [image_data]
    if not isinstance(entries, list) or len(entries) != num_prompts:
        raise bad_request(
            f"image_data must have one entry per prompt ({num_prompts}) for a batch", "image_data"
        )
    out: list[list[str] | None] = []
    for entry in entries:
        images = [entry] if isinstance(entry, str) else entry
        if images is None or images == []:
            out.append(None)
        elif isinstance(images, list) and all(isinstance(i, str) and i for i in images):
            out.append(list(images))
        else:
            raise bad_request(
                "image_data: expected a URL, path or base64 string, or a list of them", "image_data"
            )
    return out


def _video_lists(video_data: Any, num_prompts: int, is_batch: bool) -> list[list[Any] | None]:
    """SGLang's `video_data` per prompt: one video or a list of them, a video being a file (a
    URL, path or base64 string) or a list of frames (such strings); for a batch, a list with
    one such entry per prompt."""
    if video_data is None:
        return [None] * num_prompts
    entries = video_data if is_batch else [video_data]
    if not isinstance(entries, list) or len(entries) != num_prompts:
        raise bad_request(
            f"video_data must have one entry per prompt ({num_prompts}) for a batch", "video_data"
        )
    out: list[list[Any] | None] = []
    for entry in entries:
        videos = [entry] if isinstance(entry, str) else entry
        if videos is None or videos == []:
            out.append(None)
        elif isinstance(videos, list) and all(_is_video(v) for v in videos):
            out.append(list(videos))
        else:
            raise bad_request(
                "video_data: expected a video (a URL, path or base64 string, or a list of frames "
                "as such strings), or a list of videos",
                "video_data",
            )
    return out


def _is_video(video: Any) -> bool:
    frames = video if isinstance(video, list) else [video]
    return bool(frames) and all(isinstance(f, str) and f for f in frames)


def build_generate(body: GenerateRequest, default_max: int) -> tuple[Fanout, bool]:
    """The sub-requests, and whether the response is a list."""
    check_fields(body, "generate")
    prompts, is_batch = _prompts(body)
    params = _samplings(body, len(prompts), default_max)
    images = _image_lists(body.image_data, len(prompts), is_batch)
    videos = _video_lists(body.video_data, len(prompts), is_batch)
    num_copies = [p.n for p in params]
    num_subs = sum(num_copies)
    is_list = is_batch or num_subs > 1
    group_id, rids = _rids(body.rid, num_subs, is_list)
    reqs, keys, k = [], [], 0
    for p_idx, (prompt, sp) in enumerate(zip(prompts, params)):
        for i in range(sp.n):
            sampling = sp.to_dict()
            sampling["n"] = 1
            if sp.seed is not None:
                sampling["seed"] = sp.seed + i
            reqs.append(
                GenerateReq(
                    rid=rids[k], sampling=sampling, text=prompt.text, input_ids=prompt.input_ids,
                    return_logprob=body.return_logprob, top_logprobs_num=body.top_logprobs_num,
                    priority=body.priority or ONLINE_PRIORITY,
                    return_hidden_states=body.return_hidden_states,
                    logprob_start_len=body.logprob_start_len if body.return_logprob else -1,
                    image_data=images[p_idx], video_data=videos[p_idx],
                )
            )  # fmt: skip
            keys.append(p_idx)
            k += 1
    return Fanout(group_id, reqs, keys, 1, int(time.time())), is_list


def _rids(rid: str | list[str] | None, num_subs: int, is_list: bool) -> tuple[str, list[str]]:
    if isinstance(rid, list):
        if len(rid) != num_subs:
            raise bad_request(f"rid has {len(rid)} entries for {num_subs} outputs", "rid")
        return uuid.uuid4().hex, list(rid)
    group_id = rid or uuid.uuid4().hex
    if not is_list:
        return group_id, [group_id]
    return group_id, [f"{group_id}-{k}" for k in range(num_subs)]


async def generate(router: Router, request: Request, body: GenerateRequest) -> Response:
    fan, is_list = build_checked(lambda: build_generate(body, router.spec.default_max_tokens))
    set_lora(fan.reqs, generate_loras(router.lora, body.lora_path, fan.route_keys))
    admit(router, fan, "text")
    group = router.submit(fan.group_id, fan.reqs, fan.route_keys)
    if body.stream:
        buffered = await open_stream(router, request, group, abort_is_error=False)

        def events() -> AsyncIterator[str]:
            return _generate_events(body, group, buffered, is_list)

        return SSEResponse(guarded(router, group, events))
    choices = await run_to_end(router, request, group, abort_is_error=False)
    items = [_item(c, body, group) for c in choices]
    return JSONResponse(items if is_list else items[0])


def _item(c: ChoiceState, body: GenerateRequest, group: RequestGroup) -> dict[str, Any]:
    return generate_result(
        c,
        e2e_latency=time.monotonic() - group.created,
        return_logprob=body.return_logprob,
        top_logprobs_num=body.top_logprobs_num,
        return_text_in_logprobs=body.return_text_in_logprobs,
        return_hidden_states=body.return_hidden_states,
    )


async def _generate_events(
    body: GenerateRequest,
    group: RequestGroup,
    buffered: list[tuple[int, ReqOutput]],
    is_list: bool,
) -> AsyncIterator[str]:
    states = [ChoiceState(i, rid) for i, rid in enumerate(group.rids)]
    async for index, out in iter_outputs(buffered, group):
        states[index].add(out)
        err = failure_of(out, abort_is_error=False)
        if err is not None:
            yield sse_error(err.message, err.status)
            yield DONE
            return
        item = _item(states[index], body, group)
        if is_list:
            item["index"] = index
        yield sse(item)
    yield DONE
