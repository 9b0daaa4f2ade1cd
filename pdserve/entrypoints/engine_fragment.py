"""The offline engine as one tensor-parallel rank of a job that torchrun (or any launcher) started:
SGLang's torchrun example, where every process builds a fragment on its own device and the
caller lays the processes out as a tp x dp mesh.

Every rank of a tp group makes an `EngineFragment` with the group and calls `generate` with the
same arguments at the same time. Rank 0 of the group runs the engine (scheduling, sampling) and
returns the results; the other ranks run the forward passes it announces (worker/parallel/) and
return None. Each dp group (each tp group) generates its own prompts independently.
"""

from __future__ import annotations

from typing import Any

from pdserve.worker.parallel.batch_broadcast import Command, Header, send_header
from pdserve.worker.parallel.tp_group import TPGroup, group_of


class EngineFragment:
    def __init__(
        self,
        model_path: str,
        tp_size: int,
        tp_rank: int,
        tp_group: Any = None,
        device_index: int | None = None,
        **options: Any,
    ) -> None:
        """tp_group: the torch.distributed group of this rank's tp group (a device mesh's
        `mesh["tp"].get_group()`); None: the default group (then tp_size is the world size).
        device_index: this rank's CUDA device (default: cuda:<tp_rank>). Options are the
        in-process Engine's (device, dtype, num_pages, ...)."""
        import torch.distributed as dist

        group = tp_group if tp_group is not None else dist.group.WORLD
        self.tp: TPGroup = group_of(group, tp_rank, tp_size, device_index)
        self._engine: Any = None
        self._runner: Any = None
        self._closed = False
        if tp_rank == 0:
            from pdserve.entrypoints.engine import InProcessEngine

            self._engine = InProcessEngine(model_path, tp_group=self.tp, tp_size=tp_size, **options)
        else:
            self._runner = _follower_runner(model_path, tp_size, self.tp, options)

    @property
    def is_leader(self) -> bool:
        """Whether this rank returns the results (rank 0 of its tp group)."""
        return self.tp.rank == 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The in-process Engine's generate on rank 0 (its results); None on the other ranks,
        which must call it too (their arguments are not read)."""
        if not self.is_leader:
            self._follow()
            return None
        try:
            return self._engine.generate(*args, **kwargs)
        finally:
            self._tell(Header(Command.YIELD))

    def shutdown(self) -> None:
        """Every rank calls it (like generate)."""
        if self._closed:
            return
        self._closed = True
        if self.is_leader:
            self._tell(Header(Command.STOP))
            self._engine.shutdown()
        else:
            self._follow()

    def __enter__(self) -> EngineFragment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _follow(self) -> None:
        from pdserve.worker.parallel.follower import follow

        follow(self._runner)

    def _tell(self, header: Header) -> None:
        if self.tp.is_parallel:
            send_header(self.tp, header, self._engine.core.runner.device)


def _follower_runner(model_path: str, tp_size: int, tp: TPGroup, options: dict[str, Any]) -> Any:
    import torch

    from pdserve.config.engine_config import EngineConfig, EngineOptions, ModelConfig
    from pdserve.worker.model_runner import ModelRunner

    _, config_options = EngineOptions.split(options)
    config = EngineConfig.from_options(model_path, tp_size=tp_size, **config_options).resolved()
    torch.manual_seed(config.seed)
    model_config = ModelConfig.from_hf(config.model_path, is_embedding=config.is_embedding)
    return ModelRunner(config, model_config, tp)
