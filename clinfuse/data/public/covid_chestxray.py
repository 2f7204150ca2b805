"""Convert the COVID-19 image data collection (chest X-ray subset) into clinfuse site manifests.

Input: ``root/metadata.csv`` (the collection's metadata) and ``root/images/<filename>``.
Output: one folder per site, ``out/<site>/manifest.csv``, to use with ``configs/covid-chestxray.yaml``.

- Only rows whose ``modality`` is ``X-ray`` are kept.
- Site = country, the last comma-separated part of ``location`` (blank or ``?`` -> ``unknown``).
  Countries with fewer than ``min_site_rows`` X-ray rows are pooled into ``pooled-small``. Folder
  names are lower-case slugs (``United Kingdom`` -> ``united-kingdom``), also written to the
  ``site`` column.
- ``label``: ``COVID-19`` when ``finding`` contains ``COVID-19``, else ``other``. The collection
  marks unlabelled rows ``todo``; they become ``other`` unless ``drop_unlabeled=True``.
- ``note``: ``clinical_notes``, inline (blank -> no note).
- Tabular: ``age``, ``sex`` (F/M), ``temperature``, ``pO2_saturation``, ``leukocyte_count``.
  Values that are not numbers (the source uses ``?``) or lie outside the ranges declared in the
  config (:data:`TABULAR_RANGES`; e.g. pO2 entries of 20-40 that are partial pressures, not
  saturations) are written empty, i.e. missing, rather than clipped into a wrong value.
- ``image``: the path of ``root/images/<filename>`` relative to the manifest's folder. Images are
  never copied, so they lie outside the site folders: give ``root/images`` as a data root
  (``--data-root`` or ``data.roots``, see :mod:`clinfuse.data.paths`) when reading the manifests.
  Rows whose image is missing on disk are kept; validation reports them.
- ``patient_id`` is ``patientid``; a patient can have several rows (images). The collection labels
  each image, and a few patients have ``No Finding`` films taken weeks before their COVID-19 films.
  clinfuse labels patients, not images (validation rejects a patient with two labels), so for a
  patient whose rows disagree only the ``COVID-19`` rows are kept: the diagnosis the patient had,
  shown by the films of the illness. In the 2020-06 snapshot this drops 5 rows (4 patients).

Each manifest is written atomically (:mod:`clinfuse.fileio`). The collection is a
benchmark of real formats, notes and site heterogeneity, not a clinical validation set.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter
from pathlib import Path

from clinfuse.errors import InputError
from clinfuse.fileio import atomic_write_text

LABELS = ("other", "COVID-19")
POOLED_SITE = "pooled-small"
UNKNOWN_SITE = "unknown"
# column name in metadata.csv -> declared (min, max); must match configs/covid-chestxray.yaml
TABULAR_RANGES = {
    "age": (0.0, 100.0),
    "temperature": (34.0, 43.0),
    "pO2_saturation": (50.0, 100.0),
    "leukocyte_count": (0.0, 50.0),
}
SEXES = ("F", "M")
REQUIRED_COLUMNS = ("patientid", "finding", "modality", "location", "filename", "clinical_notes",
                    "age", "sex", "temperature", "pO2_saturation", "leukocyte_count")
MANIFEST_COLUMNS = ("patient_id", "label", "image", "note", "age", "sex", "temperature",
                    "pO2_saturation", "leukocyte_count", "site")
_UNLABELED = {"", "todo"}


def _country(location: str) -> str:
    country = location.split(",")[-1].strip()
    return country if country and country != "?" else UNKNOWN_SITE


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or UNKNOWN_SITE


def _number(text: str, lo: float, hi: float) -> str:
    try:
        value = float(text)
    except ValueError:
        return ""
    if not math.isfinite(value) or not lo <= value <= hi:
        return ""
    return f"{value:g}"


def _read_metadata(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError("metadata.csv not found: expected the collection's metadata file here",
                         file=path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(f"required column{'s' if len(missing) > 1 else ''} missing: "
                                 f"{', '.join(missing)}", file=path, key=missing[0])
            rows = []
            for row in reader:
                if None in row:  # more cells than the header has names
                    raise InputError("row has more cells than the header", file=path,
                                     row=reader.line_num - 1)
                rows.append({k: (v or "") for k, v in row.items()})
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path) from None
    except csv.Error as exc:
        raise InputError(f"not a valid CSV file: {exc}", file=path) from None
    return rows


def prepare_covid_chestxray(root: str | Path, out: str | Path, *, min_site_rows: int = 15,
                            drop_unlabeled: bool = False) -> list[Path]:
    """Write one site manifest per country from the collection at ``root``; return their paths.

    Parameters
    ----------
    root:
        Folder holding ``metadata.csv`` and ``images/``. It is only read.
    out:
        Output folder (created if needed); manifests go to ``out/<site>/manifest.csv``. Other
        files there are left alone, so reuse of ``out`` with another ``min_site_rows`` can leave
        stale site folders behind.
    min_site_rows:
        Countries with fewer written rows than this are pooled into the site ``pooled-small``.
    drop_unlabeled:
        Drop rows whose ``finding`` is blank or ``todo`` instead of labelling them ``other``.
        Either way, a patient with both labels keeps only the ``COVID-19`` rows.

    Returns
    -------
    list[Path]
        Manifest paths, largest site first (ties by name), ``pooled-small`` last.

    Raises
    ------
    InputError
        ``metadata.csv`` missing or unreadable, a required column missing, a row without a
        ``patientid``, no X-ray rows, or a bad ``min_site_rows``.
    """
    if isinstance(min_site_rows, bool) or not isinstance(min_site_rows, int) or min_site_rows < 1:
        raise InputError(f"must be an integer >= 1, got {min_site_rows!r}", key="min_site_rows")
    root = Path(os.path.abspath(root))
    out = Path(os.path.abspath(out))
    meta_path = root / "metadata.csv"
    rows = _read_metadata(meta_path)

    xray = []
    for number, row in enumerate(rows, start=1):
        if row["modality"].strip() != "X-ray":
            continue
        finding = row["finding"].strip()
        if drop_unlabeled and finding.lower() in _UNLABELED:
            continue
        if not row["patientid"].strip():
            raise InputError("patientid is empty: every row needs its patient", file=meta_path,
                             row=number, key="patientid")
        xray.append({**row, "label": LABELS[1] if "COVID-19" in row["finding"] else LABELS[0]})
    if not xray:
        raise InputError("no X-ray rows (column 'modality' equal to 'X-ray')", file=meta_path,
                         key="modality")
    labels_of: dict[str, set[str]] = {}
    for row in xray:
        labels_of.setdefault(row["patientid"].strip(), set()).add(row["label"])
    kept = [r for r in xray if len(labels_of[r["patientid"].strip()]) == 1 or r["label"] == LABELS[1]]

    countries = Counter(_country(r["location"]) for r in kept)
    site_of = {c: (_slug(c) if n >= min_site_rows else POOLED_SITE) for c, n in countries.items()}
    by_site: dict[str, list[dict[str, str]]] = {}
    for row in kept:
        site = site_of[_country(row["location"])]
        site_dir = out / site
        filename = row["filename"].strip()
        image = ""
        if filename:
            image = Path(os.path.relpath(root / "images" / filename, site_dir)).as_posix()
        sex = row["sex"].strip().upper()
        record = {
            "patient_id": row["patientid"].strip(),
            "label": row["label"],
            "image": image,
            "note": row["clinical_notes"].strip(),
            "sex": sex if sex in SEXES else "",
            "site": site,
        }
        for column, (lo, hi) in TABULAR_RANGES.items():
            record[column] = _number(row[column].strip(), lo, hi)
        by_site.setdefault(site, []).append(record)

    order = sorted(by_site, key=lambda s: (s == POOLED_SITE, -len(by_site[s]), s))
    manifests = []
    for site in order:
        site_dir = out / site
        site_dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(by_site[site])
        manifest = site_dir / "manifest.csv"
        atomic_write_text(manifest, buf.getvalue())
        manifests.append(manifest)
    return manifests
