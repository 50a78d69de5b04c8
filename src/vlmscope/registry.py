"""Methods as data: a registry of small dataclasses, shared by the Python API, the CLI and YAML configs.

A method (an intervention or a decoding strategy) is a dataclass with typed, defaulted fields, registered
under a short name. `parse_spec("pai:alpha=0.3,start=2")` and `from_config({"name": "pai", "alpha": 0.3})`
build instances from text and YAML with the dataclass's own types, so there is one definition of every
parameter and its default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vlmscope.errors import InputError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Registry:
    """Name → dataclass mapping for one kind of method ("intervention", "decoding")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._classes[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise InputError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        cls = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in (params or {}).items():
            key = key.replace("-", "_")
            if key not in fields:
                raise InputError(
                    f"{self.kind} {name!r} has no parameter {key!r}; parameters: {', '.join(fields) or 'none'}"
                )
            kwargs[key] = coerce(value, hints.get(key, Any), f"{name}:{key}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise InputError(f"invalid {self.kind} {name!r}: {exc}") from None

    def parse(self, spec: str) -> Any:
        """Build from `name` or `name:key=value,key=value`."""
        name, _, rest = spec.strip().partition(":")
        params: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in _split_params(rest))):
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"bad parameter {item!r} in {spec!r}: write key=value")
            params[key.strip()] = value.strip()
        return self.create(name.strip(), params)

    def from_config(self, config: str | Mapping[str, Any] | Any) -> Any:
        """Accept an instance, a spec string, or a mapping with a `name` key (YAML)."""
        if isinstance(config, str):
            return self.parse(config)
        if isinstance(config, Mapping):
            params = dict(config)
            try:
                name = params.pop("name")
            except KeyError:
                raise InputError(f"a {self.kind} config needs a 'name' key: {dict(config)}") from None
            return self.create(name, params)
        if dataclasses.is_dataclass(config) and type(config) in self._classes.values():
            return config
        raise InputError(f"cannot interpret {config!r} as a {self.kind}")

    def describe(self) -> str:
        lines = []
        for name in self.names():
            cls = self._classes[name]
            params = ", ".join(
                f"{f.name}={_default_text(f)}" for f in dataclasses.fields(cls) if f.init
            )
            lines.append(f"{name}: {params}")
        return "\n".join(lines)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "<required>"


def _split_params(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so `layers=[2,3]` or `image_span=(3,9)` survive)."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert text (from the CLI) or YAML scalars to the annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(f"{where}: cannot read {value!r} as {hint}")
    if origin is typing.Literal:
        for arg in args:
            if value == arg or str(value) == str(arg):
                return arg
        raise InputError(f"{where}: {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            items = [v for v in value.strip("()[] ").replace(";", ",").split(",") if v.strip()]
        else:
            items = list(value)
        inner = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise InputError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, where) for v, a in zip(items, args))
        converted = [coerce(v, inner or Any, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InputError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, str):
                return int(float(value)) if value.strip().lower().endswith(("e0",)) else int(value)
            return hint(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def spec_string(method: Any) -> str:
    """The registry spec of a method instance with every parameter: `opera:num_beams=5,scale_factor=50.0,...`.

    It is what results record, and `Registry.parse` reads it back into an equal instance.
    """
    name = getattr(type(method), "name", None)
    if name is None or not dataclasses.is_dataclass(method):
        raise TypeError(f"{method!r} is not a registered method")
    params = [f"{f.name}={_value_text(getattr(method, f.name))}" for f in dataclasses.fields(method) if f.init]
    return f"{name}:{','.join(params)}" if params else name
