"""``vlmscope compare DIR...``: one markdown table of the metrics.json of several runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmscope.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare evaluation runs in one markdown table",
        description="Read DIR/metrics.json of each run and print runs as rows, metrics as columns.",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folders holding metrics.json")
    p.add_argument("--metrics", help="comma-separated metric names to show (default: all, in first-seen order)")
    p.set_defaults(func=_compare)


def _load(run: Path) -> dict:
    path = run / "metrics.json" if run.is_dir() or not run.suffix else run
    if not path.is_file():
        raise InputError(f"{run} has no metrics.json; run an evaluation into it first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); re-run the evaluation") from exc
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise InputError(f"{path} has no 'metrics' object; it was not written by a vlmscope evaluation")
    return data


# Settings shown before the metrics, when the runs record them: what produced the numbers.
SETTING_COLUMNS = ("decoding", "interventions", "max_new_tokens", "protocol")


def _setting_text(value: object) -> str:
    if isinstance(value, list | tuple):
        return " + ".join(map(str, value)) or "none"
    return "" if value is None else str(value)


def _compare(args: argparse.Namespace) -> int:
    from vlmscope.eval.runner import metrics_markdown

    loaded = [(run, _load(run)) for run in args.dirs]
    names = [run.name or str(run) for run, _ in loaded]
    if len(set(names)) != len(names):
        names = [str(run) for run, _ in loaded]  # same folder names under different parents
    columns = [c.strip() for c in args.metrics.split(",") if c.strip()] if args.metrics else None
    if columns:
        known = {k for _, data in loaded for k in data["metrics"]}
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise InputError(f"unknown metric {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    else:
        columns = list(dict.fromkeys(k for _, data in loaded for k in data["metrics"]))
    settings = [data.get("settings") if isinstance(data.get("settings"), dict) else {} for _, data in loaded]
    shown = [c for c in SETTING_COLUMNS if any(c in s for s in settings)]
    rows = [(n, {**{c: _setting_text(s.get(c)) for c in shown}, **data["metrics"]})
            for n, s, (_, data) in zip(names, settings, loaded)]
    print(metrics_markdown(rows, [*shown, *columns]), end="")
    return 0
