"""The one msgpack codec that carries `protocol.py`'s messages, with per-field type checks.

A message travels as [tag, values]; the tag is its class's position in the registry that
`protocol.py` fills through `register(...)` (order is the wire format: append only). A registered
record nested inside a message travels as a msgpack extension. Decoding checks every field against
its class's annotations, so only registered dataclasses with well-typed fields are ever built.
This module imports no message class: `protocol.py` imports it and registers its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import msgpack

_REGISTRY: dict[int, type] = {}
_TAGS: dict[type, int] = {}


def register(*classes: type) -> None:
    """Give each class the next tag, in order: the order is the wire format, append only."""
    for cls in classes:
        tag = len(_REGISTRY) + 1
        _REGISTRY[tag] = cls
        _TAGS[cls] = tag


Message = Any  # one of the registered dataclasses

# A registered record nested inside a message (a Finish in a TokenOut) travels as a msgpack
# extension holding [tag, values], so the decoder rebuilds the same type.
_EXT_RECORD = 1


def _pack_record(obj: Any) -> msgpack.ExtType:
    tag = _TAGS.get(type(obj))
    if tag is None:
        raise TypeError(f"{type(obj).__name__} is not a registered message")
    values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return msgpack.ExtType(_EXT_RECORD, msgpack.packb([tag, values], default=_pack_record))


def _unpack_record(code: int, data: bytes) -> Any:
    if code != _EXT_RECORD:
        raise ValueError(f"unknown msgpack extension {code}")
    return _build(msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_record))


def _build(frame: Any) -> Message:
    if type(frame) is not list or len(frame) != 2 or type(frame[1]) is not list:
        raise ValueError("malformed message: expected [tag, values]")
    tag, values = frame
    cls = _REGISTRY.get(tag) if type(tag) is int else None
    if cls is None:
        raise ValueError(f"unknown message tag {tag!r}")
    record = _record_spec(cls)
    if not record.num_required <= len(values) <= len(record.names):
        raise ValueError(
            f"{cls.__name__}: {len(values)} values, expected {record.num_required}.."
            f"{len(record.names)}"
        )
    for name, check, value in zip(record.names, record.checks, values):
        if not check(value):
            raise ValueError(
                f"{cls.__name__}.{name}: expected {record.annotations[name]}, "
                f"got {type(value).__name__} {_short(value)}"
            )
    return cls(*values)


def encode(msg: Message) -> bytes:
    return _pack_record(msg).data


def decode(data: bytes) -> Message:
    """The message in `data`. Raises ValueError, and only ValueError, for bytes that are not a
    registered message whose every field holds a value of its annotated type."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_record)
        return _build(frame)
    except ValueError:
        raise
    except Exception as e:  # msgpack's own errors, unhashable keys, records nested too deep
        raise ValueError(f"undecodable frame: {type(e).__name__}: {e}") from None


def message_types() -> tuple[type, ...]:
    return tuple(_REGISTRY.values())


# ---------------------------------------------------------------- field type checks
# Each registered dataclass's annotations are compiled once into predicates, so a frame of the
# right shape but the wrong types (a str where page ids go) is refused at the socket, naming the
# field, before any handler sees it. Lists of plain values are checked with set(map(type, ...)),
# which runs in C: the token path pays a few microseconds per step.

Check = Callable[[Any], bool]
_NONE = type(None)
_LEAVES: dict[Any, frozenset[type]] = {
    str: frozenset({str}),
    int: frozenset({int}),  # exact: a bool is not an int here
    float: frozenset({float, int}),  # msgpack keeps 0.0 a float, but a sender may write 0
    bool: frozenset({bool}),
    bytes: frozenset({bytes}),
    _NONE: frozenset({_NONE}),
    None: frozenset({_NONE}),
}
_PLAIN = frozenset({str, int, float, bool, bytes, _NONE})
_LIST = frozenset({list})


class _RecordSpec(NamedTuple):
    names: tuple[str, ...]
    checks: tuple[Check, ...]
    num_required: int
    annotations: dict[str, str]


_SPECS: dict[type, _RecordSpec] = {}


def _record_spec(cls: type) -> _RecordSpec:
    """The compiled field checks of a registered dataclass (built on first use)."""
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        spec = _RecordSpec(
            names=tuple(f.name for f in fields),
            checks=tuple(_checker(hints[f.name], f"{cls.__name__}.{f.name}") for f in fields),
            num_required=sum(
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for f in fields
            ),
            annotations={f.name: str(f.type) for f in fields},
        )
        _SPECS[cls] = spec
    return spec


def _leaf_types(tp: Any) -> frozenset[type] | None:
    """The exact types a value of `tp` may have when `tp` is a plain type, a registered record
    or a union of those; None for anything else (containers, Any, Literal)."""
    if tp in _LEAVES:
        return _LEAVES[tp]
    if isinstance(tp, type) and tp in _TAGS:
        return frozenset({tp})
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_leaf_types(a) for a in typing.get_args(tp)]
        if all(p is not None for p in parts):
            return frozenset().union(*parts)
    return None


def _checker(tp: Any, where: str) -> Check:
    """A predicate for values of annotation `tp`; TypeError for annotations the codec cannot
    carry faithfully (a tuple comes back a list), so a new message fails at its first use."""
    leaves = _leaf_types(tp)
    if leaves is not None:
        return lambda v: type(v) in leaves
    if tp is Any or tp is object:
        return _is_plain
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        kinds = frozenset(type(a) for a in args)  # exact: True is not Literal[1]
        return lambda v: type(v) in kinds and v in args
    if origin in (typing.Union, types.UnionType):
        checks = [_checker(a, where) for a in args if a is not _NONE]
        if _NONE in args and len(checks) == 1:
            inner = checks[0]
            return lambda v: v is None or inner(v)
        return lambda v: (v is None and _NONE in args) or any(c(v) for c in checks)
    if origin is list:
        return _list_checker(args[0], where)
    if origin is dict:
        return _dict_checker(args[0], args[1], where)
    raise TypeError(f"{where}: annotation {tp!r} cannot travel in a message")


def _list_checker(item: Any, where: str) -> Check:
    depth = 1  # list[list[int]]: depth 2, items int
    while typing.get_origin(item) is list:
        depth, item = depth + 1, typing.get_args(item)[0]
    leaves = _leaf_types(item)
    if leaves is not None:
        return lambda v: (
            (items := _flatten(v, depth)) is not None and set(map(type, items)) <= leaves
        )
    check = _checker(item, where)
    return lambda v: (items := _flatten(v, depth)) is not None and all(map(check, items))


def _flatten(value: Any, depth: int) -> Iterable[Any] | None:
    """The items of a list nested `depth` deep (the last level lazily, as set(map(...)) then
    costs no copy), or None where some level is not a list."""
    if type(value) is not list:
        return None
    for level in range(depth - 1):
        if not set(map(type, value)) <= _LIST:
            return None
        value = itertools.chain.from_iterable(value)
        if level < depth - 2:
            value = list(value)
    return value


def _dict_checker(key: Any, value: Any, where: str) -> Check:
    keys = _leaf_types(key)
    if keys is None or not keys <= _PLAIN:
        raise TypeError(f"{where}: dict keys of {key!r} cannot travel in a message")
    if value is Any:
        return lambda v: type(v) is dict and set(map(type, v)) <= keys and _is_plain(v)
    check = _checker(value, where)
    return lambda v: type(v) is dict and set(map(type, v)) <= keys and all(map(check, v.values()))


def _is_plain(value: Any) -> bool:
    """Only msgpack's plain values (no records) at any depth; iterative, so depth cannot
    exhaust the stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        kind = type(v)
        if kind in _PLAIN:
            continue
        if kind is list:
            stack.extend(v)
        elif kind is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            return False
    return True


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
