"""Parsing and validating step / layer / head selections and reduction specs (API and CLI share these)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vlmscope.errors import InputError

AXES = ("steps", "layers", "heads")


def parse_indices(spec: Any, what: str) -> list[int] | None:
    """`"all"`/None → None (everything); an int; `"14"`; `"0-3"`; `"13,24"`; `"0-3,7"`; or a list of ints.

    Order is kept and duplicates are dropped, so the result can index arrays directly.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "all"):
            return None
        values: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    # "0-3" is a range; a leading "-" alone is a negative index ("-1").
                    cut = part.index("-", 1)
                    lo, hi = int(part[:cut]), int(part[cut + 1:])
                    if hi < lo:
                        raise InputError(f"bad {what} range {part!r}: write low-high, e.g. 0-3")
                    values.extend(range(lo, hi + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise InputError(f"bad {what} selection {spec!r}: use all, 14, 0-3 or 13,24") from None
        if not values:
            raise InputError(f"empty {what} selection {spec!r}: use all, 14, 0-3 or 13,24")
        return _unique(values)
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, Iterable):
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            raise InputError(f"bad {what} selection {spec!r}: give integers") from None
        if not values:
            raise InputError(f"empty {what} selection: give at least one index or 'all'")
        return _unique(values)
    raise InputError(f"bad {what} selection {spec!r}: use all, 14, 0-3 or 13,24")


def _unique(values: list[int]) -> list[int]:
    seen: dict[int, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def check_range(values: list[int] | None, count: int, what: str) -> list[int]:
    """Resolve None to 0..count-1 and negative indices from the end; out of range → one-line InputError."""
    if values is None:
        return list(range(count))
    out = []
    for v in values:
        if not -count <= v < count:
            raise InputError(f"{what} {v} is out of range: valid {what}s are 0..{count - 1}")
        out.append(v % count)
    return _unique(out)


def parse_reduce(spec: Any) -> tuple[str, ...]:
    """`"none"` → (), `"all"` → every axis, `"steps,heads"` → ("steps", "heads") (in axis order)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(p).strip().lower() for p in spec]
    if not parts or parts == ["none"]:
        return ()
    if "all" in parts:
        return AXES
    unknown = [p for p in parts if p not in AXES]
    if unknown:
        raise InputError(
            f"unknown reduction {unknown[0]!r}: use none, all or a combination of steps, layers, heads"
        )
    return tuple(a for a in AXES if a in parts)
