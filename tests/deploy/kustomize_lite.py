"""The part of kustomize that deploy/k8s uses, in Python, so tests render the manifests without the
kustomize binary: `resources` (files and kustomization folders), `configMapGenerator` (files, with
`disableNameSuffixHash`), `images`, `replicas` and strategic-merge `patches` (by target kind/name,
or by the patch's own kind/name). Anything else is refused by name, so a kustomization cannot use a
feature this renderer would silently skip; test_kubernetes_manifests.py compares its output with
`kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "replicas",
    "patches",
}
# Lists that strategic merge patches merge item by item, by this key (Kubernetes' patchMergeKey);
# lists under other keys are replaced whole only where Kubernetes does so too.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}
_REPLACED_LISTS = {"args", "command", "drop", "add"}


def render(folder: Path) -> list[Obj]:
    """The objects `kubectl kustomize folder` prints (order aside)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - _KEYS
    if unknown:
        raise ValueError(f"{folder}: kustomization keys {sorted(unknown)} are not supported")
    objects: list[Obj] = []
    for entry in k.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    objects += _generated_config_maps(folder, k)
    _check_unique(folder, objects)
    for patch in k.get("patches", []):
        _apply_patch(folder, objects, patch)
    for image in k.get("images", []):
        _set_image(objects, image)
    for replicas in k.get("replicas", []):
        _set_replicas(folder, objects, replicas)
    return objects


def _generated_config_maps(folder: Path, k: Obj) -> list[Obj]:
    generators = k.get("configMapGenerator", [])
    if generators and not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise ValueError(f"{folder}: name suffix hashes are not supported: disable them")
    maps = []
    for gen in generators:
        if set(gen) - {"name", "files", "options"} or set(gen.get("options", {})) - {"labels"}:
            raise ValueError(f"{folder}: configMapGenerator {gen['name']}: unsupported keys")
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
            data[key or Path(path).name] = (folder / path).read_text()
        metadata: Obj = {"name": gen["name"]}
        if gen.get("options", {}).get("labels"):
            metadata["labels"] = dict(gen["options"]["labels"])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


def _check_unique(folder: Path, objects: list[Obj]) -> None:
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            raise ValueError(f"{folder}: {key} is defined twice")
        seen.add(key)


def _apply_patch(folder: Path, objects: list[Obj], entry: Obj) -> None:
    if set(entry) - {"path", "target"}:
        raise ValueError(f"{folder}: patch keys {sorted(entry)}: only path and target")
    patch = yaml.safe_load((folder / entry["path"]).read_text())
    if not isinstance(patch, dict) or "kind" not in patch:
        raise ValueError(f"{folder}/{entry['path']}: only strategic merge patches are supported")
    target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    if set(target) - {"kind", "name"}:
        raise ValueError(f"{folder}: patch target keys {sorted(target)}: only kind and name")
    matches = [
        o
        for o in objects
        if o["kind"] == target["kind"]
        and target.get("name", o["metadata"]["name"]) == o["metadata"]["name"]
    ]
    if not matches:
        raise ValueError(f"{folder}: patch {entry['path']} matches no object ({target})")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
    for obj in matches:
        merged = merge(obj, body)
        obj.clear()
        obj.update(merged)


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge of `patch` into `base` (new objects; neither is changed)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if any(k.startswith("$") for k in patch):
            raise ValueError(f"patch directives ({sorted(patch)}) are not supported")
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        if key in _REPLACED_LISTS:
            return copy.deepcopy(patch)
        if key not in _MERGE_KEYS:
            raise ValueError(f"merging the list {key!r} is not supported")
        # As kustomize does: items already there are merged in place, new ones go first.
        by = _MERGE_KEYS[key]
        out = copy.deepcopy(base)
        new = []
        for item in patch:
            same = [i for i, b in enumerate(out) if b.get(by) == item.get(by)]
            if same:
                out[same[0]] = merge(out[same[0]], item)
            else:
                new.append(copy.deepcopy(item))
        return new + out
    return copy.deepcopy(patch)


def pod_containers(obj: Obj) -> list[Obj]:
    """The containers and init containers of a workload's pod template ([] for other kinds)."""
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _set_image(objects: list[Obj], image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise ValueError(f"images: {sorted(image)}: only name, newName and newTag")
    for obj in objects:
        for container in pod_containers(obj):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def _set_replicas(folder: Path, objects: list[Obj], entry: Obj) -> None:
    matches = [
        o
        for o in objects
        if o["metadata"]["name"] == entry["name"]
        and o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
    ]
    if not matches:
        raise ValueError(f"{folder}: replicas: no workload named {entry['name']!r}")
    for obj in matches:
        obj["spec"]["replicas"] = int(entry["count"])
