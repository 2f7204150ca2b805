"""Site manifest: schema, validation and the patient-level split.

A manifest is a CSV or Parquet file with one row per record:

``patient_id`` (required), ``label`` (required; one of ``data.labels``), optional ``split``
(train/val/test) and optional ``site``, and the columns of the study's modalities
(:func:`clinfuse.config.modality_columns`), named after each modality unless it declares
``column``:

* ``image`` / ``volume`` / ``signal`` kinds: a path relative to the manifest (an image file; a
  volume's DICOM series folder, multi-frame DICOM or NIfTI file; a signal's WFDB header, CSV or
  NPY file), or several paths separated by ``;`` when a patient has several;
* ``text``: inline text in ``<column>``, or a UTF-8 file named in ``<column>_path``;
* ``tabular``: one column per declared field.

Empty cells mean the modality or value is absent. The rows of one patient are pooled downstream
(:class:`clinfuse.data.dataset.MultimodalDataset`): one patient, one sample.

:func:`read_manifest` returns a :class:`SiteData`: the usable :class:`Record` s plus every
:class:`Problem` found, each naming its row (1-based, header excluded) and file. Rows with an
error are skipped and counted; warnings (an empty note, identifying DICOM tags) keep the row.
Problems with the file as a whole (unreadable, a required column missing) raise
:class:`~clinfuse.errors.InputError`.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clinfuse.config import Config, modality_columns
from clinfuse.data import tabular as tab
from clinfuse.data.text import normalize_note
from clinfuse.errors import InputError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("patient_id", "label")
PATH_KINDS = ("image", "volume", "signal")
PATH_SEPARATOR = ";"


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
    label: int
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

    @property
    def skipped_rows(self) -> list[int]:
        return sorted({p.row for p in self.problems if p.severity == "error" and p.row is not None})

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient_id for r in self.records})

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
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            return frame.astype(object).where(frame.notna(), "").map(
                lambda v: v if isinstance(v, str) else ("" if v is None else str(v)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the manifest: {exc}".strip(), file=path) from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for corrupt files
        raise InputError(f"cannot read the manifest: {type(exc).__name__}: {exc}", file=path) from None
    raise InputError(f"unsupported manifest type '{suffix}': use .csv or .parquet", file=path)


def _check_columns(frame: pd.DataFrame, cfg: Config, path: Path) -> None:
    for column in REQUIRED_COLUMNS:
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
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"note file {path} is not UTF-8 text") from None


def split_paths(cell: str) -> list[str]:
    """The paths of one cell: one path, or several separated by ``;`` (blank parts ignored)."""
    return [part.strip() for part in cell.split(PATH_SEPARATOR) if part.strip()]


def _check_paths(spec, raw: dict, columns, base: Path, check_files: bool, cfg: Config, error) -> tuple[Path, ...]:
    """Validate the path(s) of an image, volume or signal cell; returns the usable absolute paths.

    Each bad path is an error of the row (the row is then skipped); file formats are checked by
    the decoder module of the kind (header-level, no full decode).
    """
    column = spec.column or spec.name
    if column not in columns or not raw[column].strip():
        return ()
    out = []
    for rel in split_paths(raw[column]):
        target = (base / rel).resolve()
        if spec.kind == "image":
            problem, phi = _check_image_file(target, check_files)
        elif spec.kind == "volume":
            from clinfuse.data.volumes import check_volume

            problem, phi = _checked(lambda t=target: check_volume(t, phi=True), check_files, target)
        else:
            from clinfuse.data.signals import check_signal

            problem, phi = _checked(lambda t=target: (check_signal(t, spec), [])[1], check_files, target)
        if problem:
            error(column, problem)
            continue
        if phi:
            error(column, f"identifying DICOM tags are filled in {target.name}: {', '.join(phi)}",
                  "error" if cfg.data.require_deidentified else "warning")
        out.append(target)
    return tuple(out)


def _checked(check, check_files: bool, target: Path) -> tuple[str | None, list[str]]:
    if not target.exists():
        return f"file not found: {target}", []
    if not check_files:
        return None, []
    try:
        return None, list(check() or [])
    except InputError as exc:
        return exc.describe(), []


def _check_image_file(image: Path, check_files: bool) -> tuple[str | None, list[str]]:
    from clinfuse.data.images import IMAGE_SUFFIXES, check_image, phi_fields  # pydicom is slow to import

    if image.suffix.lower() not in IMAGE_SUFFIXES:
        return (f"unsupported image type '{image.suffix}' ({image.name}); "
                f"use one of {sorted(IMAGE_SUFFIXES)}"), []
    if not image.is_file():
        return f"image file not found: {image}", []
    if not check_files:
        return None, []
    try:
        check_image(image)
        return None, phi_fields(image)
    except InputError as exc:
        return exc.describe(), []


def _read_note(spec, raw: dict, columns, base: Path, error) -> str | None:
    inline, by_file = spec.column or spec.name, f"{spec.column or spec.name}_path"
    note = None
    if inline in columns:
        note = normalize_note(raw[inline])
        if raw[inline] and note is None:
            error(inline, "note is empty; counted as a missing note", "warning")
    elif by_file in columns and raw[by_file].strip():
        note_file = (base / raw[by_file].strip()).resolve()
        if not note_file.is_file():
            error(by_file, f"note file not found: {note_file}")
        else:
            try:
                note = normalize_note(_read_note_file(note_file))
            except ValueError as exc:
                error(by_file, str(exc))
            else:
                if note is None:
                    error(by_file, f"note file {note_file.name} is empty; counted as a missing note", "warning")
    return note


def read_manifest(path: str | Path, cfg: Config, *, check_files: bool = True) -> SiteData:
    """Validate a site manifest against ``cfg`` and return its usable records and problems.

    ``check_files`` opens every image (header-level checks, PHI scan) and note file; switch it off
    only when the same manifest was just validated.
    """
    path = Path(path)
    frame = _read_table(path)
    _check_columns(frame, cfg, path)
    site = _site_name(frame, path)
    base = path.resolve().parent
    data = SiteData(manifest=path, site=site, n_rows=len(frame), modalities=cfg.modality_names)
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
    for index, raw in enumerate(frame.to_dict("records")):
        row = index + 1
        errors: list[Problem] = []

        def error(column, message, severity="error", row=row, errors=errors):
            errors.append(Problem(file, row, column, message, severity))

        patient_id = raw["patient_id"].strip()
        if not patient_id or patient_id.lower() in ("nan", "none", "null"):
            error("patient_id", "patient_id is empty")
        label_text = raw["label"].strip()
        label = labels.get(label_text)
        if label is None:
            error("label", f"label '{label_text}' is not one of the declared labels {cfg.data.labels}"
                  if label_text else "label is empty")

        inputs: dict = {}
        for spec in cfg.modalities:
            if spec.kind in PATH_KINDS:
                inputs[spec.name] = _check_paths(spec, raw, frame.columns, base, check_files, cfg, error)
            elif spec.kind == "text":
                inputs[spec.name] = _read_note(spec, raw, frame.columns, base, error)
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
        labels = sorted({cfg.data.labels[r.label] for r in rows})
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
