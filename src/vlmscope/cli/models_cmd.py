"""`vlmscope models`: the supported families and what each can do (decodings, interventions, explain)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser("models", help="print the table of model families × capabilities")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the table as JSON only")
    form.add_argument("--markdown", action="store_true", help="print the table as Markdown (as in README)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmscope.models.families_modern import CAPABILITIES, FAMILY_TABLE, family_table_markdown

    if args.json:
        import json

        rows = [{"family": family, "models": models, "image_grid": grid, "capabilities": caps}
                for family, models, grid, caps in FAMILY_TABLE]
        print(json.dumps({"capabilities": list(CAPABILITIES), "families": rows}, indent=2))
        return 0
    if args.markdown:
        print(family_table_markdown())
        return 0
    short = {"yes": "yes", "no": "-", "uniform": "unif", "full layers": "full", "full layers, uniform": "full,u"}
    head = ["family", *CAPABILITIES]
    cells = [[family, *(short[caps[c]] for c in CAPABILITIES)] for family, _, _, caps in FAMILY_TABLE]
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    for row in [head, *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    print("\n-: raises naming the reason; unif: aai:reference=uniform only; full: operations on full-attention "
          "layers only (Gemma 3's sliding-window layers raise).")
    for family, models, grid, _ in FAMILY_TABLE:
        print(f"{family}: {models}; image grid: {grid}")
    return 0
