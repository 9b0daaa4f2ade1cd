"""A worker's tensor-parallel group: which rank this process is, and the collectives the sharded
layers need (one all-reduce after each row-parallel matmul, one all-gather of the vocab shards).

tp 1 is the same object with `size == 1`: every collective is then the identity, so the layers
have one code path and a single-device worker pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch


class Shard(NamedTuple):
    """This rank's slice of a dimension of `total` elements: [start, start + size)."""

    start: int
    size: int


class Communicator:
    """The ranks' process group, held in one place so that `close()` releases it for every layer
    that holds the TPGroup (a group left to the interpreter's exit can abort the process)."""

    def __init__(self, group: Any, store: Any = None) -> None:
        self.group = group  # a torch ProcessGroup or backend (gloo, NCCL): its collectives' API
        self.store = store  # the TCPStore the group was made with, kept alive as long

    def close(self) -> None:
        self.group = None
        self.store = None

    @property
    def pg(self) -> Any:
        if self.group is None:
            raise RuntimeError("the tensor-parallel group is closed")
        return self.group


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    comm: Communicator | None = None  # None: tp 1
    device_index: int | None = None  # this rank's CUDA device; None: cuda:<rank>

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank={self.rank} is invalid: expected 0..{self.size - 1}")
        if self.size > 1 and self.comm is None:
            raise ValueError(f"tp_size={self.size} needs a process group: expected comm")

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    # The process group's own methods (not torch.distributed's functions): they need no default
    # group, so a tensor-parallel engine can live in a process that has one, or several engines.

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's partial x, in place."""
        if self.comm is not None:
            self.comm.pg.allreduce([x]).wait()
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], the ranks' parts in rank order."""
        if self.comm is None:
            return x
        return torch.cat(self.all_gather(x), dim=-1)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on each), in rank order."""
        if self.comm is None:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.comm.pg.allgather([parts], [x.contiguous()]).wait()
        return parts

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """x on the group's first rank copied into x on every rank, in place."""
        if self.comm is not None:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.comm.pg.broadcast([x], opts).wait()
        return x

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest `value` any rank has (each rank's KV pool must fit the same page ids)."""
        if self.comm is None:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.comm.pg.allreduce([t], opts).wait()
        return int(t.item())

    def split(self, total: int, name: str) -> Shard:
        """An even split of `total` (heads, intermediate rows); ValueError naming `name`."""
        if total % self.size:
            raise ValueError(f"{name}={total} is invalid for tp={self.size}: expected a multiple")
        size = total // self.size
        return Shard(self.rank * size, size)

    def kv_heads(self, num_kv_heads: int) -> Shard:
        """The KV heads this rank holds: an even split, or one replicated head when tp exceeds
        the KV head count (ranks rank*H/tp .. share head rank // (tp / H), as vLLM does)."""
        if num_kv_heads % self.size == 0:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} is invalid for tp={self.size}: expected a "
                "multiple or a divisor of tp"
            )
        return Shard(self.rank // (self.size // num_kv_heads), 1)

    def vocab(self, vocab_size: int) -> Shard:
        """This rank's rows of a vocab-parallel table: ceil(V / tp) rows each (the last rank's
        tail is padding); `size` is the rows it really holds."""
        per_rank = -(-vocab_size // self.size)
        start = min(self.rank * per_rank, vocab_size)
        return Shard(start, min(per_rank, vocab_size - start))


SINGLE = TPGroup()

# A follower waits in a broadcast for as long as its worker is idle: the group's timeout must not
# end an idle worker. A dead peer still ends a wait at once (its connection closes).
_GROUP_TIMEOUT = timedelta(days=7)
_JOIN_TIMEOUT = timedelta(minutes=5)  # for every rank to reach the store


def init_tp_group(rank: int, size: int, init_method: str, device: str) -> TPGroup:
    """Join this worker's ranks (NCCL on CUDA, gloo on CPU) through a TCP store at `init_method`
    (`tcp://host:port`, served by rank 0). No default process group is made (see TPGroup).

    With `PDSERVE_TP_ONE_GPU=1` (env.py; a testing aid) CUDA ranks all run on the first visible
    GPU and join over gloo, whose allreduce, allgather and broadcast take CUDA tensors (staged
    through the host): NCCL refuses two ranks on one GPU."""
    import torch.distributed as dist

    from pdserve import env

    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    store = dist.TCPStore(host, int(port), size, rank == 0, timeout=_JOIN_TIMEOUT)
    if device == "cuda" and env.tp_one_gpu():
        group = dist.ProcessGroupGloo(store, rank, size, _GROUP_TIMEOUT)
        return TPGroup(rank, size, Communicator(group, store), device_index=0)
    if device == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _GROUP_TIMEOUT
        group = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        group = dist.ProcessGroupGloo(store, rank, size, _GROUP_TIMEOUT)
    return TPGroup(rank, size, Communicator(group, store))


def group_of(process_group: Any, rank: int, size: int, device_index: int | None = None) -> TPGroup:
    """A TPGroup over a torch.distributed group made elsewhere (dist.new_group, torchrun)."""
    comm = Communicator(process_group) if size > 1 else None
    return TPGroup(rank, size, comm, device_index)
