"""Errors that describe bad input in terms the user can act on.

Every error raised for bad data or bad configuration is an :class:`InputError` that names
the file, row or key at fault. The command line turns it into a one-line message and exit
status 2; library users can catch it and read the structured fields.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a file, manifest row or configuration key that must be fixed.

    Parameters
    ----------
    message:
        What is wrong and, where possible, how to fix it.
    file:
        The file at fault (manifest, image, config, ledger...).
    row:
        1-based data row number in a manifest (header excluded), when the problem is a row.
    key:
        Dotted configuration key or manifest column, when the problem is a key.
    """

    def __init__(self, message: str, *, file: str | Path | None = None,
                 row: int | None = None, key: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.row = row
        self.key = key
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.key:
            where.append(f"key '{self.key}'")
        prefix = ": ".join([", ".join(where)]) if where else ""
        return f"{prefix}: {self.message}" if prefix else self.message


class BudgetExceededError(RuntimeError):
    """Training would take a site past its privacy budget; nothing was trained."""
