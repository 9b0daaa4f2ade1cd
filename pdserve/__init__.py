"""pdserve: LLM serving with prefill and decode disaggregated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pdserve.config.sampling_params import SamplingParams
    from pdserve.entrypoints.engine import Engine
    from pdserve.entrypoints.engine_fragment import EngineFragment

__all__ = ["Engine", "EngineFragment", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import pdserve` must stay cheap for the router and tokenizer processes.
    if name == "Engine":
        from pdserve.entrypoints.engine import Engine

        return Engine
    if name == "EngineFragment":
        from pdserve.entrypoints.engine_fragment import EngineFragment

        return EngineFragment
    if name == "SamplingParams":
        from pdserve.config.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
