"""The ``clinfuse`` command line.

Each concern registers its own subcommands (``register(subparsers)`` in its ``commands``
module); this module builds the parser and turns bad input into one clear line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from clinfuse import __version__
from clinfuse.errors import BudgetExceededError, InputError

# Concerns that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "clinfuse.data.commands",
    "clinfuse.training.commands",
    "clinfuse.evaluation.commands",
    "clinfuse.privacy.commands",
    "clinfuse.site",
    "federated.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        description="Federated, differentially private multimodal diagnostic models for hospitals.",
    )
    parser.add_argument("--version", action="version", version=f"clinfuse {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a concern not yet built
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except InputError as exc:
        print(f"clinfuse {args.command}: error: {exc.describe()}", file=sys.stderr)
        return 2
    except BudgetExceededError as exc:
        print(f"clinfuse {args.command}: refused: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"clinfuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
