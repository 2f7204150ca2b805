"""Site manifest: schema, validation and the patient-level split.

A manifest is a CSV or Parquet file with one row per record:

``patient_id`` (required), ``label`` (required for training and evaluation, optional when reading
rows to predict; one of ``data.labels``, numbers compared by value), optional ``split``
(train/val/test) and optional ``site``, and the columns of the study's modalities
(:func:`clinfuse.config.modality_columns`), named after each modality unless it declares
``column``:

* ``image`` / ``volume`` / ``signal`` kinds: a path relative to the manifest (an image file; a
  volume's DICOM series folder, multi-frame DICOM or NIfTI file; a signal's WFDB header, CSV or
  NPY file), or several paths separated by ``;`` when a patient has several;
* ``text``: inline text in ``<column>``, or a UTF-8 file named in ``<column>_path``;
* ``tabular``: one column per declared field.

Empty cells mean the modality or value is absent. The rows of one patient are pooled downstream
(:class:`clinfuse.data.dataset.MultimodalDataset`): one patient, one sample. Every path, and every
file a path stands for (the slices of a series folder, a WFDB record's signal files), must resolve
inside the manifest's folder or a declared data root (:mod:`clinfuse.data.paths`). Every image,
volume and signal is decoded as training will decode it.

:func:`read_manifest` returns a :class:`SiteData`: the usable :class:`Record` s plus every
:class:`Problem` found, each naming its row (1-based, header excluded) and file. Rows with an
error are skipped and counted; warnings (an empty note, identifying DICOM tags) keep the row.
Problems with the file as a whole (unreadable, a required column missing) raise
:class:`~clinfuse.errors.InputError`; a bad cell (text that is not UTF-8, a file that does not
decode, a path outside the site) is that row's error only.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clinfuse.config import MANIFEST_COLUMNS, Config, canonical_value, modality_columns
from clinfuse.data import tabular as tab
from clinfuse.data.paths import data_roots as site_roots
from clinfuse.data.paths import input_files, resolve_site_path
from clinfuse.data.text import normalize_note
from clinfuse.errors import InputError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("patient_id", "label")
PATH_KINDS = ("image", "volume", "signal")
PATH_SEPARATOR = ";"
#: Note files above this size are refused: a note is a page of text, not a data dump.
MAX_NOTE_BYTES = 1 << 20


def study_columns(cfg: Config) -> tuple[str, ...]:
    """Every column a manifest of this study may have: the standard ones (``patient_id``,
    ``label``, ``split``, ``site``) and those of its modalities, in declared order."""
    return (*MANIFEST_COLUMNS, *(c for spec in cfg.modalities for c in modality_columns(spec)))


def has_input(kind: str, value) -> bool:
    """Whether a record's value of a modality of ``kind`` is present."""
    if kind in PATH_KINDS:
        return bool(value)
    if kind == "tabular":
        return any(v is not None for v in value.values())
    return value is not None


@dataclass(frozen=True)
class Record:
    """One usable manifest row.

    ``inputs`` maps each declared modality, in declared order, to its value: a tuple of absolute
    paths for image, volume and signal kinds (empty when absent), the normalised note (``None``
    when absent) for text, ``{field: value or None}`` for tabular. ``mask`` says which are present.
    """
    row: int
    patient_id: str
    label: int | None  # None only in rows read for prediction (``require_label=False``)
    inputs: dict
    mask: tuple[bool, ...]
    split: str
    site: str

    def __getattr__(self, name: str):
        # record.<modality name> reads inputs[name] (e.g. record.tabular["age"])
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in inputs:
            return inputs[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Problem:
    """Something wrong with one row (or, with ``row=None``, with the manifest as a whole)."""
    file: str
    row: int | None
    column: str | None
    message: str
    severity: str = "error"  # "error": row skipped; "warning": row kept

    def describe(self) -> str:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        col = f" [{self.column}]" if self.column else ""
        return f"{self.severity}: {where}{col}: {self.message}"


@dataclass
class SiteData:
    manifest: Path
    site: str
    n_rows: int
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    modalities: tuple[str, ...] = ()  # the study's modality names, in the order of ``Record.mask``
    # per modality: inputs beyond its max_count (a patient's later images, differing notes), not used
    unused_inputs: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)  # the manifest's columns, as read

    @property
    def skipped_rows(self) -> list[int]:
        return sorted({p.row for p in self.problems if p.severity == "error" and p.row is not None})

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient_id for r in self.records})

    def require_records(self, then: str = "run 'clinfuse validate' for every problem") -> None:
        """Raise :class:`InputError` naming the manifest and the commonest reason its rows were
        skipped when no row is usable; ``then`` tells the user what to do next."""
        if not self.records:
            lines = self.skip_report(examples=1)
            why = f" ({lines[1].strip()})" if len(lines) > 1 else ""
            raise InputError(f"no usable rows{why}; {then}", file=self.manifest)

    def skip_report(self, examples: int = 3) -> list[str]:
        """Lines saying how many rows were skipped and why: ``[]`` when none was.

        One line per column at fault (``image``, ``label``...), with its row count and the first
        row of up to ``examples`` different reasons, so a site engineer sees at once what to fix.
        """
        skipped = self.skipped_rows
        if not skipped:
            return []
        by_column: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            if p.severity == "error" and p.row is not None:
                by_column[p.column or "row"].append(p)
        lines = [(f"{self.site} ({self.manifest}): {len(skipped)} of {self.n_rows} rows skipped, "
                  f"{len(self.records)} used")]
        for column, problems in sorted(by_column.items(), key=lambda kv: -len({p.row for p in kv[1]})):
            distinct = {_reason(p.message): p for p in reversed(problems)}  # first of each reason
            shown = sorted(distinct.values(), key=lambda p: p.row)[:examples]
            lines.append(f"  {column}: {len({p.row for p in problems})} rows, e.g. "
                         + "; ".join(f"row {p.row}: {p.message}" for p in shown))
        lines.append("  run 'clinfuse validate' on the manifest for every problem")
        return lines

    def summary(self, labels: list[str]) -> dict:
        """Counts a site engineer reads first: rows, patients, labels, modalities, patterns, splits."""
        availability = {m: sum(r.mask[i] for r in self.records) for i, m in enumerate(self.modalities)}
        return {
            "manifest": str(self.manifest),
            "site": self.site,
            "rows": self.n_rows,
            "usable_rows": len(self.records),
            "skipped_rows": len(self.skipped_rows),
            "patients": len(self.patients),
            "labels": {name: sum(r.label == i for r in self.records) for i, name in enumerate(labels)},
            "availability": availability,
            "patterns": dict(Counter(pattern_name(r.mask, self.modalities) for r in self.records).most_common()),
            "splits": {s: sum(r.split == s for r in self.records) for s in SPLITS},
            "unused_inputs": {m: n for m, n in self.unused_inputs.items() if n},
            "errors": sum(p.severity == "error" for p in self.problems),
            "warnings": sum(p.severity == "warning" for p in self.problems),
        }


def _reason(message: str) -> str:
    """The kind of a problem message: its first words, after a leading file name ("img3.dcm: ")."""
    head, sep, rest = message.partition(": ")
    if sep and " " not in head:
        message = rest
    return " ".join(message.split()[:3])


def pattern_name(mask, modalities) -> str:
    """Human name of a modality pattern, e.g. ``image+text`` or ``image only`` or ``none``.

    ``mask`` is in the order of ``modalities`` (the study's modality names)."""
    present = [m for m, has in zip(modalities, mask) if has]
    if not present:
        return "none"
    return present[0] + " only" if len(present) == 1 else "+".join(present)


def patient_split(patient_id: str, cfg: Config) -> str:
    """Deterministic split of a patient: same id, same seed -> same split, in any process."""
    digest = hashlib.blake2b(f"{cfg.data.split.seed}:{patient_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    if u < cfg.data.split.test_fraction:
        return "test"
    if u < cfg.data.split.test_fraction + cfg.data.split.val_fraction:
        return "val"
    return "train"


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError("manifest not found", file=path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Everything as text: validation decides what a cell means, pandas must not guess.
            # Bytes that are not UTF-8 are kept (marked) so that only their row fails. Never an
            # index column: pandas would silently take the first column as the index when a row
            # has more fields than the header, shifting every cell; such a row is refused instead.
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                try:
                    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig",
                                       encoding_errors=_MARK_BYTES, index_col=False)
                except pd.errors.ParserWarning:
                    raise InputError("a row has more fields than the header (an unquoted comma?): quote "
                                     "cells that contain commas", file=path) from None
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            return frame.astype(object).where(frame.notna(), "").map(
                lambda v: v if isinstance(v, str) else ("" if v is None else str(v)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the manifest: {exc}".strip(), file=path) from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for corrupt files
        raise InputError(f"cannot read the manifest: {type(exc).__name__}: {exc}", file=path) from None
    raise InputError(f"unsupported manifest type '{suffix}': use .csv or .parquet", file=path)


# A byte that is not UTF-8 is read as a code point of the last private-use plane, U+10FF00 + byte
# (surrogates, Python's usual mark, do not survive pandas' parser): no real text uses them.
_MARK_BYTES = "clinfuse-mark-bytes"
_BYTE_MARK = 0x10FF00


def _mark_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(chr(_BYTE_MARK + b) for b in err.object[err.start:err.end]), err.end


codecs.register_error(_MARK_BYTES, _mark_bytes)


def _escape_undecodable(frame: pd.DataFrame) -> dict[int, list[tuple[str, str]]]:
    """Cells holding bytes that are not UTF-8: ``{row index: [(column, shown text)]}``.

    Such cells (and column names) are rewritten with the bytes shown as ``\\xe8``, so that every
    message stays printable; the rows are reported by the caller.
    """
    def shown(text: str) -> str:
        return "".join(f"\\x{ord(ch) - _BYTE_MARK:02x}" if ord(ch) >= _BYTE_MARK + 0x80 else ch for ch in text)

    def bad(text) -> bool:
        return isinstance(text, str) and any(ord(ch) >= _BYTE_MARK + 0x80 for ch in text)

    frame.columns = [shown(c) if bad(c) else c for c in frame.columns]
    found: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for column in frame.columns:
        values = frame[column]
        for index in values.index[values.map(bad)]:
            fixed = shown(values[index])
            found[int(index)].append((column, fixed))
            frame.loc[index, column] = fixed
    return found


def _check_columns(frame: pd.DataFrame, cfg: Config, path: Path, require_label: bool = True) -> None:
    for column in REQUIRED_COLUMNS:
        if column == "label" and not require_label:
            continue
        if column not in frame.columns:
            raise InputError(f"required column '{column}' is missing (columns: {list(frame.columns)})",
                             file=path, key=column)
    for spec in cfg.modalities:
        columns = modality_columns(spec)
        if spec.kind == "tabular":
            for name in columns:
                if name not in frame.columns:
                    raise InputError(
                        f"declared tabular column '{name}' (modality '{spec.name}') is missing; add it (empty "
                        "cells are allowed) or remove it from the config", file=path, key=name)
        elif spec.kind == "text" and all(c in frame.columns for c in columns):
            raise InputError(f"give notes either inline ('{columns[0]}') or as files ('{columns[1]}'), not both",
                             file=path, key=columns[1])


def _site_name(frame: pd.DataFrame, path: Path) -> str:
    if "site" in frame.columns:
        names = {s.strip() for s in frame["site"] if s.strip()}
        if len(names) > 1:
            raise InputError(f"one manifest must hold one site, found {sorted(names)}", file=path, key="site")
        if names:
            return names.pop()
    return path.resolve().parent.name


def _read_note_file(path: Path) -> str:
    """A note file's text; ``ValueError`` naming the problem when it is not a readable UTF-8 note."""
    problem = _not_a_regular_file(path, "note file")
    if problem:
        raise ValueError(problem)
    try:
        size = path.stat().st_size
        if size > MAX_NOTE_BYTES:
            raise ValueError(f"note file {path.name} has {size} bytes; notes above {MAX_NOTE_BYTES} bytes are "
                             "refused (is it a note?)")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"note file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"cannot read note file {path}: {exc.strerror or exc}") from None


def _not_a_regular_file(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be read as a ``what``, or ``None`` when it is a regular file."""
    try:
        if path.is_file():
            return None
        if path.exists():
            return f"{what} {path} is not a regular file"
    except OSError as exc:
        return f"cannot open {what} {path}: {exc.strerror or exc}"
    return f"{what} not found: {path}"


def split_paths(cell: str) -> list[str]:
    """The paths of one cell: one path, or several separated by ``;`` (blank parts ignored)."""
    return [part.strip() for part in cell.split(PATH_SEPARATOR) if part.strip()]


def _missing_input(spec, target: Path) -> str | None:
    """Why ``target`` cannot be an input of ``spec``'s kind before any decoder opens it, or ``None``."""
    if spec.kind == "image":
        return _not_a_regular_file(target, "image file")
    if spec.kind == "volume":
        try:
            if target.is_dir() or target.is_file():
                return None
        except OSError as exc:
            return f"cannot open volume {target}: {exc.strerror or exc}"
        return f"volume not found: {target}"
    from clinfuse.data.signals import signal_header

    return _not_a_regular_file(signal_header(target), "signal file")


def _outside_files(target: Path, roots: tuple[Path, ...]) -> str | None:
    """The first file that ``target`` stands for (a series folder's slices, a WFDB record's signal
    files) resolving outside the site, as a message; ``None`` when all are inside."""
    for f in input_files(target):
        try:
            resolve_site_path(str(f), roots)
        except ValueError as exc:
            return f"{target.name} reads {f.name}, and {exc}"
    return None


def _file_findings(spec, target: Path, memo: MutableMapping[str, dict] | None) -> dict:
    """``{"error": message or None, "phi": [...]}`` for one input file of ``spec``: decoded as
    training decodes it (the study's frame and VOI settings for an image; every slice of a volume
    series; a signal at the declared rate and channels), then scanned for identifying DICOM data.

    ``memo`` (a mapping the caller keeps, e.g. in the site's state dir) holds the findings of files
    that decoded, keyed by path, the size and modification time of every file the input reads, the
    modality's preprocessing and the version of the checks: such an input is not opened again and
    keeps its identifying-data verdict. One that failed is checked again every time (a decoder
    installed since may read it; it stays refused otherwise).
    """
    from clinfuse.data import images  # pydicom is slow to import

    key = None
    if memo is not None:
        try:
            stats = [(str(f), st.st_size, st.st_mtime_ns) for f in input_files(target) for st in (f.stat(),)]
            key = json.dumps([str(target), stats, spec.kind, spec.preprocessing(), images.CHECKS_VERSION])
        except OSError:
            key = None
        if key in memo:
            memo[key] = memo[key]  # written back: a ChainMap memo keeps only what is still used
            return memo[key]
    try:
        if spec.kind == "image":
            images.read_pixels(target, frame=spec.frame, apply_voi_lut=spec.apply_voi_lut)
            phi = images.phi_fields(target)
        elif spec.kind == "volume":
            from clinfuse.data.volumes import read_volume, volume_phi

            read_volume(target)
            phi = volume_phi(target)
        else:
            from clinfuse.data.signals import read_signal

            read_signal(target, spec)
            phi = []
        findings = {"error": None, "phi": phi}
    except InputError as exc:
        culprit = Path(exc.file) if exc.file else target
        shown = f"{target.name}/{culprit.name}" if culprit.parent == target else culprit.name
        findings = {"error": f"{shown}: {exc.message}", "phi": []}
    if key is not None and findings["error"] is None:
        memo[key] = findings
    return findings


def _check_paths(spec, raw: dict, columns, roots: tuple[Path, ...], check_files: bool, cfg: Config,
                 memo, error) -> tuple[Path, ...]:
    """Validate the path(s) of an image, volume or signal cell; returns the usable absolute paths.

    Each bad path is an error of the row (the row is then skipped): a path outside the site, a
    missing file, one that does not decode as training will decode it (with ``check_files``).
    Identifying DICOM data is a warning, or an error with ``data.require_deidentified``.
    """
    column = spec.column or spec.name
    if column not in columns or not raw[column].strip():
        return ()
    out = []
    for rel in split_paths(raw[column]):
        try:
            target = resolve_site_path(rel, roots)
        except ValueError as exc:
            error(column, f"{spec.kind} path {exc}")
            continue
        problem = _missing_input(spec, target) or _outside_files(target, roots)
        if problem:
            error(column, problem)
            continue
        if check_files:
            findings = _file_findings(spec, target, memo)
            if findings["error"]:
                error(column, findings["error"])
                continue
            if findings["phi"]:
                error(column, f"identifying data in {target.name} (DICOM PS3.15 Annex E): "
                      f"{', '.join(findings['phi'])}", "error" if cfg.data.require_deidentified else "warning")
        out.append(target)
    return tuple(out)


def _read_note(spec, raw: dict, columns, roots: tuple[Path, ...], error) -> str | None:
    inline, by_file = spec.column or spec.name, f"{spec.column or spec.name}_path"
    note = None
    if inline in columns:
        note = normalize_note(raw[inline])
        if raw[inline] and note is None:
            error(inline, "note is empty; counted as a missing note", "warning")
    elif by_file in columns and raw[by_file].strip():
        try:
            note_file = resolve_site_path(raw[by_file], roots)
        except ValueError as exc:
            error(by_file, f"note path {exc}")
            return None
        try:
            note = normalize_note(_read_note_file(note_file))
        except ValueError as exc:
            error(by_file, str(exc))
        else:
            if note is None:
                error(by_file, f"note file {note_file.name} is empty; counted as a missing note", "warning")
    return note


def read_manifest(path: str | Path, cfg: Config, *, check_files: bool = True,
                  data_roots: Iterable[str | os.PathLike[str]] = (),
                  file_checks: MutableMapping[str, dict] | None = None,
                  require_label: bool = True, progress: bool = True) -> SiteData:
    """Validate a site manifest against ``cfg`` and return its usable records and problems.

    ``check_files`` decodes every image, volume and signal as training will (and scans DICOM for
    identifying data); switch it off only where no such file is opened. ``data_roots`` are folders
    of this site, besides the manifest's own and ``data.roots``, that its paths may point into.
    ``file_checks`` is a memo of file findings (see :func:`_file_findings`) that the caller keeps
    between runs. ``require_label=False`` reads rows to predict: the ``label`` column may be absent
    or empty (records get ``label=None``); a label that is not a declared class is a warning, not an
    error, since prediction never reads it. A long read prints ``progress`` lines
    (:class:`clinfuse.progress.Progress`).
    """
    from clinfuse.progress import Progress

    path = Path(path)
    frame = _read_table(path)
    undecodable = _escape_undecodable(frame)
    _check_columns(frame, cfg, path, require_label)
    site = _site_name(frame, path)
    roots = site_roots(path, cfg.data.roots, data_roots)
    data = SiteData(manifest=path, site=site, n_rows=len(frame), modalities=cfg.modality_names,
                    columns=[str(c) for c in frame.columns])
    file = str(path)
    for spec in cfg.modalities:
        column = modality_columns(spec)
        if spec.kind != "tabular" and not any(c in frame.columns for c in column):
            data.problems.append(Problem(file, None, column[0], f"no column for modality '{spec.name}' "
                                         f"(expected {' or '.join(repr(c) for c in column)}): no row has it",
                                         "warning"))
    labels = {name: i for i, name in enumerate(cfg.data.labels)}
    has_split = "split" in frame.columns and any(s.strip() for s in frame["split"])

    candidates: list[Record] = []
    seen: dict[tuple, int] = {}
    rows = Progress(len(frame), f"validating {path}", "row", enabled=progress).track(frame.to_dict("records"))
    for index, raw in enumerate(rows):
        row = index + 1
        errors: list[Problem] = []

        def error(column, message, severity="error", row=row, errors=errors):
            errors.append(Problem(file, row, column, message, severity))

        for column, shown in undecodable.get(index, ()):
            error(column, f"{column} is not UTF-8 text: {shown[:80]!r}; save the manifest as UTF-8")

        patient_id = raw["patient_id"].strip()
        if not patient_id or patient_id.lower() in ("nan", "none", "null"):
            error("patient_id", "patient_id is empty")
        label_text = canonical_value(raw["label"]) if "label" in raw else ""
        label = labels.get(label_text)
        if label is None and (require_label or label_text):
            error("label", f"label '{label_text}' is not one of the declared labels {cfg.data.labels}"
                  if label_text else "label is empty", "error" if require_label else "warning")

        inputs: dict = {}
        for spec in cfg.modalities:
            if spec.kind in PATH_KINDS:
                inputs[spec.name] = _check_paths(spec, raw, frame.columns, roots, check_files, cfg, file_checks,
                                                 error)
            elif spec.kind == "text":
                inputs[spec.name] = _read_note(spec, raw, frame.columns, roots, error)
            else:
                values = {}
                for column in spec.columns:
                    try:
                        values[column.name] = tab.parse_value(column, raw[column.name])
                    except ValueError as exc:
                        error(column.name, str(exc))
                inputs[spec.name] = values
        mask = tuple(has_input(spec.kind, inputs[spec.name]) for spec in cfg.modalities)

        split = raw.get("split", "").strip() if has_split else ""
        if has_split and split not in SPLITS:
            error("split", f"split '{split}' must be one of {list(SPLITS)}")

        if all(p.severity == "warning" for p in errors) and not any(mask):
            error(None, f"row has no input of any modality ({', '.join(cfg.modality_names)})")

        key = tuple(sorted((k, v) for k, v in raw.items()))
        if key in seen:
            error(None, f"duplicate of row {seen[key]}")
        else:
            seen[key] = row

        data.problems.extend(errors)
        if any(p.severity == "error" for p in errors):
            continue
        candidates.append(Record(row=row, patient_id=patient_id, label=label, inputs=inputs, mask=mask,
                                 split=split or patient_split(patient_id, cfg), site=site))

    data.records = _drop_inconsistent_patients(candidates, data, file, cfg)
    data.unused_inputs = _unused_inputs(data.records, cfg)
    data.problems.sort(key=lambda p: (p.row or 0, p.severity))
    return data


def _drop_inconsistent_patients(records: list[Record], data: SiteData, file: str, cfg: Config) -> list[Record]:
    """A patient with two labels (or in two splits) cannot be trusted: report and skip all their rows."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)
    keep = []
    for patient, rows in by_patient.items():
        labels = sorted({cfg.data.labels[r.label] for r in rows if r.label is not None})
        splits = sorted({r.split for r in rows})
        if len(labels) > 1:
            for r in rows:
                data.problems.append(Problem(file, r.row, "label",
                                             f"patient '{patient}' has conflicting labels {labels} "
                                             f"(rows {[x.row for x in rows]})"))
        elif len(splits) > 1:
            for r in rows:
                data.problems.append(Problem(file, r.row, "split",
                                             f"patient '{patient}' is in several splits {splits}; "
                                             "a patient must be in one split"))
        else:
            keep.extend(rows)
    return sorted(keep, key=lambda r: r.row)


def _unused_inputs(records: list[Record], cfg: Config) -> dict[str, int]:
    """Per modality, how many distinct inputs of patients go beyond its ``max_count`` (the first
    ones in row order are used; raise ``max_count`` to pool more): a patient's second film with
    ``max_count: 1``, or rows whose notes differ."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record)
    out = dict.fromkeys(cfg.modality_names, 0)
    for rows in by_patient.values():
        for spec in cfg.modalities:
            values = [r.inputs[spec.name] for r in rows]
            out[spec.name] += _count_distinct(spec, values) - len(patient_inputs(spec, values))
    return out


def _count_distinct(spec, values: list) -> int:
    if spec.kind in PATH_KINDS:
        return len(dict.fromkeys(p for paths in values for p in paths))
    present = [v for v in values if has_input(spec.kind, v)]
    keys = [tuple(sorted(v.items())) if spec.kind == "tabular" else v for v in present]
    return len(dict.fromkeys(keys))


def patient_inputs(spec, values: list) -> list:
    """One patient's inputs of a modality, pooled over their rows: the distinct present values in
    row order (paths of several cells in order), at most ``spec.max_count``."""
    if spec.kind in PATH_KINDS:
        return list(dict.fromkeys(p for paths in values for p in paths))[:spec.max_count]
    out, seen = [], set()
    for v in values:
        if not has_input(spec.kind, v):
            continue
        key = tuple(sorted(v.items())) if spec.kind == "tabular" else v
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out[:spec.max_count]
