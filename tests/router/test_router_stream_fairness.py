"""The router hands each output to its stream before it reads the next one, even when many are
queued on its inbox: a backlog (a burst of steps, a router that fell behind) must not turn into
clumps of tokens written all at once. Counted, not timed: how many outputs were already waiting in a
stream's queue each time the stream took one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq

from pdserve import protocol
from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.ipc import new_ipc_address
from pdserve.protocol import Finish, ReqOutput
from pdserve.router.request_tracker import RequestGroup, Tracked
from pdserve.router.router import Router

NUM_STREAMS = 3
NUM_OUTPUTS = 40  # per stream


def _router(folder: Path) -> Router:
    spec = RouterSpec(
        model_name="tiny",
        inbox=new_ipc_address("router", str(folder)),
        tokenizer_inboxes=(new_ipc_address("tok", str(folder)),),
        workers=(WorkerEntry("mixed0", "mixed", 0, new_ipc_address("w", str(folder))),),
    )
    return Router(spec)


def _outputs(rid: str) -> list[ReqOutput]:
    outs = [ReqOutput(rid, "x", [k], None, completion_tokens=k + 1) for k in range(NUM_OUTPUTS)]
    outs[-1].finish = Finish.at_length(NUM_OUTPUTS)
    return outs


async def _waiting_at_each_take(group: RequestGroup) -> list[int]:
    """For each output the stream takes, how many more were already queued behind it."""
    waiting = []
    while not group.is_done:
        await group.next_output()
        waiting.append(group.queue.qsize())
    return waiting


def test_a_backlog_on_the_inbox_reaches_every_stream_one_output_at_a_time(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[list[int]]:
        router = _router(tmp_path)
        await router.start()
        try:
            groups = [RequestGroup(f"g{i}", [f"r{i}"]) for i in range(NUM_STREAMS)]
            for i, group in enumerate(groups):
                router.tracker.add(Tracked(f"r{i}", group, 0, 0, "mixed0", None))
            readers = [asyncio.create_task(_waiting_at_each_take(g)) for g in groups]
            await asyncio.sleep(0.05)  # the router and the streams wait on their inputs
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.connect(router.spec.inbox)
            steps = zip(*(_outputs(f"r{i}") for i in range(NUM_STREAMS)))
            for step in steps:  # as a tokenizer sends them: one step of every stream, then the next
                for out in step:
                    push.send(protocol.encode(out))
            time.sleep(0.5)  # blocks the loop: the whole burst lands on the inbox first
            waiting = await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
            push.close(0)
            return waiting
        finally:
            await router.stop()

    waiting = asyncio.run(scenario())
    assert [len(w) for w in waiting] == [NUM_OUTPUTS] * NUM_STREAMS
    # A router that read the whole backlog before the streams ran would leave all 40 queued.
    assert max(max(w) for w in waiting) == 0, waiting
