"""Frozen dataclass configs from YAML files and ``key=value`` overrides, checked on the way in.

A config is a tree of frozen dataclasses. :func:`load` reads a YAML file into it, applies
command-line overrides such as ``train.lr_omega=0.3`` or ``mesh.data=-1`` (values parsed as
YAML, so ``true``, ``1e-4`` and ``[q_proj, v_proj]`` mean what they look like), and checks
every key and type. Errors name the file, the dotted key and the fix; invariants between
fields belong in each dataclass's ``__post_init__``.

Numbers read as YAML 1.2 and Python write them: PyYAML implements YAML 1.1, where a float
needs a dot and a signed exponent (``1.0e-5``), so ``1e-5`` and ``5e-6`` would be strings.
:class:`Loader` adds the exponent forms; ``.5`` and ``1_000`` already read as numbers.
The type checks stay hand-written (:func:`_coerce`, ~60 lines): a validation library such as
pydantic would still need this loader (the bug is in reading YAML, not in checking types) and
would add a dependency to replace them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jbilevel.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config's dataclasses."""


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-5``, ``5E+3`` and ``2.5e3`` as floats."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse(text: str):
    """One YAML document read with :class:`Loader` (YAML 1.2 numbers)."""
    return yaml.load(text, Loader=Loader)


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Builds ``cls`` from an optional YAML file and ``key=value`` overrides.

    Args:
      cls: the (frozen) dataclass type at the root of the config tree.
      path: a YAML file whose mapping mirrors ``cls``; missing keys keep their defaults.
      overrides: strings ``dotted.key=value``, applied after the file, in order.
    Returns:
      An instance of ``cls``; every nested dataclass's ``__post_init__`` has run.
    """
    source = "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        try:
            loaded = parse(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        tree = loaded
    _apply(tree, overrides)
    if overrides:  # errors name where the value came from
        source = "command line" if path is None else f"{path} + command line"
    return from_dict(cls, tree, source)


def replace(config: T, overrides: Sequence[str], source: str = "<overrides>") -> T:
    """``config`` with ``key=value`` overrides applied, checked as :func:`load` checks them."""
    tree = to_dict(config)
    _apply(tree, overrides)
    return from_dict(type(config), tree, source)


def _apply(tree: dict, overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr_omega=0.3")
        try:
            value = parse(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        _set_dotted(tree, key.strip().split("."), value, f"override {item!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Builds dataclass ``cls`` from a nested mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: unknown key {dotted!r} (valid keys here: {', '.join(fields)}){hint}"
            )
        default = fields[key].default
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = _over_default(default, value)
        kwargs[key] = _coerce(hints[key], value, source, dotted)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        where = f" in {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"{source}{where}: {e}") from None


def _over_default(default: Any, value: Mapping) -> Mapping:
    """A partial mapping for a field whose default is a dataclass value (e.g. a method's
    ``hypergrad: Implicit(maxiter=5, ...)``) completed from that value, not from the class
    defaults, unless it names another ``kind``."""
    if "kind" in value and value["kind"] != getattr(default, "kind", None):
        return value
    return {**to_dict(default), **value}


def to_dict(config: Any) -> dict[str, Any]:
    """The plain nested-dict form of a config (tuples as lists), ready for YAML or JSON."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple | list):
            return [plain(v) for v in x]
        return x

    return plain(config)


def dump(config: Any, path: str | Path) -> None:
    """Writes ``config`` as YAML that :func:`load` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _set_dotted(tree: dict, keys: list[str], value: Any, where: str) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """``value`` checked (and, where lossless, converted) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str):
        raise ConfigError(
            f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value if value is not None else {}, source, key + ".")
    if origin is typing.Literal:
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = {getattr(a, "kind", None): a for a in args if dataclasses.is_dataclass(a)}
        if isinstance(value, Mapping) and "kind" in value and None not in kinds:
            # a union of dataclass values tagged by ``kind``: pick the arm, report its errors
            if value["kind"] not in kinds:
                fail("a mapping whose kind is one of " + ", ".join(repr(k) for k in kinds))
            return _coerce(kinds[value["kind"]], value, source, key)
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, source, key)
            except ConfigError:
                continue
        fail(" or ".join(_type_name(a) for a in args))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            fail(f"a list of {len(args)} items")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in pairs)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            fail("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        fail(_type_name(tp))
    return value
