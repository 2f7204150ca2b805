"""Progress of long work: a live bar on a terminal, plain lines at intervals everywhere else.

A bar redrawn with carriage returns is noise in a log file or a CI console, and tqdm hides
itself there (``disable=None``), which left commands silent for many seconds. :class:`Progress`
keeps tqdm's bar on a terminal and, when stderr is not one, prints ``desc: done/total unit``
lines at most every ``every_s`` seconds plus one when the work ends.

Both are INFO-level output of the command line: after ``clinfuse --quiet`` (the ``clinfuse``
logger set to WARNING by :func:`clinfuse.cli.configure_logging`) they print nothing. Used as a
library, with no level set, they print.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator


def quiet() -> bool:
    """True when the command line was asked for no progress (``--quiet``)."""
    return logging.getLogger("clinfuse").level > logging.INFO


def stage(message: str, *, enabled: bool = True, stream=None) -> None:
    """One line on stderr saying what starts now (terminal or not)."""
    if enabled and not quiet():
        print(message, file=stream or sys.stderr, flush=True)


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class Progress:
    """Count ``total`` units of work; use as a context manager and call :meth:`update`."""

    def __init__(self, total: int, desc: str, unit: str = "item", *, enabled: bool = True,
                 every_s: float = 10.0, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and not quiet()
        self.every_s = every_s
        self.done = 0
        self.postfix = ""
        self._bar = None
        self._started = self._last = time.monotonic()
        if self.enabled and _is_tty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self._line(f"{self.done}/{self.total} {plural(self.unit)} ({now - self._started:.0f} s)"
                       + (f", {self.postfix}" if self.postfix else ""))

    def set_postfix(self, **values) -> None:
        """Values shown after the count (tqdm's ``set_postfix``), e.g. ``loss="0.412"``."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def track(self, iterable: Iterable) -> Iterator:
        """Yield from ``iterable``, one :meth:`update` per item, and :meth:`close` at its end."""
        try:
            for item in iterable:
                yield item
                self.update()
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and time.monotonic() - self._started >= self.every_s:
            # Short work needs no closing line; long work says it ended.
            self._line(f"done, {self.done} {plural(self.unit)} in {time.monotonic() - self._started:.0f} s"
                       + (f", {self.postfix}" if self.postfix else ""))
        self.enabled = False  # closed once: a second close (context manager after track) is silent

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
