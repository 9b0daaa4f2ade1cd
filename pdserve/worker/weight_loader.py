"""Loads a Hugging Face safetensors checkpoint into a model, one tensor at a time.

Checkpoint names are the model's parameter names, except for merged modules: their rows are
filled from several checkpoint tensors (`...self_attn.qkv_proj.weight` from `...q_proj.weight`,
`...k_proj.weight` and `...v_proj.weight`). Every parameter must be filled exactly by the
checkpoint: a missing or unexpected tensor is an error naming it, before any bytes are read.

A module with `checkpoint_slices` (worker/parallel/layers.py) says which slice of which tensor
fills each of its parameters: a tensor-parallel rank reads only its shard (safetensors get_slice),
never the whole tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from pdserve.worker.parallel.layers import CheckpointSlice
from pdserve.worker.parallel.tp_group import Shard

logger = logging.getLogger(__name__)

# Checkpoint tensors that are not weights (old Llama checkpoints saved rope's inv_freq buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes: `param` narrowed along `where.dim`, from the tensor's
    slice `where.shard` (the whole tensor when not sharded)."""

    param: nn.Parameter
    where: CheckpointSlice


def load_weights(model: nn.Module, model_path: str | Path) -> None:
    """Fill every parameter of `model` from `model_path`, cast to the parameter's dtype and device."""
    tensor_files = _checkpoint_index(Path(model_path))  # checkpoint name -> file
    targets, aliases = _weight_targets(model)
    aliases |= set(getattr(model, "ignored_weights", ()))  # a head the model does not use
    names = [n for n in tensor_files if not _is_ignored(n, aliases)]
    # A bare decoder's checkpoint (LlamaModel.save_pretrained) has no "model." prefix.
    names = [_with_prefix(n, targets) for n in names]
    _check_names(names, targets, model_path)

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(tensor_files[_stored_name(name, tensor_files)], []).append(name)
    # A progress bar only for sharded checkpoints: small ones load too fast to need one.
    progress = tqdm(
        total=len(names), desc="loading weights", unit="tensor", disable=len(by_file) < 2
    )
    with torch.no_grad(), progress:
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in file_names:
                    _copy_into(targets[name], f.get_slice(_stored_name(name, tensor_files)), name)
                    progress.update()
    logger.info("loaded %d tensors from %d file(s) in %s", len(names), len(by_file), model_path)


def _checkpoint_index(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single file or sharded)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}
    raise ValueError(
        f"model path {str(path)!r} has neither model.safetensors nor "
        "model.safetensors.index.json: expected a Hugging Face safetensors checkpoint"
    )


def _weight_targets(model: nn.Module) -> tuple[dict[str, _Target], set[str]]:
    """(checkpoint name -> target for every tensor the model needs, names of tied aliases).

    A parameter shared by two modules (tied embeddings: lm_head.weight is embed_tokens.weight) is
    filled once, under the first name; the other names are aliases whose tensors may be skipped.
    """
    targets: dict[str, _Target] = {}
    aliases: set[str] = set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in seen:
                aliases.add(full_name)
                continue
            seen.add(id(param))
            slices = getattr(module, "checkpoint_slices", None)
            if slices is None:
                rows = param.shape[0]
                where = CheckpointSlice(full_name, 0, 0, Shard(0, rows), rows)
                targets[full_name] = _Target(param, where)
                continue
            parent, _, own_name = module_name.rpartition(".")
            prefix = f"{parent}." if parent else ""
            for where in slices(param_name, own_name):
                targets[prefix + where.name] = _Target(param, where)
    return targets, aliases


_BASE_PREFIX = "model."


def _with_prefix(name: str, targets: dict[str, _Target]) -> str:
    """The model's name for checkpoint tensor `name`: itself, or with the base model's prefix."""
    if name not in targets and _BASE_PREFIX + name in targets:
        return _BASE_PREFIX + name
    return name


def _stored_name(name: str, tensor_files: dict[str, Path]) -> str:
    """The checkpoint's name for the model's tensor `name` (the inverse of _with_prefix)."""
    if name in tensor_files:
        return name
    return name.removeprefix(_BASE_PREFIX)


def _is_ignored(name: str, aliases: set[str]) -> bool:
    return name in aliases or name.endswith(_IGNORED_SUFFIXES)


def _check_names(names: list[str], targets: dict[str, _Target], model_path: str | Path) -> None:
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(set(names) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(model_path)!r} does not match the model: "
            f"missing weights {_few(missing)}, unexpected weights {_few(unexpected)}"
        )


def _few(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _copy_into(target: _Target, stored: Any, name: str) -> None:
    """Copy this rank's slice of checkpoint tensor `name` (`stored`: a safetensors slice, read
    only where indexed) into its target."""
    where = target.where
    data = target.param.data
    dest = data.narrow(where.dim, where.dest_start, where.shard.size)
    shape = tuple(stored.get_shape())
    expected = list(dest.shape)
    if len(shape) == len(expected):
        expected[where.dim] = where.src_total
    if shape != tuple(expected):
        raise ValueError(
            f"weight {name!r} has shape {shape} in the checkpoint: expected {tuple(expected)}"
        )
    index = [slice(None)] * len(shape)
    index[where.dim] = slice(where.shard.start, where.shard.start + where.shard.size)
    dest.copy_(stored[tuple(index)])  # casts to the model's dtype and moves to its device
    if where.zero_rest:  # padding rows of a vocab shard
        end = where.dest_start + where.shard.size
        data.narrow(where.dim, end, data.shape[where.dim] - end).zero_()
