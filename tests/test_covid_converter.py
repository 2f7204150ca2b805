"""COVID-19 chest X-ray collection -> site manifests, on a small fake collection built here."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from PIL import Image

from clinfuse.config import NumericColumn, load_config
from clinfuse.data.public import covid_chestxray as cc
from clinfuse.data.public.covid_chestxray import prepare_covid_chestxray
from clinfuse.errors import InputError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "covid-chestxray.yaml"
HEADER = ["patientid", "offset", "sex", "age", "finding", "survival", "temperature", "pO2_saturation",
          "leukocyte_count", "view", "modality", "date", "location", "folder", "filename", "doi",
          "url", "license", "clinical_notes", "other_notes"]
FINDINGS = ["COVID-19", "Pneumonia", "COVID-19, ARDS", "No Finding", "todo"]
# country per row block: 12 Spain, 10 Germany (no notes), 5 Italy, 3 Peru, 2 blank, 1 "?"
LOCATIONS = (["Hospital A, Madrid, Spain"] * 12 + ["Medical School, Hannover, Germany"] * 10
             + ["Hospital B, Milan, Italy"] * 5 + ["Lima, Peru "] * 3 + [""] * 2 + ["?"])
MISSING_IMAGE = "img_007.png"
PRIOR = "prior.png"
N_WRITTEN = len(LOCATIONS) + 1  # the CT row and the prior film are not written


def _write_collection(root: Path, rows: list[dict[str, str]], header=HEADER) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _rows() -> list[dict[str, str]]:
    rows = []
    for i, location in enumerate(LOCATIONS):
        ext = "png" if i % 2 else "jpg"
        germany = "Germany" in location
        rows.append({
            "patientid": str(100 + i // 2),  # two images per patient
            "sex": ["M", "F", "", "m"][i % 4],
            "age": ["54.0", "", "?", "130"][i % 4] if i % 5 else "71",
            "finding": FINDINGS[(i // 2) % len(FINDINGS)],
            "temperature": ["38.1", "?", "", "20"][i % 4],
            "pO2_saturation": ["97", "40", "", "340"][i % 4],
            "leukocyte_count": ["2.85", "?", "", ""][i % 4],
            "modality": "X-ray",
            "location": location,
            "folder": "images",
            "filename": f"img_{i:03d}.{ext}",
            "clinical_notes": "" if germany or i % 6 == 5 else f'Bilateral opacities, "patchy", case {i}.\nDay 2.',
        })
    # one patient imaged before the illness ("No Finding") and during it (COVID-19)
    rows.append({**rows[12], "patientid": "300", "finding": "No Finding", "filename": PRIOR})
    rows.append({**rows[12], "patientid": "300", "finding": "COVID-19", "filename": "ill.png"})
    rows.append({**rows[0], "patientid": "999", "modality": "CT", "filename": "ct.png"})
    return rows


@pytest.fixture()
def collection(tmp_path):
    root = tmp_path / "collection"
    rows = _rows()
    _write_collection(root, rows)
    for r in rows:
        if r["modality"] == "X-ray" and r["filename"] != MISSING_IMAGE:
            mode = "RGB" if r["filename"].endswith("jpg") else "L"
            Image.new(mode, (12, 10), color=(90, 90, 90) if mode == "RGB" else 90).save(
                root / "images" / r["filename"])
    return root, rows


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_sites_and_pooling(collection, tmp_path):
    root, _ = collection
    out = tmp_path / "sites"
    manifests = prepare_covid_chestxray(root, out, min_site_rows=8)
    assert [m.parent.name for m in manifests] == ["spain", "germany", "pooled-small"]
    assert all(m.name == "manifest.csv" and m.parent.parent == out for m in manifests)
    spain, germany, pooled = (_read(m) for m in manifests)
    assert (len(spain), len(germany), len(pooled)) == (12, 11, 11)  # Italy 5 + Peru 3 + unknown 3
    assert {r["site"] for r in pooled} == {"pooled-small"}
    # a lower threshold turns Italy into its own site; blank and "?" locations are "unknown"
    names = [m.parent.name for m in prepare_covid_chestxray(root, tmp_path / "b", min_site_rows=3)]
    assert names == ["spain", "germany", "italy", "peru", "unknown"]


def test_labels_notes_and_tabular(collection, tmp_path):
    root, source = collection
    manifests = prepare_covid_chestxray(root, tmp_path / "out", min_site_rows=8)
    rows = [r for m in manifests for r in _read(m)]
    assert len(rows) == N_WRITTEN
    cfg = load_config(CONFIG)
    by_file = {Path(r["image"]).name: r for r in rows}
    assert PRIOR not in by_file and "ct.png" not in by_file
    assert by_file["ill.png"]["label"] == "COVID-19"
    labels_of: dict[str, set[str]] = {}
    for r in rows:
        labels_of.setdefault(r["patient_id"], set()).add(r["label"])
    assert all(len(v) == 1 for v in labels_of.values())  # one label per patient, as validation wants
    for src in source[:-3]:
        r = by_file[src["filename"]]
        assert r["patient_id"] == src["patientid"]
        assert r["label"] == ("COVID-19" if "COVID-19" in src["finding"] else "other")
        assert r["note"] == src["clinical_notes"].strip()  # commas, quotes, newlines survive
    assert {r["label"] for r in rows} == set(cfg.data.labels)
    germany = _read(manifests[1])
    assert all(r["note"] == "" for r in germany)
    assert sum(r["note"] != "" for r in _read(manifests[0])) >= 10
    # "?" and out-of-range values become missing; the rest is kept, within the declared ranges
    assert {r["sex"] for r in rows} == {"M", "F", ""}
    assert {r["pO2_saturation"] for r in rows} == {"97", ""}
    assert {r["temperature"] for r in rows} == {"38.1", ""}
    assert {r["leukocyte_count"] for r in rows} == {"2.85", ""}
    assert {r["age"] for r in rows} == {"54", "71", ""}
    for col in cfg.data.tabular:
        if isinstance(col, NumericColumn):
            assert cc.TABULAR_RANGES[col.name] == (col.min, col.max)
            assert all(col.min <= float(r[col.name]) <= col.max for r in rows if r[col.name])
    assert tuple(cfg.data.labels) == cc.LABELS


def test_drop_unlabeled(collection, tmp_path):
    root, source = collection
    manifests = prepare_covid_chestxray(root, tmp_path, min_site_rows=8, drop_unlabeled=True)
    n_todo = sum(r["finding"] == "todo" for r in source[:-3])
    assert n_todo > 0
    assert sum(len(_read(m)) for m in manifests) == N_WRITTEN - n_todo


def test_image_paths_are_relative_and_nothing_is_copied(collection, tmp_path):
    root, _ = collection
    out = tmp_path / "elsewhere" / "deeper"
    manifests = prepare_covid_chestxray(root, out, min_site_rows=8)
    missing = []
    for m in manifests:
        for r in _read(m):
            assert r["image"] and not os.path.isabs(r["image"])
            target = (m.parent / r["image"]).resolve()
            assert target.parent == (root / "images").resolve()
            if not target.exists():
                missing.append(target.name)
    assert missing == [MISSING_IMAGE]  # kept: validation reports it
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{m.parent.name}/manifest.csv" for m in manifests)  # no temp files


def test_relative_paths_from_a_relative_root(collection, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifests = prepare_covid_chestxray("collection", "out", min_site_rows=8)
    r = _read(manifests[0])[0]
    assert (tmp_path / "out" / "spain" / r["image"]).resolve().is_file()


def test_missing_metadata(tmp_path):
    with pytest.raises(InputError) as err:
        prepare_covid_chestxray(tmp_path, tmp_path / "out")
    assert err.value.file.endswith("metadata.csv")
    assert not (tmp_path / "out").exists()


def test_missing_column_is_named(tmp_path):
    _write_collection(tmp_path, _rows(), header=[h for h in HEADER if h != "finding"])
    with pytest.raises(InputError) as err:
        prepare_covid_chestxray(tmp_path, tmp_path / "out")
    assert err.value.key == "finding"
    assert "finding" in str(err.value) and "metadata.csv" in str(err.value)


def test_row_without_patient_is_named(tmp_path):
    rows = _rows()
    rows[4]["patientid"] = " "
    _write_collection(tmp_path, rows)
    with pytest.raises(InputError) as err:
        prepare_covid_chestxray(tmp_path, tmp_path / "out")
    assert (err.value.row, err.value.key) == (5, "patientid")


def test_no_xray_rows(tmp_path):
    _write_collection(tmp_path, [r for r in _rows() if r["modality"] == "CT"])
    with pytest.raises(InputError, match="X-ray"):
        prepare_covid_chestxray(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_min_site_rows(collection, tmp_path, bad):
    with pytest.raises(InputError) as err:
        prepare_covid_chestxray(collection[0], tmp_path / "out", min_site_rows=bad)
    assert err.value.key == "min_site_rows"


def test_manifest_permissions_follow_umask(collection, tmp_path):
    old = os.umask(0o022)
    try:
        manifests = prepare_covid_chestxray(collection[0], tmp_path / "out", min_site_rows=8)
    finally:
        os.umask(old)
    assert all(m.stat().st_mode & 0o777 == 0o644 for m in manifests)
