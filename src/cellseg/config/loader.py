"""The one config system: YAML files loaded into typed dataclasses, with ``KEY=VALUE`` overrides.

Any dataclass tree works (model/training configs, the weights manifest). Unknown keys and wrong
types are errors that name the key path, e.g. ``model.anchor_sizes: expected list, got str``.
Every float must be finite (NaN and inf are refused wherever they appear), and a field declared
with ``field(metadata=bounds(...))`` must lie in its range; both errors are one line naming the key
and the allowed range, e.g. ``train.lr: -1.0 is out of range (allowed: > 0)``.

    cfg = load_yaml(Config, "configs/demo.yaml", overrides=["train.epochs=3", "model.min_size=800"])

    @dataclass
    class Thresholds:
        score: float = field(default=0.5, metadata=bounds(0, 1))          # [0, 1]
        nms_iou: float = field(default=0.3, metadata=bounds(0, 1, lo_open=True))  # (0, 1]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from cellseg.errors import CellsegError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: A dataclass type: what the config system loads.
T = TypeVar("T", bound="DataclassInstance")

#: the field-metadata key that holds a :class:`Range`
RANGE = "cellseg_range"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``lo`` .. ``hi`` (None = unbounded), each end open or closed.
    It applies to every number of the field (each item of a list, each value of a mapping)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any finite number"


def bounds(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    """Field metadata declaring a numeric range, checked whenever the dataclass is loaded
    (:func:`from_dict`) or checked (:func:`check_ranges`): ``field(default=0.02, metadata=bounds(0, lo_open=True))``."""
    return {RANGE: Range(lo, hi, lo_open, hi_open)}


def field_range(cls: type, name: str) -> Range | None:
    """The :class:`Range` declared on field ``name`` of dataclass ``cls`` (None when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(RANGE)
    raise KeyError(name)


def check_number(value: float, where: str, rng: Range | None = None) -> float:
    """``value`` when it is finite and inside ``rng``; else CellsegError naming ``where`` and the range.

    Used for config fields and for command-line numbers (``--min-gain``, grid values) alike."""
    allowed = str(rng or Range())
    if isinstance(value, float) and not math.isfinite(value):
        raise CellsegError(f"{where}: {value} is not allowed (allowed: {allowed}; NaN and inf never are)")
    if rng is not None and value not in rng:
        raise CellsegError(f"{where}: {value!r} is out of range (allowed: {allowed})")
    return value


def _convert_union(args: tuple, value: Any, where: str, rng: Range | None) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(a, value, where, rng)
        except CellsegError as e:
            errors.append(str(e))
    raise CellsegError(errors[0] if errors else f"{where}: bad value {value!r}")


def _convert_sequence(origin: Any, args: tuple, value: Any, where: str, rng: Range | None) -> Any:
    if not isinstance(value, (list, tuple)):
        raise CellsegError(f"{where}: expected list, got {type(value).__name__}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise CellsegError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]", rng) for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    out = [_convert(item, v, f"{where}[{i}]", rng) for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _convert_scalar(tp: type, value: Any, where: str, rng: Range | None) -> Any:
    """float, int, bool or str: the exact type (an int is a float too, a bool never a number)."""
    numeric = tp in (int, float)
    accepted: tuple[type, ...] = (int, float) if tp is float else (tp,)
    if not isinstance(value, accepted) or (numeric and isinstance(value, bool)):
        raise CellsegError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    if numeric:
        number = typing.cast(float, value)
        return check_number(float(number) if tp is float else number, where, rng)
    return value


def _convert(tp: Any, value: Any, where: str, rng: Range | None = None) -> Any:
    """``value`` checked against (and converted to) type ``tp``; ``rng`` applies to every number in it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where, rng)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise CellsegError(f"{where or 'config'}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        return _convert_sequence(origin, args, value, where, rng)
    if origin is dict:
        if not isinstance(value, dict):
            raise CellsegError(f"{where}: expected mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}", rng) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise CellsegError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if tp in (float, int, bool, str):
        return _convert_scalar(tp, value, where, rng)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; missing keys keep their defaults.

    Every float must be finite and every field with :func:`bounds` metadata inside its range."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise CellsegError(f"unknown config key {key!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        kwargs[k] = _convert(hints[k], _parsed(fields[k], v, key), key, fields[k].metadata.get(RANGE))
    return cls(**kwargs)


def _parsed(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A text ``value`` through the field's ``metadata["parse"]`` (e.g. ``11h30m`` to seconds), if it has
    one; the typed conversion then checks the result like any value."""
    parse = f.metadata.get("parse")
    if parse is None or not isinstance(value, str):
        return value
    try:
        return parse(value)
    except CellsegError as e:
        raise CellsegError(f"{where}: {e}") from None


def _check_value(value: Any, where: str, rng: Range | None) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_ranges(value, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]", rng)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(v, f"{where}.{k}", rng)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        check_number(value, where, rng)


def check_ranges(obj: Any, where: str = "") -> None:
    """CellsegError (one line) for the first non-finite float or out-of-range field of a dataclass tree
    built in code (loaded ones are checked by :func:`from_dict` already): e.g. thresholds a tuner chose
    before they are written into a manifest."""
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name, f.metadata.get(RANGE))


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a dataclass tree (YAML/JSON/torch.save friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=VALUE`` strings to a nested dict (VALUE parsed as YAML: 3, 0.5, [8, 16], true).

    Errors name the override as given on the command line."""
    for item in overrides or []:
        if "=" not in item:
            raise CellsegError(f"command-line override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise CellsegError(f"command-line override {item!r}: empty key part in {key!r}")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CellsegError(f"command-line override {item!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise CellsegError(
                f"command-line override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})"
            ) from None
    return data


def read_yaml(path: str | Path, what: str = "a YAML config file") -> dict:
    """The top-level mapping of YAML file ``path``. CellsegError (naming the file and ``what`` was
    expected) when it is missing, binary, not YAML or not a mapping."""
    path = Path(path)
    from cellseg.io import read_text_file  # io imports numpy and PIL; config stays light

    text = read_text_file(path, what)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CellsegError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); expected {what}") from None
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: expected a mapping at the top level ({what})")
    return data


def load_yaml(
    cls: type[T],
    path: str | Path,
    overrides: list[str] | None = None,
    what: str | None = None,
    upgrade: Callable[[dict], dict] | None = None,
) -> T:
    """Load ``path`` into dataclass ``cls`` after applying ``overrides``.

    An error caused by the file names the file; one caused by an override names the command line
    and the override (``command-line override 'train.lr=x': train.lr: expected float, got str``).
    ``what`` says what the file should be, for messages (default: a YAML config file). ``upgrade``
    rewrites the file's mapping first (renamed keys of older files).
    """
    data = read_yaml(path, what or "a YAML config file")
    if upgrade is not None:
        data = upgrade(data)
    merged = apply_overrides(copy.deepcopy(data), overrides or [])  # its own errors name the override
    try:
        return from_dict(cls, merged)
    except CellsegError as e:
        error = str(e)
    if not overrides or _error_of(cls, data) == error:
        raise CellsegError(f"{path}: {error}") from None
    # the overrides brought the error in: name the first one after which it appears
    for k, item in enumerate(overrides):
        if _error_of(cls, apply_overrides(copy.deepcopy(data), overrides[: k + 1])) == error:
            raise CellsegError(f"command-line override {item!r}: {error}") from None
    raise CellsegError(f"{path} with the command-line overrides {' '.join(overrides)}: {error}") from None


def _error_of(cls: type, data: dict) -> str:
    """The message :func:`from_dict` raises for ``data`` ('' when it builds)."""
    try:
        from_dict(cls, copy.deepcopy(data))
    except CellsegError as e:
        return str(e)
    return ""


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass tree as YAML atomically."""
    from cellseg.io import atomic_write_text  # io imports numpy and PIL; config stays light

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False))


def parse_duration(text: str | float | int | None) -> float | None:
    """A duration in seconds: ``8h30m``, ``45m``, ``90s``, ``1h2m3s``, ``2.5h``, ``0.5s`` or plain seconds
    (a number or a numeric string). None stays None.

    Used for config values and command-line options (``train.time_limit``, the kernel's ``--time-budget``).
    Raises CellsegError naming the text when it is not understood.
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or not m or not any(m.groups()):
        raise CellsegError(f"duration {text!r} not understood (examples: 8h30m, 45m, 90s, 3600)")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se
