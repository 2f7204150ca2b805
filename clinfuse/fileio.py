"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.
And :func:`to_jsonable`, the plain-JSON form of results (metrics, training histories)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place.

    ``durable=False`` skips both fsyncs (file and folder): still never a partial file under
    ``path``, but a power cut may lose the write: only for files rebuilt when lost (caches, the
    demo cohort's images).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; give outputs the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return path
    try:  # make the rename itself durable (privacy state must survive a power cut)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def to_jsonable(obj, *, strict: bool = False, key: str = ""):
    """The plain-JSON form of ``obj``: the one sanitiser for results, run history and ledgers.

    Mappings (keys as strings), lists and tuples are converted recursively; numpy and torch
    scalars and arrays become numbers and lists; paths become strings. Infinities become the
    strings ``"inf"`` / ``"-inf"``: an infinite epsilon must stay infinite, never read as unknown
    (:func:`clinfuse.privacy.ledger.as_float` reads them back). NaN becomes ``None``; with
    ``strict`` (ledger entries) NaN and values of any other type raise :class:`ValueError` naming
    the field (``key`` is the dotted path so far).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, strict=strict, key=f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, strict=strict, key=key) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            if strict:
                raise ValueError(f"field '{key}' is NaN")
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    for convert in ("item", "tolist"):  # numpy / torch scalars, then arrays
        method = getattr(obj, convert, None)
        if callable(method) and (convert == "tolist" or getattr(obj, "ndim", 0) == 0):
            return to_jsonable(method(), strict=strict, key=key)
    if strict:
        raise ValueError(f"field '{key}' has a value of type {type(obj).__name__} that is not JSON")
    return obj
