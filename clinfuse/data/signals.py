"""Decoding of 1-D multichannel signals (ECG, vital-sign series): WFDB records, CSV and NPY arrays.

* WFDB: the manifest names the record's header file (``rec01.hea``, or the record name without a
  suffix); read with the ``wfdb`` package in physical units. The record's own sampling rate is
  resampled to the declared one; ``channel_names`` picks channels by name.
* CSV: one row per sample, one column per channel (a header row is allowed), at the declared rate.
* NPY: a ``[samples, channels]`` array (``[samples]`` for one channel), at the declared rate.

:func:`check_signal` is a cheap check (headers and shapes; ``clinfuse validate`` goes further and
reads every signal with :func:`read_signal`, as training will);
:func:`read_signal` gives float32 ``[channels, samples]`` at the declared rate;
:func:`decode_signal` the model input ``[channels, length]``: the first ``length`` samples
(zero-padded when shorter), each channel z-scored on its own (``normalize: zscore``). Missing
samples (NaN in a WFDB record) count as the channel's mean. Problems raise
:class:`clinfuse.errors.InputError` naming the file: the readers run inside
:func:`clinfuse.data.decoding.decoding`, so whatever wfdb or numpy raise on a bad file becomes that
error, and their warnings stay off the console. A WFDB header names its signal files without a
folder (wfdb's header syntax refuses one), so a record reads only files beside its header.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from clinfuse.data.decoding import decoding
from clinfuse.errors import InputError

SIGNAL_SUFFIXES = (".hea", ".csv", ".npy")


def _format(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in SIGNAL_SUFFIXES:
        return suffix[1:]
    if p.with_suffix(p.suffix + ".hea").is_file() or p.with_name(p.name + ".hea").is_file():
        return "hea"
    raise InputError(f"unsupported signal type '{suffix or '(no extension)'}'; use a WFDB header (.hea), "
                     ".csv or .npy", file=p)


def _record_name(p: Path) -> str:
    return str(p.with_suffix("")) if p.suffix.lower() == ".hea" else str(p)


def signal_header(path: str | os.PathLike[str]) -> Path:
    """The file a manifest's signal path names: the path itself, or the WFDB header of a record
    named without its ``.hea`` suffix."""
    p = Path(path)
    if p.suffix.lower() in SIGNAL_SUFFIXES or p.exists():
        return p
    header = p.with_name(p.name + ".hea")
    return header if header.is_file() else p


def _open(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The path and its format (``hea``, ``npy`` or ``csv``); a CSV/NPY file must exist (a WFDB
    header is looked for by :func:`_wfdb_header`)."""
    p = Path(path)
    kind = _format(p)
    if kind != "hea" and not p.is_file():
        raise InputError("signal file not found", file=p)
    return p, kind


def check_signal(path: str | os.PathLike[str], spec) -> None:
    """Check a signal file against ``spec`` (:class:`clinfuse.config.SignalModality`) cheaply."""
    p, kind = _open(path)
    with decoding(p, "read the signal"):
        if kind == "hea":
            header = _wfdb_header(p)
            _wfdb_channels(header.sig_name, spec, p)
            if not header.sig_len:
                raise InputError("WFDB record has no samples", file=p)
        elif kind == "npy":
            _check_shape(_npy(p, mmap=True).shape, spec, p)
        else:
            _check_shape(_csv(p).shape, spec, p)


def read_signal(path: str | os.PathLike[str], spec) -> np.ndarray:
    """The signal at ``path`` as float32 ``[channels, samples]`` at ``spec.sampling_rate``."""
    p, kind = _open(path)
    with decoding(p, "read the signal"):
        if kind == "hea":
            arr, fs = _read_wfdb(p, spec)
            if abs(fs - spec.sampling_rate) > 1e-6 * spec.sampling_rate:
                arr = _resample(arr, fs, spec.sampling_rate)
        elif kind == "npy":
            arr = _npy(p)
            _check_shape(arr.shape, spec, p)
            arr = arr.reshape(len(arr), -1).T
        else:
            arr = _csv(p)
            _check_shape(arr.shape, spec, p)
            arr = arr.reshape(len(arr), -1).T
        arr = np.asarray(arr, dtype=np.float64)
        if np.isinf(arr).any():
            raise InputError("signal contains infinite values", file=p)
        if np.isnan(arr).all():
            raise InputError("signal has no valid sample", file=p)
        return np.ascontiguousarray(arr, dtype=np.float32)


def decode_signal(path: str | os.PathLike[str], spec) -> np.ndarray:
    """Model input of one signal: float32 ``[channels, spec.length]`` (see the module docstring)."""
    arr = read_signal(path, spec).astype(np.float64)
    if spec.normalize == "zscore":
        mean = np.nanmean(arr, axis=1, keepdims=True)
        std = np.nanstd(arr, axis=1, keepdims=True)
        arr = np.where(std > 0, (arr - mean) / np.where(std > 0, std, 1.0), 0.0)
    else:
        arr = np.where(np.isnan(arr), np.nanmean(arr, axis=1, keepdims=True), arr)
    arr = np.nan_to_num(arr, nan=0.0)
    out = np.zeros((spec.channels, spec.length), dtype=np.float32)
    n = min(spec.length, arr.shape[1])
    out[:, :n] = arr[:, :n]
    return out


def _check_shape(shape: tuple, spec, p: Path) -> None:
    if len(shape) == 1 and spec.channels == 1:
        shape = (shape[0], 1)
    if len(shape) != 2:
        raise InputError(f"signal array has shape {tuple(shape)}; expected [samples, {spec.channels}]", file=p)
    if shape[1] != spec.channels:
        hint = " (is it [channels, samples]? store it as [samples, channels])" if shape[0] == spec.channels else ""
        raise InputError(f"signal has {shape[1]} channels, the study declares {spec.channels}{hint}", file=p)
    if shape[0] < 1:
        raise InputError("signal has no samples", file=p)


def _npy(p: Path, mmap: bool = False) -> np.ndarray:
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
        raise InputError(f"not a readable .npy array: {type(exc).__name__}: {exc}", file=p) from None
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"signal array has dtype {arr.dtype}; expected numbers", file=p)
    return arr


def _csv(p: Path) -> np.ndarray:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the CSV signal: {exc}", file=p) from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        try:
            [float(v) for v in lines[0].split(",")]
        except ValueError:
            lines = lines[1:]  # a header row
    if not lines:
        raise InputError("CSV signal has no samples", file=p)
    rows = []
    width = None
    for i, line in enumerate(lines):
        parts = line.split(",")
        if width is None:
            width = len(parts)
        if len(parts) != width:
            raise InputError(f"CSV signal line {i + 1} has {len(parts)} values, the first has {width}", file=p)
        try:
            rows.append([float(v) if v.strip() else np.nan for v in parts])
        except ValueError:
            raise InputError(f"CSV signal line {i + 1} holds a value that is not a number", file=p) from None
    return np.asarray(rows, dtype=np.float64)


def wfdb_module():
    """The ``wfdb`` package, imported without the pandas deprecation warnings its import prints."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb
    return wfdb


def _wfdb_header(p: Path):
    wfdb = wfdb_module()
    name = _record_name(p)
    if not Path(name + ".hea").is_file():
        raise InputError("WFDB header not found", file=Path(name + ".hea"))
    try:
        return wfdb.rdheader(name)
    except Exception as exc:  # noqa: BLE001 - wfdb raises plain exceptions for bad headers
        raise InputError(f"not a readable WFDB header: {type(exc).__name__}: {exc}",
                         file=Path(name + ".hea")) from None


def _wfdb_channels(names, spec, p: Path) -> list[int]:
    names = list(names or [])
    if spec.channel_names:
        missing = [n for n in spec.channel_names if n not in names]
        if missing:
            raise InputError(f"WFDB record lacks channel(s) {missing} (it has {names})", file=p)
        return [names.index(n) for n in spec.channel_names]
    if len(names) != spec.channels:
        raise InputError(f"WFDB record has {len(names)} channels, the study declares {spec.channels} "
                         "(or pick them with channel_names)", file=p)
    return list(range(len(names)))


def _read_wfdb(p: Path, spec) -> tuple[np.ndarray, float]:
    wfdb = wfdb_module()
    header = _wfdb_header(p)
    picks = _wfdb_channels(header.sig_name, spec, p)
    try:
        record = wfdb.rdrecord(_record_name(p), channels=picks, physical=True)
    except Exception as exc:  # noqa: BLE001 - missing or truncated .dat files...
        raise InputError(f"cannot read the WFDB record's samples: {type(exc).__name__}: {exc}", file=p) from None
    if record.p_signal is None or record.p_signal.size == 0:
        raise InputError("WFDB record has no samples", file=p)
    return np.asarray(record.p_signal, dtype=np.float64).T, float(record.fs)


def _resample(arr: np.ndarray, fs: float, target: float) -> np.ndarray:
    from scipy.signal import resample_poly

    ratio = Fraction(target / fs).limit_denominator(1000)
    filled = np.where(np.isnan(arr), np.nanmean(arr, axis=1, keepdims=True), arr)
    return resample_poly(np.nan_to_num(filled), ratio.numerator, ratio.denominator, axis=1)
