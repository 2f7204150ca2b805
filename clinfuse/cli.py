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
    "clinfuse.auditing.commands",
    "clinfuse.site_check",
    "federated.commands",
)


def _bounded(cast, kind: str, minimum, *, strict: bool):
    """An argparse ``type`` that parses with ``cast`` and refuses values below ``minimum`` (or equal,
    when ``strict``) and non-finite ones, naming the value: argparse then exits with status 2."""
    import math

    bound = f"above {minimum}" if strict else f"at least {minimum}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{cast.__name__} {bound}"  # argparse names the type in its messages
    return parse


positive_float = _bounded(float, "a number", 0, strict=True)
nonneg_float = _bounded(float, "a number", 0, strict=False)
positive_int = _bounded(int, "an integer", 1, strict=False)


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
