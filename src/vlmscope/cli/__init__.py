"""The `vlmscope` command line: one subcommand per module of this package.

User errors (`VlmscopeError`, argparse usage errors) print one line `error: ...` to stderr and exit 2;
any other exception is a bug and keeps its traceback.

Each module in `vlmscope.cli` that defines `register(subparsers)` adds its subcommand(s) and sets
`func(args) -> int | None` on them, so features plug in without editing a central list.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from vlmscope.errors import VlmscopeError


class UsageError(VlmscopeError):
    """A command line argparse refused (unknown option, missing argument, out-of-range number)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...`, exit 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vlmscope",
        description="Explain and steer vision-language models on stock transformers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except VlmscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        code = args.func(args)
    except VlmscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
