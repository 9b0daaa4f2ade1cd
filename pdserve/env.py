"""Every environment variable pdserve reads, typed and documented in one place.

pdserve's own knobs live in the topology and the CLI; an environment variable is read only where
the environment owns the value. Each function takes the environment as an argument (default:
`os.environ`) so tests can pass a dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- set by the platform, not by pdserve


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """`XDG_CACHE_HOME` (the XDG base directory spec; default `~/.cache`) + `/pdserve`: where the
    tiny model is built and where the files and batches live unless `router.data_dir` says."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdserve"


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The default `router.data_dir` (`--data-dir`): uploaded files, batch outputs, their SQLite."""
    return cache_dir(environ) / "data"


VERTEX_PREDICT_ROUTE = "/vertex_generate"


@dataclass(frozen=True)
class VertexEnv:
    """What Vertex AI tells a custom serving container (cloud.google.com/vertex-ai/docs/
    predictions/custom-container-requirements). Outside Vertex AI none of these is set.

    - `AIP_PREDICT_ROUTE`: the path Vertex AI sends prediction requests to; served in addition
      to `/vertex_generate`.
    - `AIP_HEALTH_ROUTE`: the path Vertex AI probes for health; answers as `/health` does.
    - `AIP_HTTP_PORT`: the port the container must listen on; the router's port when `pdserve
      launch` is not given `--port`.
    """

    predict_route: str = VERTEX_PREDICT_ROUTE
    health_route: str | None = None
    http_port: int | None = None


def vertex_env(environ: Mapping[str, str] = os.environ) -> VertexEnv:
    """The Vertex AI variables, checked: a route must start with '/', the port be 1..65535."""
    predict = environ.get("AIP_PREDICT_ROUTE") or VERTEX_PREDICT_ROUTE
    health = environ.get("AIP_HEALTH_ROUTE") or None
    for name, route in (("AIP_PREDICT_ROUTE", predict), ("AIP_HEALTH_ROUTE", health)):
        if route is not None and not route.startswith("/"):
            raise ValueError(f"{name}={route!r} is invalid: expected a path starting with '/'")
    port_text = environ.get("AIP_HTTP_PORT") or None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"AIP_HTTP_PORT={port_text!r} is invalid: expected a port 1..65535")
        port = int(port_text)
    return VertexEnv(predict_route=predict, health_route=health, http_port=port)


# ---------------------------------------------------------------- secrets (never on a command line)

API_KEY_VAR = "PDSERVE_API_KEY"
CLUSTER_SECRET_VAR = "PDSERVE_CLUSTER_SECRET"


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    """`PDSERVE_API_KEY`: the bearer token the router requires on every route but /health, when
    neither `--api-key-file` nor `router.api_key` gives one. Unlike a flag, `ps` does not show it."""
    return environ.get(API_KEY_VAR) or None


def cluster_secret(environ: Mapping[str, str] = os.environ) -> str | None:
    """`PDSERVE_CLUSTER_SECRET`: the secret every process of a multi-node cluster shares; it keys
    the CURVE authentication of the internal tcp:// sockets (`security.cluster_secret` in the
    topology wins). The launcher passes it on to its children in their environment."""
    return environ.get(CLUSTER_SECRET_VAR) or None


# ---------------------------------------------------------------- testing aids

TP_ONE_GPU_VAR = "PDSERVE_TP_ONE_GPU"


def tp_one_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    """`PDSERVE_TP_ONE_GPU=1`, a testing aid: every rank of a tensor-parallel worker on CUDA runs
    on the worker's first visible GPU and the ranks join over gloo instead of NCCL (which refuses
    two ranks on one GPU), so tensor-parallel paths run on a one-GPU machine. Slow; never for
    serving. Set it in the environment the workers start from (the launcher passes it on)."""
    return environ.get(TP_ONE_GPU_VAR, "") not in ("", "0")


PROFILE_DIR_VAR = "PDSERVE_PROFILE_DIR"


def profile_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """`PDSERVE_PROFILE_DIR=<dir>`, a diagnostic: each worker process and the router run their
    loops under cProfile and write the statistics to `<dir>/<worker name>.pstats` and
    `<dir>/router.pstats` when they stop (read them with `python -m pstats`; profiling.py).
    cProfile slows the loops' Python; the shares are what it is for. Set it in the environment
    the processes start from (the launcher passes it on)."""
    value = environ.get(PROFILE_DIR_VAR, "")
    return Path(value) if value else None
