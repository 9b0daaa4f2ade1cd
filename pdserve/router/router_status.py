"""What the router says about itself: whether it is ready and can serve, the /health body, and
/server_info (every worker's and tokenizer's state and load)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pdserve.router.errors import APIError
from pdserve.router.worker_registry import WorkerState

if TYPE_CHECKING:
    from pdserve.router.router import Router


def is_ready(router: Router) -> bool:
    """Started, and every tokenizer and worker healthy (what /health reports); with
    membership, also a complete route: a router no worker has joined is not ready."""
    if router.membership is not None and not router.can_serve():
        return False
    return router.is_started and router.workers.all_healthy()


def health(router: Router) -> tuple[bool, dict[str, Any]]:
    """(is ready, the /health body): every process by name with its status."""
    processes = {p.name: p.live.status for p in router.workers.processes()}
    if router.is_ready():
        return True, {"status": "ok", "processes": processes}
    unhealthy = [name for name, status in processes.items() if status != "healthy"]
    status = "starting" if not router.is_started else "unhealthy"
    body = {"status": status, "unhealthy": unhealthy, "processes": processes}
    if router.is_started and router.membership is not None:
        try:
            check_route(router)
        except APIError as e:
            body["message"] = e.message
    return False, body


def can_serve(router: Router) -> bool:
    """Started, and at least one complete route (a decode-side worker, and prefill if needed)."""
    if not router.is_started:
        return False
    try:
        check_route(router)
    except APIError:
        return False
    return True


def check_route(router: Router) -> None:
    """Raise the 503 a request would get now for want of a complete route (nothing is picked)."""
    decode_side = router.workers.decode_side()
    if not decode_side:
        raise APIError(router.no_worker_message("decode"), 503)
    if all(s.spec.role == "decode" for s in decode_side) and not router.workers.prefill():
        raise APIError(router.no_worker_message("prefill"), 503)
    if not router.workers.healthy_tokenizers():
        raise APIError("no healthy tokenizer", 503)


def server_info(router: Router) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "model_name": router.spec.model_name,
        "model_path": router.spec.model_path,
        "routing_policy": router.spec.routing_policy,
        "max_context_len": router.spec.max_context_len,
        "num_tokenizers": len(router.workers.tokenizers),  # with those that joined
        "num_requests_in_flight": len(router.tracker),
        "topology": router.spec.topology,
        "workers": [_worker_info(s, now) for s in router.workers],
        "tokenizers": [
            {
                "name": t.name,
                "idx": t.idx,
                "status": t.live.status,
                "pid": t.live.pid,
                "routable": t.can_take_requests,
                "num_requests": t.num_requests,  # routed through it so far
                "num_in_flight": len(router.tracker.lost_with_tokenizer(t.idx)),
            }
            for t in router.workers.tokenizers
        ],
    }


def _worker_info(state: WorkerState, now: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": state.name,
        "role": state.spec.role,
        "idx": state.spec.idx,
        "healthy": state.is_healthy,
        "routable": state.can_take_requests,
        "status": state.live.status,
        "pid": state.live.pid,
        "last_report_age_s": round(now - state.report_at, 3) if state.report_at else None,
    }
    r = state.report
    if r is not None:
        info.update(
            num_running_reqs=r.num_running,
            num_queue_reqs=r.num_queued,
            num_free_pages=r.num_free_pages,
            num_total_pages=r.num_total_pages,
            num_cached_pages=r.num_cached_pages,
            cache_hit_rate=r.cache_hit_rate,
            step_time_ms=r.step_time_ms,
            num_preemptions=r.num_preemptions,
            num_loaded_adapters=r.num_loaded_adapters,
            num_adapter_slots_used=r.num_adapter_slots_used,
        )
    return info
