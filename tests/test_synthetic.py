"""The embedded demo cohort: real de-identified DICOM, notes, tabular data, deterministic by seed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from clinfuse.config import CategoricalColumn, NumericColumn, load_config
from clinfuse.data import synthetic
from clinfuse.data.synthetic import write_demo_cohort
from clinfuse.errors import InputError

SITES, PATIENTS, SEED = 3, 30, 3
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs",
                "OtherPatientNames", "PatientTelephoneNumbers", "ReferringPhysicianName",
                "InstitutionName", "InstitutionAddress", "AccessionNumber", "StudyDate",
                "PerformingPhysicianName", "OperatorsName")


def _read(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    manifests = write_demo_cohort(out, sites=SITES, patients=PATIENTS, seed=SEED)
    return out, manifests


@pytest.fixture(scope="module")
def rows(cohort):
    return [_read(m) for m in cohort[1]]


def test_layout_and_columns(cohort, rows):
    out, manifests = cohort
    assert manifests == [out / f"site-{k}" / "manifest.csv" for k in range(SITES)]
    cfg = load_config()  # configs/demo.yaml
    expected = ["patient_id", "label", "image", "note_path"] + [c.name for c in cfg.data.tabular]
    for m in manifests:
        with open(m, newline="") as fh:
            assert next(csv.reader(fh)) == expected
    for k, site_rows in enumerate(rows):
        assert len({r["patient_id"] for r in site_rows}) == PATIENTS
        assert all(r["patient_id"].startswith(f"site{k}-") for r in site_rows)


def test_same_seed_gives_identical_files_and_other_seed_differs(cohort, tmp_path):
    out, _ = cohort
    write_demo_cohort(tmp_path / "again", sites=SITES, patients=PATIENTS, seed=SEED)
    assert _files(tmp_path / "again") == _files(out)
    other = write_demo_cohort(tmp_path / "other", sites=1, patients=PATIENTS, seed=SEED + 1)
    assert other[0].read_bytes() != (out / "site-0" / "manifest.csv").read_bytes()


def test_files_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        manifest = write_demo_cohort(tmp_path, sites=1, patients=3)[0]
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert manifest in files and len(files) > 3
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in files)


def test_smaller_cohort_is_a_prefix(cohort, rows, tmp_path):
    small = write_demo_cohort(tmp_path, sites=1, patients=10, seed=SEED)
    small_rows = _read(small[0])
    ids = {r["patient_id"] for r in small_rows}
    assert small_rows == [r for r in rows[0] if r["patient_id"] in ids]
    assert len(ids) == 10


def test_images_are_deidentified_dicom(cohort, rows):
    out, _ = cohort
    sop_uids = set()
    n = 0
    for k, site_rows in enumerate(rows):
        for r in site_rows:
            if not r["image"]:
                continue
            path = out / f"site-{k}" / r["image"]
            raw = path.read_bytes()
            assert raw[128:132] == b"DICM"
            ds = pydicom.dcmread(path)  # no force=True: a conformant Part 10 file
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            arr = ds.pixel_array
            assert arr.shape == (256, 256) and arr.dtype == np.uint16
            assert float(ds.RescaleSlope) > 0 and "RescaleIntercept" in ds
            assert arr.std() > 0
            for keyword in PHI_KEYWORDS:
                assert not str(ds.get(keyword, "") or ""), (path, keyword)
            assert ds.PatientIdentityRemoved == "YES"
            for elem in ds.iterall():
                if elem.VR == "PN":
                    assert not str(elem.value or "")
                if elem.VR in ("LO", "SH", "LT", "ST", "UT", "PN"):
                    assert r["patient_id"] not in str(elem.value)
            sop_uids.add(str(ds.SOPInstanceUID))
            n += 1
    assert n > 0 and len(sop_uids) == n


def test_last_site_has_no_notes_and_others_do(cohort, rows):
    out, _ = cohort
    assert all(r["note_path"] == "" for r in rows[-1])
    for k, site_rows in enumerate(rows[:-1]):
        with_note = [r for r in site_rows if r["note_path"]]
        assert len(with_note) > PATIENTS // 2
        for r in with_note:
            assert r["note_path"] == f"notes/{r['patient_id']}.txt"
            text = (out / f"site-{k}" / r["note_path"]).read_text(encoding="utf-8")
            assert len(text.split()) >= 5


def test_site_wording_differs(cohort, rows):
    out, _ = cohort
    vocab = []
    for k in (0, 1):
        words = set()
        for r in rows[k]:
            if r["note_path"]:
                words |= set((out / f"site-{k}" / r["note_path"]).read_text().lower().split())
        vocab.append(words)
    assert vocab[0] - vocab[1] and vocab[1] - vocab[0]


def test_missingness_and_repeat_images(rows):
    tab_names = ("age", "temperature", "spo2", "wbc")
    assert sum(r[c] == "" for site_rows in rows for r in site_rows for c in tab_names) > 0
    for k, site_rows in enumerate(rows):
        per_patient: dict[str, list[dict]] = {}
        for r in site_rows:
            per_patient.setdefault(r["patient_id"], []).append(r)
        no_image = sum(all(r["image"] == "" for r in rs) for rs in per_patient.values())
        assert 0 < no_image < PATIENTS // 2
        if k < SITES - 1:
            no_note = sum(rs[0]["note_path"] == "" for rs in per_patient.values())
            assert 0 < no_note < PATIENTS // 2
        repeated = [rs for rs in per_patient.values() if len(rs) > 1]
        assert len(repeated) < PATIENTS // 4
        for rs in repeated:
            assert len({r["label"] for r in rs}) == 1 and all(r["image"] for r in rs)
    assert any(len(site_rows) > PATIENTS for site_rows in rows)  # some patient has two images


def test_labels_and_tabular_within_config(rows):
    cfg = load_config()
    labels = set(cfg.data.labels)
    seen = set()
    for site_rows in rows:
        for r in site_rows:
            assert r["label"] in labels
            seen.add(r["label"])
            for col in cfg.data.tabular:
                value = r[col.name]
                if value == "":
                    continue
                if isinstance(col, NumericColumn):
                    assert col.min <= float(value) <= col.max, (col.name, value)
                else:
                    assert isinstance(col, CategoricalColumn) and value in col.categories
    assert seen == labels
    assert tuple(cfg.data.labels) == synthetic.LABELS


def _lung_mean(path: Path) -> float:
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    z = (a - a.mean()) / a.std()
    lin = (np.arange(256) + 0.5) / 256 * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    lungs = ((np.abs(x) - 0.40) / 0.24) ** 2 + ((y + 0.05) / 0.52) ** 2 < 1
    return float(z[lungs].mean())


def test_image_carries_the_signal(cohort, rows):
    out, _ = cohort
    by_label: dict[str, list[float]] = {"negative": [], "positive": []}
    for k, site_rows in enumerate(rows):
        for r in site_rows:
            if r["image"]:
                by_label[r["label"]].append(_lung_mean(out / f"site-{k}" / r["image"]))
    # opacities brighten the lung fields of positive patients
    assert np.mean(by_label["positive"]) > np.mean(by_label["negative"]) + 0.05


def _grade(text: str) -> int:
    impression = text.strip().splitlines()[-1].split(":", 1)[1].strip().rstrip(".")
    return next(g for g, options in enumerate(synthetic._IMPRESSIONS) if impression in options)


def _text_agreement(out: Path, site_rows: list[dict]) -> float:
    hits = [(_grade((out / r["note_path"]).read_text()) >= 3) == (r["label"] == "positive")
            for r in site_rows if r["note_path"]]
    return float(np.mean(hits))


def test_text_dominant_variant(cohort, rows, tmp_path):
    _, manifests = cohort
    dom = write_demo_cohort(tmp_path, sites=2, patients=PATIENTS, seed=SEED, variant="text_dominant")
    assert dom[0].read_bytes() != manifests[0].read_bytes()
    dom_rows = _read(dom[0])
    agree_dom = _text_agreement(dom[0].parent, dom_rows)
    agree_default = _text_agreement(manifests[0].parent, rows[0])
    assert agree_dom >= 0.95
    assert agree_default < agree_dom - 0.05
    assert all(r["note_path"] == "" for r in _read(dom[1]))  # same missingness design


@pytest.mark.parametrize("kwargs, key", [
    ({"variant": "image_dominant"}, "variant"),
    ({"sites": 0}, "sites"),
    ({"patients": 0}, "patients"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, key):
    with pytest.raises(InputError) as err:
        write_demo_cohort(tmp_path, **kwargs)
    assert err.value.key == key
    assert not any(tmp_path.iterdir())


def test_ensure_demo_cohort_writes_once_and_again_when_incomplete_or_different(tmp_path):
    import json

    from clinfuse.data.manifest import read_manifest
    from clinfuse.data.synthetic import COHORT_MARKER, ensure_demo_cohort

    lines = []
    first = ensure_demo_cohort(tmp_path, sites=2, patients=3, log=lines.append)
    assert len(lines) == 1 and all(m.is_file() for m in first)
    stamp = {m: m.stat().st_mtime_ns for m in first}
    assert ensure_demo_cohort(tmp_path, sites=2, patients=3, log=lines.append) == first
    assert len(lines) == 1 and {m: m.stat().st_mtime_ns for m in first} == stamp  # nothing rewritten
    first[1].unlink()  # an incomplete cohort is written again
    ensure_demo_cohort(tmp_path, sites=2, patients=3, log=lines.append)
    assert len(lines) == 2 and first[1].is_file()
    (tmp_path / COHORT_MARKER).write_text("{")  # a cut-short marker too
    ensure_demo_cohort(tmp_path, sites=2, patients=3, log=lines.append)
    assert len(lines) == 3
    ensure_demo_cohort(tmp_path, sites=2, patients=4, log=lines.append)  # another size
    assert len(lines) == 4 and json.loads((tmp_path / COHORT_MARKER).read_text())["patients"] == 4
    assert len(read_manifest(first[0], load_config()).patients) == 4
    # A complete cohort that clinfuse did not mark (clinfuse synth, a user's) is used as it is.
    (mine,) = write_demo_cohort(tmp_path / "mine", sites=1, patients=3)
    assert ensure_demo_cohort(tmp_path / "mine", sites=1, patients=50, log=lines.append) == [mine]
    assert len(lines) == 4 and len(read_manifest(mine, load_config()).patients) == 3
