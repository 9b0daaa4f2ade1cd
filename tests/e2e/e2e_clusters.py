"""The CPU clusters the end-to-end tests start (a module of its own, so that test modules can
import it by a name no other test folder uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port


def start_cluster(model: Path, mode: str, **overrides: Any) -> Cluster:
    topology = Topology.for_model(
        str(model),
        mode=mode,
        device="cpu",
        port=_free_port(),
        num_pages=1024,
        page_size=4,
        **overrides,
    )
    return Cluster(topology, log_level="warning", start_timeout_s=180).start()
