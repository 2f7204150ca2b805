"""Bad files (issue 11, items 11-17): one bad file is one bad row everywhere, never a crash or a leak.

Each test names the item it covers. The CLI-wide table of malformed inputs is in
``tests/test_cli_malformed.py``; the property-based test in ``tests/test_fuzz_inputs.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydicom.data import get_testdata_file

from clinfuse.cli import main
from clinfuse.config import config_from_dict, load_config
from clinfuse.data.manifest import read_manifest
from clinfuse.errors import InputError
from tests.conftest import HEADER, good_rows, write_dicom, write_manifest


def row_errors(data, row):
    return [p for p in data.problems if p.row == row and p.severity == "error"]


def assert_row_refused(data, row, column, *texts):
    errors = row_errors(data, row)
    assert errors, f"row {row} was accepted: {data.problems}"
    assert any(p.column == column for p in errors), errors
    for text in texts:
        assert any(text in p.message for p in errors), (text, errors)
    assert row not in {r.row for r in data.records}


def config_file(folder: Path, cfg, **data_updates) -> Path:
    raw = cfg.model_dump(mode="json")
    raw["data"].update(data_updates)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def new_site(tmp_path: Path, name: str = "site-a") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def copy_testfile(name: str, dest: Path) -> Path:
    shutil.copy(get_testdata_file(name), dest)
    return dest


# ---- item 12: paths stay inside the site ------------------------------------------------------

NOTE_HEADER = [h for h in HEADER if h != "note"] + ["note_path"]


def note_rows(folder: Path, n: int = 6) -> list[dict]:
    (folder / "notes").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, r in enumerate(good_rows(folder, n)):
        (folder / "notes" / f"{i}.txt").write_text(f"fever day {i}")
        rows.append(dict(r, note_path=f"notes/{i}.txt"))
    return rows


def test_item12_note_and_image_paths_outside_the_site_are_refused(tmp_path, small_cfg):
    site = tmp_path / "hospital" / "site-a"
    other = tmp_path / "hospital" / "site-b"
    other.mkdir(parents=True)
    outside_note = tmp_path / "secret.txt"
    outside_note.write_text("root:x:0:0:root:/root:/bin/bash")
    foreign = write_dicom(other / "their.dcm", np.ones((16, 16)))
    rows = note_rows(site, 6)
    rows[0]["note_path"] = "../../../../../../../../etc/passwd"
    rows[1]["note_path"] = str(outside_note)  # absolute, outside
    (site / "notes" / "link.txt").symlink_to(outside_note)
    rows[2]["note_path"] = "notes/link.txt"  # a symlink inside that points outside
    (site / "theirs.dcm").symlink_to(foreign)
    rows[3]["image"] = "theirs.dcm"  # a symlink to another site's DICOM
    rows[4]["note_path"] = str(site / "notes" / "4.txt")  # absolute, but inside: fine
    data = read_manifest(write_manifest(site, rows, header=NOTE_HEADER), small_cfg)
    for row, column in ((1, "note_path"), (2, "note_path"), (3, "note_path"), (4, "image")):
        assert_row_refused(data, row, column, "outside")
    assert not any("root:x" in (r.note or "") for r in data.records)
    assert {5, 6} <= {r.row for r in data.records}


def test_item12_declared_data_roots_admit_a_shared_store(tmp_path, small_cfg, capsys):
    site = tmp_path / "hospital" / "site-a"
    store = tmp_path / "pacs"
    store.mkdir()
    site.mkdir(parents=True)
    rows = good_rows(site, 4)
    write_dicom(store / "shared.dcm", np.ones((16, 16)))
    rows[0]["image"] = str(store / "shared.dcm")
    manifest = write_manifest(site, rows)
    refused = read_manifest(manifest, small_cfg)
    assert_row_refused(refused, 1, "image", "outside")
    # a config key (relative roots are taken from the manifest's folder) ...
    cfg = config_from_dict({**small_cfg.model_dump(mode="json"),
                            "data": {**small_cfg.model_dump(mode="json")["data"], "roots": ["../../pacs"]}})
    assert 1 in {r.row for r in read_manifest(manifest, cfg).records}
    # ... or the command line
    assert 1 in {r.row for r in read_manifest(manifest, small_cfg, data_roots=[store]).records}
    config = config_file(tmp_path, small_cfg)
    assert main(["validate", str(manifest), "--config", str(config), "--strict", "--data-root", str(store)]) in (0, 2)
    out = capsys.readouterr().out
    assert "outside" not in out


def test_item12_strict_validate_refuses_passwd(tmp_path, small_cfg, capsys):
    site = tmp_path / "site-a"
    rows = note_rows(site, 4)
    rows[0]["note_path"] = "../../../../../../../../etc/passwd"
    manifest = write_manifest(site, rows, header=NOTE_HEADER)
    code = main(["validate", str(manifest), "--config", str(config_file(tmp_path, small_cfg)), "--strict"])
    captured = capsys.readouterr()
    assert code == 2
    assert "row 1" in captured.out and "outside" in captured.out


# ---- item 13: a bad header value is one bad row -----------------------------------------------

def bad_frames_image(dest: Path) -> Path:
    """pydicom's badVR.dcm (an RT dose grid with NumberOfFrames '1A') made an image object."""
    from pydicom import dcmread
    from pydicom.uid import CTImageStorage

    ds = dcmread(get_testdata_file("badVR.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.save_as(dest)
    return dest


def test_item13_bad_number_of_frames_is_one_bad_row(tmp_path, small_cfg, capsys):
    site = new_site(tmp_path)
    rows = good_rows(site, 8)
    copy_testfile("badVR.dcm", site / "badvr.dcm")
    bad_frames_image(site / "badframes.dcm")
    rows[1]["image"], rows[2]["image"] = "badvr.dcm", "badframes.dcm"
    manifest = write_manifest(site, rows)
    data = read_manifest(manifest, small_cfg)
    assert_row_refused(data, 2, "image", "RT Dose")
    assert_row_refused(data, 3, "image", "NumberOfFrames", "'1A'")
    assert len(data.records) == 6
    config = config_file(tmp_path, small_cfg)
    assert main(["validate", str(manifest), "--config", str(config)]) == 0
    code = main(["site", "check", "--manifest", str(manifest), "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "Traceback" not in captured.err and "UserWarning" not in captured.err


# ---- item 14: validate checks what train will do; train reports what it skips -------------------

@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"])
def test_item14_validate_refuses_files_training_cannot_decode(tmp_path, small_cfg, name):
    site = new_site(tmp_path)
    rows = good_rows(site, 4)
    copy_testfile(name, site / "bad.dcm")
    rows[0]["image"] = "bad.dcm"
    data = read_manifest(write_manifest(site, rows), small_cfg)
    assert_row_refused(data, 1, "image", "decode")


def tiny_train_config(folder: Path, *, require_deidentified: bool) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "study": "tiny",
        "data": {"labels": ["negative", "positive"], "image": {"size": [16, 16]},
                 "require_deidentified": require_deidentified,
                 "tabular": [{"name": "age", "type": "numeric", "min": 0, "max": 120}]},
        "model": {"dim": 16, "image_encoder": {"channels": [4, 8]}},
        "train": {"epochs": 1, "batch_size": 8, "num_threads": 1},
    }))
    return path


def test_item14_train_reports_skipped_rows_with_counts_and_reasons(tmp_path, capsys):
    site = new_site(tmp_path)
    rows = good_rows(site, 16)
    write_dicom(site / "phi0.dcm", np.ones((16, 16)) * 7, PatientName="Doe^Jane")
    write_dicom(site / "phi1.dcm", np.ones((16, 16)) * 9, PatientName="Roe^Richard")
    copy_testfile("JPEG2000-embedded-sequence-delimiter.dcm", site / "j2k.dcm")
    bad_frames_image(site / "badvr.dcm")
    for row, image in ((0, "phi0.dcm"), (2, "phi1.dcm"), (4, "j2k.dcm"), (6, "badvr.dcm")):
        rows[row]["image"] = image
    manifest = write_manifest(site, rows)
    code = main(["train", "--config", str(tiny_train_config(tmp_path, require_deidentified=True)),
                 "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--no-dp", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # the skipped-row report is on stderr: stdout stays the table (or the JSON under --json)
    assert "4 of 16 rows skipped" in captured.err, captured.err
    assert "identifying" in captured.err and "decode" in captured.err and "NumberOfFrames" in captured.err
    for noise in ("Traceback", "UserWarning", "pydicom"):
        assert noise not in captured.err, captured.err


def test_item14_site_runtime_skips_the_same_rows_every_round(tmp_path, small_cfg):
    """The runtime re-reads its manifest in every ClientApp process (the second time without
    re-opening images): a bad file must stay one skipped row, with the same patient count."""
    from clinfuse.federation.site_runtime import SiteRuntime

    site = new_site(tmp_path)
    rows = good_rows(site, 12)
    copy_testfile("badVR.dcm", site / "badvr.dcm")
    copy_testfile("JPEG-lossy.dcm", site / "jpeg12.dcm")
    rows[0]["image"], rows[5]["image"] = "badvr.dcm", "jpeg12.dcm"
    for r in rows:
        r["split"] = "train"
    manifest = write_manifest(site, rows, header=HEADER + ["split"])
    counts = []
    for _ in range(2):
        runtime = SiteRuntime(small_cfg, manifest, site_id="site-a", state_dir=tmp_path / "state",
                              max_epsilon=8.0)
        runtime.train_set.warm(progress=False)
        counts.append((runtime.n_patients, sorted(r.row for r in runtime.train_set.records)))
    assert counts[0] == counts[1]
    assert 1 not in counts[0][1] and 6 not in counts[0][1] and counts[0][0] == 10


def test_item14_file_check_memo_skips_unchanged_files_that_decoded(tmp_path, demo_cfg, monkeypatch):
    from clinfuse.data import images

    site = new_site(tmp_path)
    rows = good_rows(site, 6)
    write_dicom(site / "phi.dcm", np.ones((16, 16)), PatientName="Doe^Jane")
    copy_testfile("JPEG2000-embedded-sequence-delimiter.dcm", site / "j2k.dcm")
    rows[0]["image"], rows[1]["image"] = "phi.dcm", "j2k.dcm"
    manifest = write_manifest(site, rows)
    memo: dict = {}
    first = read_manifest(manifest, demo_cfg, file_checks=memo)
    decoded = []
    real = images.read_pixels
    monkeypatch.setattr(images, "read_pixels", lambda path, **kw: decoded.append(Path(path).name) or real(path, **kw))
    again = read_manifest(manifest, demo_cfg, file_checks=memo)
    assert decoded == ["j2k.dcm"]  # only the file that failed is tried again
    assert [r.row for r in again.records] == [r.row for r in first.records]
    assert_row_refused(again, 1, "image", "PatientName")  # the stored verdict still refuses it
    assert_row_refused(again, 2, "image", "decode")
    (site / "phi.dcm").write_bytes((site / "phi.dcm").read_bytes())  # touched: checked afresh
    decoded.clear()
    read_manifest(manifest, demo_cfg, file_checks=memo)
    assert sorted(decoded) == ["j2k.dcm", "phi.dcm"]


# ---- item 15: what is and is not an image --------------------------------------------------------

def test_item15_extensionless_dicom_is_read(tmp_path, small_cfg):
    site = new_site(tmp_path)
    rows = good_rows(site, 4)
    write_dicom(site / "IM0001", np.arange(256).reshape(16, 16))
    rows[0]["image"] = "IM0001"
    data = read_manifest(write_manifest(site, rows), small_cfg)
    assert 1 in {r.row for r in data.records}, data.problems


def test_item15_non_image_objects_are_named_by_sop_class(tmp_path, small_cfg):
    site = new_site(tmp_path)
    rows = good_rows(site, 6)
    rtstruct = copy_testfile("rtstruct.dcm", site / "rtstruct.dcm")
    assert rtstruct.read_bytes()[128:132] != b"DICM"  # pydicom's RTSTRUCT has no preamble
    copy_testfile("rtdose.dcm", site / "rtdose.dcm")
    write_segmentation(site / "seg.dcm")
    rows[0]["image"], rows[1]["image"], rows[2]["image"] = "rtstruct.dcm", "rtdose.dcm", "seg.dcm"
    data = read_manifest(write_manifest(site, rows), small_cfg)
    assert_row_refused(data, 1, "image", "not an image object", "RT Structure Set Storage")
    assert_row_refused(data, 2, "image", "not an image object", "RT Dose Storage")
    assert_row_refused(data, 3, "image", "not an image object", "Segmentation Storage")


def write_object(path: Path, sop_class: str, pixel_data: bytes, **elements) -> Path:
    """A DICOM file of ``sop_class`` with the given pixel data and elements (Part 10, explicit VR)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_data
    ds.save_as(path, enforce_file_format=True)
    return path


def write_segmentation(path: Path) -> Path:
    """A minimal binary DICOM SEG: 1-bit masks, two frames."""
    from pydicom.uid import SegmentationStorage

    masks = np.packbits(np.ones(2 * 16 * 16, dtype=np.uint8), bitorder="little").tobytes()
    return write_object(path, SegmentationStorage, masks, Modality="SEG", SegmentationType="BINARY", Rows=16,
                        Columns=16, NumberOfFrames=2, BitsAllocated=1, BitsStored=1, HighBit=0)


# ---- item 16: identifying data, per PS3.15 Annex E -------------------------------------------------

def test_item16_dates_age_and_device_serial_are_identifying(tmp_path):
    from clinfuse.data.images import phi_fields

    tags = {"StudyDate": "20240101", "SeriesDate": "20240101", "AcquisitionDate": "20240101",
            "ContentDate": "20240101", "StudyTime": "101010", "SeriesTime": "101011", "AcquisitionTime": "101012",
            "ContentTime": "101013", "PatientAge": "047Y", "DeviceSerialNumber": "SN-4711",
            "BurnedInAnnotation": "NO"}
    found = phi_fields(write_dicom(tmp_path / "dated.dcm", np.ones((8, 8)), **tags))
    for keyword in tags:
        if keyword != "BurnedInAnnotation":
            assert keyword in found, (keyword, found)


def test_item16_declared_retention_options_are_honoured(tmp_path):
    """A file de-identified with the Retain Longitudinal Temporal Information (Modified Dates)
    option keeps shifted dates on purpose: they are not reported."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from clinfuse.data.images import phi_fields

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113107", "DCM"
    code.CodeMeaning = "Retain Longitudinal Temporal Information Modified Dates Option"
    path = write_dicom(tmp_path / "shifted.dcm", np.ones((8, 8)), StudyDate="20990101", PatientAge="047Y",
                       PatientIdentityRemoved="YES", DeidentificationMethodCodeSequence=Sequence([code]),
                       BurnedInAnnotation="NO")
    found = phi_fields(path)
    assert "StudyDate" not in found and "PatientAge" in found


def write_ultrasound(path: Path, **tags) -> Path:
    """An ultrasound frame with a hospital's name in its pixels and, unless ``tags`` say so, no
    BurnedInAnnotation element."""
    from PIL import Image, ImageDraw
    from pydicom.uid import UltrasoundImageStorage

    canvas = Image.new("L", (96, 64))
    ImageDraw.Draw(canvas).text((2, 2), "BAPTIST MED CTR", fill=255)
    pixels = np.asarray(canvas, dtype=np.uint8)
    return write_object(path, UltrasoundImageStorage, pixels.tobytes(), Modality="US", Rows=pixels.shape[0],
                        Columns=pixels.shape[1], BitsAllocated=8, BitsStored=8, HighBit=7, **tags)


def test_item16_ultrasound_without_burned_in_tag_is_flagged(tmp_path, demo_cfg):
    from clinfuse.data.images import phi_fields

    untagged = write_ultrasound(tmp_path / "us.dcm")
    assert any(f.startswith("BurnedInAnnotation") for f in phi_fields(untagged))
    declared_clean = write_ultrasound(tmp_path / "us_clean.dcm", BurnedInAnnotation="NO")
    assert phi_fields(declared_clean) == []
    rows = good_rows(tmp_path, 4)
    rows[0]["image"] = "us.dcm"
    data = read_manifest(write_manifest(tmp_path, rows), demo_cfg)  # require_deidentified: true
    assert_row_refused(data, 1, "image", "burned-in")


# ---- item 17: numbers, labels, categories, missing codes, encodings, --strict ------------------------

def test_item17_zero_image_size_is_refused_in_the_config(small_cfg):
    raw = small_cfg.model_dump(mode="json")
    raw["data"]["image"]["size"] = [0, 0]
    with pytest.raises(InputError) as info:
        config_from_dict(raw, source="study.yaml")
    assert info.value.key.startswith("data.image.size")


def test_item17_numeric_labels_and_categories_match_sensibly(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  labels: [0, 1]\n  tabular:\n"
                      "    - {name: stage, type: categorical, categories: [1, 2, 3]}\n")
    cfg = load_config(config)
    assert cfg.data.labels == ["0", "1"]
    assert cfg.data.tabular[0].categories == ["1", "2", "3"]
    rows = [{"patient_id": f"p{i}", "label": label, "note": f"note {i}", "stage": stage}
            for i, (label, stage) in enumerate([("0", "1"), ("1", "1.0"), ("1.0", "2"), (" 0 ", "3.00")])]
    data = read_manifest(write_manifest(tmp_path, rows, header=["patient_id", "label", "note", "stage"]), cfg)
    assert [r.label for r in data.records] == [0, 1, 1, 0], data.problems
    assert [r.tabular["stage"] for r in data.records] == ["1", "1", "2", "3"]
    frame = pd.DataFrame({"patient_id": ["a", "b"], "label": [0, 1], "note": ["x", "y"], "stage": [1.0, 2.0]})
    frame.to_parquet(tmp_path / "m.parquet")
    parquet = read_manifest(tmp_path / "m.parquet", cfg)
    assert [r.label for r in parquet.records] == [0, 1] and parquet.records[1].tabular["stage"] == "2"


def test_item17_declared_missing_codes(tmp_path, small_cfg):
    raw = small_cfg.model_dump(mode="json")
    for column in raw["data"]["tabular"]:
        if column["name"] == "spo2":
            column["missing"] = [0, -1]
        if column["name"] == "sex":
            column["missing"] = ["U"]
    cfg = config_from_dict(raw)
    rows = good_rows(tmp_path, 4)
    rows[0]["spo2"], rows[1]["spo2"], rows[2]["sex"], rows[3]["spo2"] = "0", "-1.0", "U", "20"
    data = read_manifest(write_manifest(tmp_path, rows), cfg)
    by_row = {r.row: r for r in data.records}
    assert by_row[1].tabular["spo2"] is None and by_row[2].tabular["spo2"] is None
    assert by_row[3].tabular["sex"] is None
    assert_row_refused(data, 4, "spo2", "range")  # a real value out of range is still an error
    bad = small_cfg.model_dump(mode="json")
    bad["data"]["tabular"][1]["missing"] = ["F"]  # sex: a declared category cannot mean "missing"
    with pytest.raises(InputError, match="missing"):
        config_from_dict(bad)


def test_item17_non_utf8_inline_note_is_that_rows_error(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    manifest = write_manifest(tmp_path, rows)
    text = manifest.read_bytes().replace(b"cough and fever day 2", b"toux et fi\xe8vre jour 2")
    manifest.write_bytes(text)
    data = read_manifest(manifest, small_cfg)
    assert_row_refused(data, 3, "note", "UTF-8")
    assert len(data.records) == 3


def test_item17_strict_prints_its_reason(site, capsys):
    code = main(["validate", str(site), "--strict"])  # the fixture's empty notes are warnings
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--strict" in lines[0] and "warning" in lines[0], captured.err


# ---- item 11 (its input-file part): NaN and Infinity are clean errors ----------------------------------

@pytest.mark.parametrize("key, value", [("train.lr", ".nan"), ("privacy.target_epsilon", ".inf"),
                                         ("privacy.max_grad_norm", ".inf")])
def test_item11_nan_and_infinity_in_the_config_name_the_key(tmp_path, key, value):
    section, name = key.split(".")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  labels: [a, b]\n{section}:\n  {name}: {value}\n")
    with pytest.raises(InputError) as info:
        load_config(config)
    assert info.value.key == key
