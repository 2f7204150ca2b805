"""The ``clinfuse`` command line.

Each concern registers its own subcommands (``register(subparsers)`` in its ``commands``
module); this module builds the parser, sets up logging once for the whole command (the
global ``--quiet`` / ``--verbose`` flags, accepted before or after the subcommand), and turns
bad input into one clear line on stderr and exit status 2, never a traceback. A closed pipe
(``clinfuse validate M | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

from clinfuse import __version__
from clinfuse.errors import BudgetExceededError, InputError

# Concerns that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "clinfuse.site_init",
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


def add_data_root_option(parser: argparse.ArgumentParser) -> None:
    """``--data-root DIR`` (repeatable): folders of this site, besides the manifest's own and the
    config's ``data.roots``, that manifest paths may point into (see :mod:`clinfuse.data.paths`)."""
    parser.add_argument("--data-root", dest="data_roots", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder of this site that manifest paths may point into, besides the "
                             "manifest's own and data.roots (repeat for several)")
# --------------------------------------------------------------------------------------------
# Logging: one setup for every module
# --------------------------------------------------------------------------------------------

#: Carries the command's log level to the processes it starts (Flower's simulated sites are Ray
#: actors: they inherit the environment, not the parsed flags). See :func:`configure_logging`.
LOG_LEVEL_ENV = "CLINFUSE_LOG_LEVEL"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always wins
        pass


class _ConsoleFormat(logging.Formatter):
    """Plain lines: INFO is the message itself; warnings and errors say so; DEBUG names its logger."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        if record.levelno < logging.INFO:
            return f"debug [{record.name}]: {text}"
        return text


def configure_logging(level: int | str | None = None) -> None:
    """Send every ``clinfuse.*`` logger's records at ``level`` and above to stderr, one plain line each.

    ``level`` None reads :data:`LOG_LEVEL_ENV` (set by the command that started this process,
    e.g. for a simulated site), else INFO. The level is exported in :data:`LOG_LEVEL_ENV` so
    processes started from here log alike. Calling it again replaces the earlier setup.
    Progress lines and stage messages (:mod:`clinfuse.progress`) are INFO: ``--quiet``
    (WARNING) silences them. Flower's own log shows from DEBUG (``--verbose``) only.
    """
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV) or logging.INFO
    level = logging.getLevelName(level) if isinstance(level, str) else int(level)
    if not isinstance(level, int):
        level = logging.INFO
    logger = logging.getLogger("clinfuse")
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_ConsoleFormat())
    logger.addHandler(handler)
    logger.setLevel(level)
    # Importing Opacus runs logging.basicConfig(): its root handler would print every line twice.
    logger.propagate = False
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)


@contextlib.contextmanager
def _logging_for(args):
    """:func:`configure_logging` for one command; the previous setup is restored afterwards
    (tests run many commands in one process)."""
    logger = logging.getLogger("clinfuse")
    saved = (list(logger.handlers), logger.level, logger.propagate, os.environ.get(LOG_LEVEL_ENV))
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    configure_logging(level)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        if saved[3] is None:
            os.environ.pop(LOG_LEVEL_ENV, None)
        else:
            os.environ[LOG_LEVEL_ENV] = saved[3]


def _add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--quiet`` / ``--verbose`` on ``parser`` and, recursively, on every subcommand below it.

    Below the top they default to ``SUPPRESS``: a flag given after the subcommand sets the value,
    an absent one leaves what the top parser parsed (``clinfuse -q validate M`` works too).
    """
    default = False if top else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print only results, warnings and errors (no progress lines)")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also print debug messages and the log of Flower's simulation")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                _add_global_flags(sub, top=False)


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
    _add_global_flags(parser, top=True)
    return parser


#: Flower reports usage events to its servers unless this is "0" (read when flwr is imported; the
#: simulation's Ray workers inherit it). clinfuse's own commands keep a hospital's runs to itself,
#: and no process waits at exit for an unreachable telemetry host; a value set by the user wins.
FLOWER_TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault(FLOWER_TELEMETRY_ENV, "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    with _logging_for(args):
        try:
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
            return code
        except InputError as exc:
            # One line, whatever the message holds (a library's multi-line text, say).
            print(f"clinfuse {args.command}: error: {' '.join(exc.describe().split())}", file=sys.stderr)
            return 2
        except BudgetExceededError as exc:
            print(f"clinfuse {args.command}: refused: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            print(f"clinfuse {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly. Python flushes stdout again at exit
            # and would print a second error, so stdout now points at /dev/null.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
