"""What happens when a decoder meets a bad file: one :class:`InputError` naming the file, and quiet.

Third-party readers (pydicom, Pillow, MONAI, and whatever a new modality's decoder uses) raise
their own exception types, sometimes ``TypeError`` or ``IndexError`` from deep inside, and warn
on stderr about every odd header value. Every reader in :mod:`clinfuse.data` runs its work inside
:func:`decoding`, so that

- any failure becomes one :class:`~clinfuse.errors.InputError` naming the file (the caller turns
  it into that manifest row's error: one bad file is one bad row, never a crash);
- their warnings and log records never reach the console (a site engineer reads clinfuse's
  report, not pydicom's per-file chatter and the tracebacks its decoders log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

from clinfuse.errors import InputError

__all__ = ["decoding", "one_line"]

# pydicom logs every decoder failure with its traceback, from child loggers such as
# 'pydicom.pixels.decoders.base'; its own logger has a NullHandler, so stopping propagation there
# keeps those records off the root logger's handlers (a console, once an application sets one up).
_DECODER_LOGGER = "pydicom"


def one_line(exc: BaseException) -> str:
    """An exception as one line of text (its type when it has no message)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextlib.contextmanager
def decoding(path: str | os.PathLike[str], what: str = "read the file") -> Iterator[None]:
    """Run a decoder on ``path``: warnings silenced, any exception turned into an InputError.

    ``what`` completes "cannot ...", e.g. ``"decode the pixel data"``. An :class:`InputError`
    raised inside passes unchanged; ``KeyboardInterrupt`` and ``SystemExit`` are not caught.
    """
    logger = logging.getLogger(_DECODER_LOGGER)
    propagate = logger.propagate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.propagate = False
        try:
            yield
        except InputError:
            raise
        except MemoryError:
            raise InputError(f"cannot {what}: it needs more memory than this machine has "
                             "(are the file's size elements right?)", file=path) from None
        except Exception as exc:  # decoders raise anything; what matters is the file
            raise InputError(f"cannot {what}: {type(exc).__name__}: {one_line(exc)}", file=path) from exc
        finally:
            logger.propagate = propagate
