"""Evaluation configs (``eval_configs/*.yaml``), validated against an explicit schema at every depth.

A config is a mapping with the keys of `SCHEMA`; the ``chair`` and ``pope`` sections have their own keys and
``methods`` maps a registered method name to its default parameters. Unknown keys at any depth, values of
the wrong type and out-of-range numbers are refused with one line naming the file, the key path and, for
unknown keys, the known ones. Method specs (``decoding``, ``interventions``, ``methods``) are checked with
the registries, so a typo in a parameter name fails before a model loads.

To add a setting, add one `Field` to the right section below (and use it in `vlmscope.cli.eval_cmd`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

__all__ = ["SCHEMA", "EvalConfig", "Field", "load_config", "validate_config"]

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Field:
    """One config key: accepted Python types, an optional lower bound and an optional set of choices."""

    types: tuple[type, ...]
    minimum: int | float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    section: dict[str, Field] | None = None  # a nested mapping with its own keys


def _pope_rules() -> tuple[str, ...]:
    from vlmscope.eval.pope import RULES

    return tuple(sorted(RULES))


CHAIR_SECTION: dict[str, Field] = {
    "prompt": Field((str,)),
    "max_new_tokens": Field((int,), minimum=1),
    "num_images": Field((int,), minimum=1, nullable=True),
    "seed": Field((int,), nullable=True),
}
POPE_SECTION: dict[str, Field] = {
    "prompt_suffix": Field((str,)),
    "max_new_tokens": Field((int,), minimum=1),
    "rule": Field((str,)),  # choices checked against the POPE rules (lazily: avoids importing pope here)
}
SCHEMA: dict[str, Field] = {
    "model": Field((str,)),
    "dtype": Field((str,), choices=DTYPES, nullable=True),
    "device": Field((str,), nullable=True),
    "batch_size": Field((int,), minimum=1),
    "decoding": Field((str, dict)),
    "interventions": Field((list,)),
    "chair": Field((dict,), section=CHAIR_SECTION),
    "pope": Field((dict,), section=POPE_SECTION),
    "methods": Field((dict,)),
}


@dataclass
class EvalConfig:
    model: str = "tiny-llava"
    dtype: str | None = None
    device: str | None = None
    batch_size: int = 8
    decoding: Any = "greedy"
    interventions: list[Any] = field(default_factory=list)
    chair: dict[str, Any] = field(default_factory=dict)
    pope: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "a mapping", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_section(data: Mapping[str, Any], schema: Mapping[str, Field], where: str, prefix: str) -> None:
    unknown = [k for k in data if k not in schema]
    if unknown:
        path = f"{prefix}{unknown[0]}"
        raise InputError(f"{where}: unknown key {path!r}; known keys{' in ' + prefix[:-1] if prefix else ''}: "
                         f"{', '.join(schema)}")
    for key, value in data.items():
        spec, path = schema[key], f"{prefix}{key}"
        if value is None:
            if spec.nullable:
                continue
            raise InputError(f"{where}: {path!r} is empty; give {_type_names(spec.types)} or remove the key")
        # bool is an int subclass in Python; `max_new_tokens: true` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, spec.types):
            raise InputError(f"{where}: {path!r} must be {_type_names(spec.types)}, got {value!r}")
        if spec.minimum is not None and value < spec.minimum:
            raise InputError(f"{where}: {path!r} must be >= {spec.minimum}, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise InputError(f"{where}: {path!r} is {value!r}; use one of {', '.join(spec.choices)}")
        if spec.section is not None:
            _check_section(value, spec.section, where, f"{path}.")


def _check_method(spec: Any, registry: Any, where: str, path: str, defaults: Mapping[str, Any]) -> None:
    try:
        if isinstance(spec, str) and ":" not in spec and spec in defaults:
            registry.from_config({"name": spec, **defaults[spec]})
        else:
            registry.from_config(spec)
    except InputError as exc:
        raise InputError(f"{where}: {path!r}: {exc}") from None


def validate_config(data: Any, where: str = "config") -> EvalConfig:
    """Check a parsed config mapping against `SCHEMA` and the method registries; returns the `EvalConfig`."""
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    if not isinstance(data, Mapping):
        raise InputError(f"{where}: the top level must be a mapping of keys ({', '.join(SCHEMA)})")
    _check_section(data, SCHEMA, where, "")
    rule = (data.get("pope") or {}).get("rule")
    if rule is not None and rule not in _pope_rules():
        raise InputError(f"{where}: 'pope.rule' is {rule!r}; use one of {', '.join(_pope_rules())}")
    methods = data.get("methods") or {}
    for name, params in methods.items():
        registry = DECODINGS if name in DECODINGS.names() else INTERVENTIONS if name in INTERVENTIONS.names() else None
        if registry is None:
            known = sorted([*DECODINGS.names(), *INTERVENTIONS.names()])
            raise InputError(f"{where}: unknown method 'methods.{name}'; known methods: {', '.join(known)}")
        if not isinstance(params, Mapping):
            raise InputError(f"{where}: 'methods.{name}' must be a mapping of parameters, got {params!r}")
        _check_method({"name": name, **params}, registry, where, f"methods.{name}", {})
    if "decoding" in data:
        _check_method(data["decoding"], DECODINGS, where, "decoding", methods)
    for i, spec in enumerate(data.get("interventions") or []):
        _check_method(spec, INTERVENTIONS, where, f"interventions[{i}]", methods)
    return EvalConfig(**{k: v for k, v in data.items() if v is not None or SCHEMA[k].nullable})


def load_config(path: str | Path | None) -> EvalConfig:
    """Read and validate ``eval_configs/X.yaml`` (None: the defaults of `EvalConfig`)."""
    if path is None:
        return EvalConfig()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path} (see eval_configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"cannot parse {path}: {exc.__class__.__name__}; fix the YAML syntax") from None
    return validate_config({} if data is None else data, str(path))

