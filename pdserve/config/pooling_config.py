"""How a pooling model (embeddings, rewards) turns hidden states into its output, read once from
the model directory: sentence-transformers' `modules.json` and `1_Pooling/config.json`, the
architecture's head, and the Matryoshka sizes in `config.json`.

Rules (SGLang's, so the same directory serves the same vectors):
- `is_embedding=None` detects: a `modules.json`, a bare decoder (`LlamaModel`...) or a
  `*ForSequenceClassification` head makes a pooling model; a `*ForCausalLM` stays generative.
- pooling follows `1_Pooling/config.json` (mean, last token, CLS), else the last token;
- normalize when `modules.json` lists a Normalize module; without a sentence-transformers config,
  embeddings are L2-normalized; a score head's logits never are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.config.engine_config import ModelConfig

_POOLING_MODES = {  # 1_Pooling/config.json key -> pdserve's pooling kind
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


def pooling_fields(path: Path, config: ModelConfig, is_embedding: bool | None) -> dict[str, Any]:
    """ModelConfig fields for the directory at `path`: is_embedding, pooling, normalize,
    matryoshka_dims. ValueError for a pooling config pdserve cannot follow."""
    modules = _read_json(path / "modules.json")
    is_classifier = config.num_labels > 0
    detected = modules is not None or not config.has_lm_head
    is_pooling = detected if is_embedding is None else is_embedding
    if not is_pooling:
        if is_classifier or config.architecture.endswith("Model"):
            raise ValueError(
                f"architectures={config.architecture!r} has no language-model head: serve it "
                "with is_embedding=True (--is-embedding)"
            )
        return {"is_embedding": False}
    if is_classifier:
        return {"is_embedding": True, "pooling": "last", "normalize": False}
    pooling, normalize = "last", True
    if modules is not None:
        pooling = _pooling_kind(path, modules)
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return {
        "is_embedding": True,
        "pooling": pooling,
        "normalize": normalize,
        "matryoshka_dims": _matryoshka_dims(path, config.hidden_size),
    }


def _pooling_kind(path: Path, modules: list[dict[str, Any]]) -> str:
    pooling_dirs = [m.get("path", "") for m in modules if "Pooling" in str(m.get("type", ""))]
    if not pooling_dirs:
        return "last"
    pooling = _read_json(path / pooling_dirs[0] / "config.json") or {}
    chosen = [kind for key, kind in _POOLING_MODES.items() if pooling.get(key)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    unknown = [k for k in others if k not in _POOLING_MODES]
    if unknown or len(chosen) != 1:
        raise ValueError(
            f"{pooling_dirs[0]}/config.json sets pooling modes {others}: expected exactly one of "
            f"{sorted(_POOLING_MODES)}"
        )
    return chosen[0]


def _matryoshka_dims(path: Path, hidden_size: int) -> tuple[int, ...]:
    """Sizes a request's `dimensions` may ask for: `matryoshka_dimensions` in config.json, or
    any size up to hidden_size when `is_matryoshka` is true; () when truncation is not allowed."""
    hf = _read_json(path / "config.json") or {}
    dims = hf.get("matryoshka_dimensions")
    if dims:
        return tuple(sorted(int(d) for d in dims))
    if hf.get("is_matryoshka"):
        return tuple(range(1, hidden_size + 1))
    return ()


def _read_json(file: Path) -> Any:
    return json.loads(file.read_text()) if file.is_file() else None
