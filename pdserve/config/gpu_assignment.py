"""Which GPUs the workers whose `gpus` a topology leaves out get (`Topology.resolved()`)."""

from __future__ import annotations

from pdserve.config.topology_sections import Role, WorkerConfig


def assign_gpus(entries: list[tuple[str, Role, WorkerConfig]], num_gpus: int) -> dict:
    """GPUs for the workers whose gpus are not given, by key path: the lowest GPUs of the node no
    worker holds; then a decode worker may share a GPU that only a prefill worker holds."""
    held: dict[tuple[str | None, int], set[str]] = {}
    for _, role, w in entries:
        for gpu in w.gpus or ():
            held.setdefault((w.node, gpu), set()).add(role)
    assigned: dict[str, tuple[int, ...]] = {}
    for path, role, w in entries:
        if w.gpus is not None:
            continue
        free = [g for g in range(num_gpus) if not held.get((w.node, g))]
        if role == "decode":
            free += [g for g in range(num_gpus) if held.get((w.node, g)) == {"prefill"}]
        if len(free) < w.tp:
            raise ValueError(
                f"{path}.gpus: no free GPU left to assign ({num_gpus} visible per node): "
                "list gpus explicitly"
            )
        assigned[path] = tuple(free[: w.tp])
        for gpu in assigned[path]:
            held.setdefault((w.node, gpu), set()).add(role)
    return assigned
