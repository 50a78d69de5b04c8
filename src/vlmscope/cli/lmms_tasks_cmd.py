"""`vlmscope lmms-tasks-path`: the folder of vlmscope's lmms-eval tasks, for `lmms-eval --include_path`."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "lmms-tasks-path",
        help="print the folder of vlmscope's lmms-eval tasks (vlmscope_pope_*, vlmscope_amber_*), for lmms-eval "
        "--include_path",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Found as package data, not imported: nothing in vlmscope imports vlmscope.integrations.
    print(resources.files("vlmscope").joinpath("integrations", "lmms_tasks"))
    return 0
