"""Tabular EHR fields encoded by their *declared* ranges and categories.

Scaling uses the ranges written in the configuration, never statistics fitted on a site's
rows, so no feature statistic of private data shapes the model. Values outside the declared
range are rejected by validation, not clipped silently.

Layout of the vector, column by column in config order:
numeric -> (value scaled by its declared reference center/spread, or to [0, 1] by its declared
range; missing flag); categorical -> (one-hot..., missing flag).
A missing value is encoded as zeros plus a raised missing flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clinfuse.config import CategoricalColumn, NumericColumn, canonical_value

Column = NumericColumn | CategoricalColumn


def tabular_dim(columns: Sequence[Column]) -> int:
    """Length of the encoded tabular vector for these declared columns."""
    return sum(2 if c.type == "numeric" else len(c.categories) + 1 for c in columns)


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_value(column: Column, value: object) -> float | str | None:
    """Check one raw cell against its declaration; return the clean value or ``None`` if missing.

    Empty cells and the column's declared ``missing`` codes (compared by value: ``0``, ``0.0``)
    are missing. Categories compare by :func:`~clinfuse.config.canonical_value` (``1.0`` is the
    category ``1``) and come back in their declared spelling.
    Raises ``ValueError`` with a message fit for the user when the value breaks the declaration.
    """
    if is_missing(value):
        return None
    if column.type == "numeric":
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"'{value}' is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"'{value}' is not a finite number")
        if number in column.missing:
            return None
        if not column.min <= number <= column.max:
            hint = (f"; if {number:g} means 'not measured', declare missing: [{number:g}] for this column"
                    if number <= 0 < column.min else "")
            raise ValueError(f"{number:g} is outside the declared range [{column.min:g}, {column.max:g}]{hint}")
        return number
    text = canonical_value(value)
    if text in column.missing:
        return None
    if text not in column.categories:
        raise ValueError(f"'{text}' is not a declared category {column.categories}")
    return text


def encode_tabular(values: Mapping[str, float | str | None], columns: Sequence[Column]) -> np.ndarray:
    """Encode parsed values (``parse_value`` output, keyed by column name) as a float32 vector."""
    out = np.zeros(tabular_dim(columns), dtype=np.float32)
    pos = 0
    for column in columns:
        value = values.get(column.name)
        if column.type == "numeric":
            if value is None:
                out[pos + 1] = 1.0
            elif column.center is not None:
                out[pos] = (float(value) - column.center) / column.spread
            else:
                out[pos] = (float(value) - column.min) / (column.max - column.min)
            pos += 2
        else:
            width = len(column.categories)
            if value is None:
                out[pos + width] = 1.0
            else:
                out[pos + column.categories.index(value)] = 1.0
            pos += width + 1
    return out
