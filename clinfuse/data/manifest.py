"""Site manifest: schema, validation and the patient-level split.

A manifest is a CSV or Parquet file with one row per image/note/EHR record:

``patient_id`` (required), ``label`` (required for training and evaluation, optional when reading
rows to predict; one of ``data.labels``, numbers compared by value), ``image`` (path relative to
the manifest: DICOM, PNG or JPEG), ``note`` (inline text) or ``note_path`` (relative path to a
UTF-8 text file), one column per declared tabular field, optional ``split`` (train/val/test) and
optional ``site``. Empty cells mean the modality or value is absent. Paths must resolve inside the
manifest's folder or a declared data root (:mod:`clinfuse.data.paths`). Every image is decoded as
training will decode it.

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
from collections import Counter, defaultdict
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clinfuse.config import MODALITIES, Config, canonical_value
from clinfuse.data import tabular as tab
from clinfuse.data.paths import data_roots as site_roots
from clinfuse.data.paths import resolve_site_path
from clinfuse.data.text import normalize_note
from clinfuse.errors import InputError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("patient_id", "label")
# Every column a manifest may have besides the study's declared tabular fields.
STANDARD_COLUMNS = ("patient_id", "label", "image", "note", "note_path", "split", "site")
#: Note files above this size are refused: a note is a page of text, not a data dump.
MAX_NOTE_BYTES = 1 << 20


@dataclass(frozen=True)
class Record:
    """One usable manifest row. ``image`` is an absolute path; absent modalities are ``None``."""
    row: int
    patient_id: str
    label: int | None  # None only in rows read for prediction (``require_label=False``)
    image: Path | None
    note: str | None
    tabular: dict[str, float | str | None]
    split: str
    site: str

    @property
    def has_tabular(self) -> bool:
        return any(v is not None for v in self.tabular.values())

    @property
    def mask(self) -> tuple[bool, bool, bool]:
        """Modality availability in ``MODALITIES`` order (image, text, tabular)."""
        return (self.image is not None, self.note is not None, self.has_tabular)


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
    columns: list[str] = field(default_factory=list)

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
        availability = {m: sum(r.mask[i] for r in self.records) for i, m in enumerate(MODALITIES)}
        return {
            "manifest": str(self.manifest),
            "site": self.site,
            "rows": self.n_rows,
            "usable_rows": len(self.records),
            "skipped_rows": len(self.skipped_rows),
            "patients": len(self.patients),
            "labels": {name: sum(r.label == i for r in self.records) for i, name in enumerate(labels)},
            "availability": availability,
            "patterns": dict(Counter(pattern_name(r.mask) for r in self.records).most_common()),
            "splits": {s: sum(r.split == s for r in self.records) for s in SPLITS},
            "errors": sum(p.severity == "error" for p in self.problems),
            "warnings": sum(p.severity == "warning" for p in self.problems),
        }


def _reason(message: str) -> str:
    """The kind of a problem message: its first words, after a leading file name ("img3.dcm: ")."""
    head, sep, rest = message.partition(": ")
    if sep and " " not in head:
        message = rest
    return " ".join(message.split()[:3])


def pattern_name(mask) -> str:
    """Human name of a modality pattern, e.g. ``image+text`` or ``image only`` or ``none``."""
    present = [m for m, has in zip(MODALITIES, mask) if has]
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
            # Bytes that are not UTF-8 are kept (marked) so that only their row fails.
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig",
                               encoding_errors=_MARK_BYTES)
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
    for column in cfg.data.tabular:
        if column.name not in frame.columns:
            raise InputError(
                f"declared tabular column '{column.name}' is missing; add it (empty cells are allowed) "
                "or remove it from data.tabular in the config", file=path, key=column.name)
    if "note" in frame.columns and "note_path" in frame.columns:
        raise InputError("give notes either inline ('note') or as files ('note_path'), not both",
                         file=path, key="note_path")


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


def _image_findings(image: Path, cfg: Config, memo: MutableMapping[str, dict] | None) -> dict:
    """``{"error": message or None, "phi": [...]}`` for one image: decoded as training decodes it
    (:func:`~clinfuse.data.images.read_pixels` with the study's frame and VOI settings, the loader
    of the training transform), then scanned for identifying data.

    ``memo`` (a mapping the caller keeps, e.g. in the site's state dir) holds the findings of files
    that decoded, keyed by path, size, modification time, image settings and the version of the
    checks: such a file is not opened again and keeps its identifying-data verdict. A file that
    failed is checked again every time (a decoder installed since may read it; it stays refused
    otherwise).
    """
    from clinfuse.data.images import CHECKS_VERSION, phi_fields, read_pixels  # pydicom is slow to import

    key = None
    if memo is not None:
        try:
            stat = image.stat()
            key = json.dumps([str(image), stat.st_size, stat.st_mtime_ns, cfg.data.image.model_dump(mode="json"),
                              CHECKS_VERSION])
        except OSError:
            key = None
        if key in memo:
            memo[key] = memo[key]  # written back: a ChainMap memo keeps only what is still used
            return memo[key]
    try:
        read_pixels(image, frame=cfg.data.image.frame, apply_voi_lut=cfg.data.image.apply_voi_lut)
        findings = {"error": None, "phi": phi_fields(image)}
    except InputError as exc:
        findings = {"error": exc.message, "phi": []}
    if key is not None and findings["error"] is None:
        memo[key] = findings
    return findings


def read_manifest(path: str | Path, cfg: Config, *, check_files: bool = True,
                  data_roots: Iterable[str | os.PathLike[str]] = (),
                  file_checks: MutableMapping[str, dict] | None = None,
                  require_label: bool = True, progress: bool = True) -> SiteData:
    """Validate a site manifest against ``cfg`` and return its usable records and problems.

    ``check_files`` decodes every image as training will (and scans it for identifying data);
    switch it off only where no image is opened. ``data_roots`` are folders of this site, besides
    the manifest's own and ``data.roots``, that its paths may point into. ``file_checks`` is a
    memo of image findings (see :func:`_image_findings`) that the caller keeps between runs.
    ``require_label=False`` reads rows to predict: the ``label`` column may be absent or empty
    (records get ``label=None``); a label that is not a declared class is a warning, not an error,
    since prediction never reads it. A long read prints ``progress`` lines
    (:class:`clinfuse.progress.Progress`).
    """
    from clinfuse.progress import Progress

    path = Path(path)
    frame = _read_table(path)
    undecodable = _escape_undecodable(frame)
    _check_columns(frame, cfg, path, require_label)
    site = _site_name(frame, path)
    roots = site_roots(path, cfg.data.roots, data_roots)
    data = SiteData(manifest=path, site=site, n_rows=len(frame), columns=[str(c) for c in frame.columns])
    file = str(path)
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

        image = None
        if "image" in frame.columns and raw["image"].strip():
            try:
                image = resolve_site_path(raw["image"], roots)
            except ValueError as exc:
                error("image", f"image path {exc}")
            else:
                missing = _not_a_regular_file(image, "image file")
                if missing:
                    error("image", missing)
                elif check_files:
                    findings = _image_findings(image, cfg, file_checks)
                    if findings["error"]:
                        error("image", f"{image.name}: {findings['error']}")
                    elif findings["phi"]:
                        error("image", f"identifying data in {image.name} (DICOM PS3.15 Annex E): "
                              f"{', '.join(findings['phi'])}",
                              "error" if cfg.data.require_deidentified else "warning")

        note = None
        if "note" in frame.columns:
            note = normalize_note(raw["note"])
            if raw["note"] and note is None:
                error("note", "note is empty; counted as a missing note", "warning")
        elif "note_path" in frame.columns and raw["note_path"].strip():
            try:
                note_file = resolve_site_path(raw["note_path"], roots)
            except ValueError as exc:
                error("note_path", f"note path {exc}")
            else:
                try:
                    note = normalize_note(_read_note_file(note_file))
                except ValueError as exc:
                    error("note_path", str(exc))
                else:
                    if note is None:
                        error("note_path", f"note file {note_file.name} is empty; counted as a missing note",
                              "warning")

        values = {}
        for column in cfg.data.tabular:
            try:
                values[column.name] = tab.parse_value(column, raw[column.name])
            except ValueError as exc:
                error(column.name, str(exc))

        split = raw.get("split", "").strip() if has_split else ""
        if has_split and split not in SPLITS:
            error("split", f"split '{split}' must be one of {list(SPLITS)}")

        if all(p.severity == "warning" for p in errors) and image is None and note is None \
                and not any(v is not None for v in values.values()):
            error(None, "row has no image, no note and no tabular value")

        key = tuple(sorted((k, v) for k, v in raw.items()))
        if key in seen:
            error(None, f"duplicate of row {seen[key]}")
        else:
            seen[key] = row

        data.problems.extend(errors)
        if any(p.severity == "error" for p in errors):
            continue
        candidates.append(Record(row=row, patient_id=patient_id, label=label, image=image, note=note,
                                 tabular=values, split=split or patient_split(patient_id, cfg), site=site))

    data.records = _drop_inconsistent_patients(candidates, data, file, cfg)
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
