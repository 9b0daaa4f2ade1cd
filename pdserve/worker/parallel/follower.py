"""A tensor-parallel follower: ranks 1.. of a worker. It holds its shards of the model and of the
KV pool and runs whatever forward pass rank 0 announces (batch_broadcast.py); it never schedules
or samples, and talks ZeroMQ only on its own KV transfer socket, when rank 0 says (kv_direct.py).
Started by rank 0 (tp_launch.py) as
`python -m pdserve.worker.parallel.follower --rank R --parent-pid P`, its settings as msgpack on
stdin; it exits on rank 0's STOP, and at once if rank 0's process is gone.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import msgpack
import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.config.process_specs import engine_config_from_dict
from pdserve.entrypoints.parent_watch import exit_with_parent
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.parallel.batch_broadcast import Command, Header, receive_header, receive_tensor
from pdserve.worker.parallel.kv_direct import FollowerKV
from pdserve.worker.parallel.tp_group import init_tp_group

logger = logging.getLogger(__name__)


def follow(runner: ModelRunner) -> Command:
    """Run rank 0's commands until it says STOP or YIELD; returns which."""
    kv: FollowerKV | None = None  # this rank's KV sender or receiver, once rank 0 opens one
    try:
        while True:
            header = receive_header(runner.tp, runner.device)
            if header.command in (Command.STOP, Command.YIELD):
                return header.command
            if header.command == Command.KV:
                kv = kv or FollowerKV.of(runner)
                kv.run(header)
                continue
            with torch.inference_mode():
                _run(runner, header)
    finally:
        if kv is not None:
            kv.close()


def _run(runner: ModelRunner, header: Header) -> None:
    """The forward pass rank 0 runs for `header`; results stay on rank 0 (logits are gathered
    there and here alike, and dropped here)."""
    model, pool = runner.model, runner.kv_pool
    if header.command == Command.LOGITS:
        shape = (header.num_tokens, runner.model_config.hidden_size)
        model.compute_logits(receive_tensor(runner.tp, shape, runner.dtype, runner.device))
        return
    fb = runner.receive_forward_batch(header)
    if header.command == Command.FORWARD:
        model(fb, pool)
        return
    hidden = model.forward_hidden(fb, pool, all_rows=True)  # FORWARD_ROWS
    if not runner.model_config.is_embedding:
        model.compute_logits(hidden[fb.logit_idx])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="rank 0: exit when gone")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [tp-rank{args.rank}] %(name)s: %(message)s",
    )
    exit_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when followers stop
    spec = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    config = engine_config_from_dict(spec["engine"])
    tp = init_tp_group(args.rank, config.tp_size, spec["init_method"], config.device)
    torch.manual_seed(config.seed)
    model_config = ModelConfig.from_hf(config.model_path, is_embedding=config.is_embedding)
    runner = ModelRunner(config, model_config, tp)
    logger.info("tensor-parallel rank %d of %d ready", args.rank, config.tp_size)
    follow(runner)
    tp.comm.close()  # released before the interpreter's exit, which could abort on it
    logger.info("tensor-parallel rank %d: stopped by rank 0", args.rank)


if __name__ == "__main__":
    main()
