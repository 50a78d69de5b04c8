"""``vlmscope compare DIR...``: one markdown table of the metrics.json of several runs, and paired comparisons.

Every run after the first is compared with the first on the items (images) both scored: each metric's
difference (run − first) with a paired bootstrap interval and p-value (`vlmscope.eval.stats`). Runs of
different protocols, and POPE runs on different datasets (COCO, A-OKVQA, GQA: metrics.json ``datasets``; a run
that records none counts as COCO), are refused unless ``--allow-protocol-mismatch`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vlmscope.cli._common import print_json_line
from vlmscope.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare evaluation runs: a markdown table and paired bootstrap differences",
        description="Read DIR/metrics.json of each run and print runs as rows, metrics as columns. With two or more "
        "runs, each later run is compared with the first over their shared images: difference, paired bootstrap "
        "95%% interval and p-value per metric (needs the per-item files chair_details.json / pope_details.json).",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folders holding metrics.json")
    p.add_argument("--metrics", help="comma-separated metric names to show (default: all, in first-seen order)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                   help="paired bootstrap draws (default 1000; 0: table only)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--allow-protocol-mismatch", action="store_true",
                   help="compare runs recorded under different protocols or, for POPE, on different datasets "
                   "(their difference then mixes them)")
    p.add_argument("--json", action="store_true", help="print runs and comparisons as one JSON line")
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
    data["_folder"] = path.parent
    return data


# Settings shown before the metrics, when the runs record them: what produced the numbers.
# (The protocol, a record in the settings, gets its own column by name.)
SETTING_COLUMNS = ("decoding", "interventions", "max_new_tokens")


def _setting_text(value: object) -> str:
    if isinstance(value, list | tuple):
        return " + ".join(map(str, value)) or "none"
    return "" if value is None else str(value)


def _protocol_name(data: dict) -> str | None:
    protocol = (data.get("settings") or {}).get("protocol")
    return protocol.get("name") if isinstance(protocol, dict) else protocol


def _pope_datasets(data: dict) -> str:
    """The POPE datasets a run answered (``"aokvqa+gqa"``); runs from before datasets were recorded are COCO's."""
    return "+".join(sorted(data.get("datasets") or {})) or "coco"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc}); re-run the evaluation's scoring") from exc


def _items(data: dict) -> tuple[str, list, dict[str, np.ndarray], dict[str, Any]] | None:
    """(task, item keys, per-item count columns, metric functions) of a run, or None without per-item files."""
    from vlmscope.eval import stats

    task = data.get("task") or ("chair" if "CHAIR_S" in data["metrics"] else "pope")
    folder: Path = data["_folder"]
    if task == "chair":
        per_caption = data.get("per_caption")
        if per_caption is None and (folder / "chair_details.json").is_file():
            per_caption = _read_json(folder / "chair_details.json").get("per_caption")
        if per_caption is None:
            return None
        keys, counts = stats.chair_item_counts(per_caption)
        return task, keys, counts, dict(stats.CHAIR_METRICS)
    if not (folder / "pope_details.json").is_file():
        return None
    from vlmscope.eval.pope import dataset_groups

    items = _read_json(folder / "pope_details.json").get("items") or []
    keys, counts, splits = stats.pope_image_counts(items)
    return task, keys, counts, stats.pope_metric_fns(splits, dataset_groups(items))


def _compare(args: argparse.Namespace) -> int:
    from vlmscope.eval.runner import metrics_markdown
    from vlmscope.eval.stats import paired_bootstrap

    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
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
    protocols = [_protocol_name(data) for _, data in loaded]
    tasks = {data.get("task") for _, data in loaded} - {None}
    if len(tasks) > 1:
        raise InputError(f"runs of different tasks ({', '.join(sorted(tasks))}); compare CHAIR runs with CHAIR runs")
    if len(set(protocols)) > 1 and not args.allow_protocol_mismatch:
        shown = ", ".join(f"{n}: {p or 'none'}" for n, p in zip(names, protocols))
        raise InputError(f"runs were made under different protocols ({shown}); compare runs of one protocol, "
                         "or pass --allow-protocol-mismatch")
    datasets = [_pope_datasets(data) for _, data in loaded]
    if tasks == {"pope"} and len(set(datasets)) > 1 and not args.allow_protocol_mismatch:
        shown = ", ".join(f"{n}: {d}" for n, d in zip(names, datasets))
        raise InputError(f"POPE runs on different datasets ({shown}); compare runs on the same datasets, or pass "
                         "--allow-protocol-mismatch")
    shown_columns = columns or list(dict.fromkeys(k for _, data in loaded for k in data["metrics"]))
    settings = [data.get("settings") if isinstance(data.get("settings"), dict) else {} for _, data in loaded]
    shown = [c for c in SETTING_COLUMNS if any(c in s for s in settings)]
    rows = [(n, {**{c: _setting_text(s.get(c)) for c in shown}, **data["metrics"]})
            for n, s, (_, data) in zip(names, settings, loaded)]
    table_columns = [*shown, *shown_columns]
    if any(protocols):
        rows = [(n, {**m, "protocol": p or "none"}) for (n, m), p in zip(rows, protocols)]
        table_columns = [*table_columns, "protocol"]
    table = metrics_markdown(rows, table_columns)

    comparisons = []
    if len(loaded) > 1 and args.bootstrap:
        base = _items(loaded[0][1])
        for name, (_, data) in zip(names[1:], loaded[1:]):
            other = _items(data)
            if base is None or other is None:
                missing = names[0] if base is None else name
                print(f"note: {missing} has no per-item results (chair_details.json / pope_details.json); "
                      "no paired comparison", file=sys.stderr)
                continue
            comparisons.append(_paired(names[0], base, name, other, shown_columns, args, paired_bootstrap))

    if args.json:
        runs = [{"name": n, "metrics": d["metrics"], "protocol": p, **{c: s.get(c) for c in shown}}
                for n, (_, d), p, s in zip(names, loaded, protocols, settings)]
        print_json_line({"runs": runs, "comparisons": comparisons})
        return 0
    print(table, end="")
    for cmp in comparisons:
        print(f"\n{cmp['run']} − {cmp['baseline']} over {cmp['shared_items']} shared images "
              f"(paired bootstrap, {cmp['draws']} draws, seed {cmp['seed']}):")
        print("| metric | " + f"{cmp['baseline']} | {cmp['run']} | difference | 95% interval | p |")
        print("|---|---:|---:|---:|---:|---:|")
        for metric, c in cmp["metrics"].items():
            print(f"| {metric} | {c['b']:.1f} | {c['a']:.1f} | {c['diff']:+.1f} | [{c['low']:+.1f}, {c['high']:+.1f}] "
                  f"| {c['p_value']:.3f} |")
    return 0


def _paired(base_name: str, base: tuple, name: str, other: tuple, columns: list[str], args: argparse.Namespace,
            paired_bootstrap: Any) -> dict[str, Any]:
    _, base_keys, base_counts, fns = base
    _, other_keys, other_counts, other_fns = other
    index = {k: i for i, k in enumerate(other_keys)}
    shared = [k for k in base_keys if k in index]
    if not shared:
        raise InputError(f"{name} and {base_name} share no images; compare runs on the same images")
    base_rows = [i for i, k in enumerate(base_keys) if k in index]
    other_rows = [index[k] for k in shared]
    names = sorted(set(base_counts) & set(other_counts))
    a = {k: other_counts[k][other_rows] for k in names}
    b = {k: base_counts[k][base_rows] for k in names}
    metrics = {m: fns[m] for m in columns if m in fns and m in other_fns}
    result = paired_bootstrap(a, b, metrics, args.bootstrap, args.bootstrap_seed)
    return {"baseline": base_name, "run": name, "shared_items": len(shared), "draws": args.bootstrap,
            "seed": args.bootstrap_seed, "metrics": {m: c.to_dict() for m, c in result.items()}}
