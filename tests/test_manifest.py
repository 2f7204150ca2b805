"""Site manifest validation: the happy path and malformed inputs, each named by file/row/key."""

import numpy as np
import pandas as pd
import pytest

from clinfuse.cli import main
from clinfuse.data.manifest import patient_split, read_manifest
from clinfuse.errors import InputError
from tests.conftest import HEADER, good_rows, write_dicom, write_manifest


def problems_for(path, cfg):
    return read_manifest(path, cfg).problems


def only_error(data, row, column=None, text=None):
    errors = [p for p in data.problems if p.severity == "error" and p.row == row]
    assert errors, f"no error on row {row}: {data.problems}"
    if column:
        assert any(p.column == column for p in errors), errors
    if text:
        assert any(text in p.message for p in errors), errors
    assert row in data.skipped_rows
    assert row not in {r.row for r in data.records}


def test_good_site_reads_with_patterns(site, small_cfg):
    data = read_manifest(site, small_cfg)
    assert not [p for p in data.problems if p.severity == "error"]
    summary = data.summary(small_cfg.data.labels)
    assert summary["rows"] == 12 and summary["patients"] == 12
    assert summary["availability"]["image"] == 9
    assert sum(summary["patterns"].values()) == 12
    assert "image+text+tabular" in summary["patterns"]
    assert "text+tabular" in summary["patterns"]  # rows without an image
    empty_note = [p for p in data.problems if p.column == "note"]
    assert empty_note and all(p.severity == "warning" for p in empty_note)


def test_validate_cli_prints_pattern_table(site, capsys):
    assert main(["validate", str(site)]) == 0
    out = capsys.readouterr().out
    assert "modality pattern" in out and "image+text+tabular" in out and "patients 12" in out


def test_validate_cli_json(site, capsys):
    import json
    assert main(["validate", str(site), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["usable_rows"] == 12


def test_split_is_patient_level_and_deterministic(tmp_path, small_cfg):
    folder = tmp_path / "s"
    folder.mkdir()
    rows = good_rows(folder, 12)
    rows += [dict(r, image="", note="second visit") for r in rows[:6]]  # same patients again
    data = read_manifest(write_manifest(folder, rows), small_cfg)
    by_patient = {}
    for r in data.records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    assert patient_split("p001", small_cfg) == patient_split("p001", small_cfg)
    splits = [patient_split(f"x{i}", small_cfg) for i in range(2000)]
    assert 0.10 < splits.count("test") / 2000 < 0.20


# ---- malformed input: each names file, row or key ---------------------------------------------

def test_missing_required_column(tmp_path, small_cfg):
    path = write_manifest(tmp_path, [{"patient_id": "a"}], header=["patient_id", "age", "sex",
                                                                    "temperature", "spo2", "wbc"])
    with pytest.raises(InputError) as err:
        read_manifest(path, small_cfg)
    assert err.value.key == "label" and str(path) in str(err.value)


def test_missing_declared_tabular_column(tmp_path, small_cfg):
    path = write_manifest(tmp_path, [{"patient_id": "a", "label": "negative"}], header=["patient_id", "label"])
    with pytest.raises(InputError) as err:
        read_manifest(path, small_cfg)
    assert err.value.key == "age"


def test_bad_image_path(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[1]["image"] = "nope/missing.png"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 2, "image", "not found")


def test_non_dicom_bytes_named_dcm(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    (tmp_path / "fake.dcm").write_bytes(b"this is not a dicom file at all" * 20)
    rows[0]["image"] = "fake.dcm"
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    only_error(data, 1, "image")
    assert any("fake.dcm" in p.message for p in data.problems if p.row == 1)


def test_truncated_dicom(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    path = write_dicom(tmp_path / "t.dcm", np.ones((64, 64)))
    path.write_bytes(path.read_bytes()[:-3000])
    rows[2]["image"] = "t.dcm"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 3, "image")


def test_unsupported_image_type(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    (tmp_path / "scan.tiff").write_bytes(b"II*\0")
    rows[0]["image"] = "scan.tiff"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 1, "image", "unsupported")


def test_empty_note_is_missing_not_error(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[0]["note"] = "   "
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    record = next(r for r in data.records if r.row == 1)
    assert record.inputs["text"] is None and record.mask[1] is False
    assert any(p.row == 1 and p.severity == "warning" and "empty" in p.message for p in data.problems)


def test_undeclared_label(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[3]["label"] = "maybe"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 4, "label", "maybe")


def test_empty_and_nan_patient_id(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[0]["patient_id"] = ""
    rows[1]["patient_id"] = "NaN"
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    only_error(data, 1, "patient_id")
    only_error(data, 2, "patient_id")


def test_conflicting_labels_for_one_patient(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows.append(dict(rows[0], label="negative" if rows[0]["label"] == "positive" else "positive",
                     note="another visit"))
    data = read_manifest(write_manifest(tmp_path, rows), small_cfg)
    only_error(data, 1, "label", "conflicting")
    only_error(data, 5, "label", "conflicting")


def test_duplicate_rows(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows.append(dict(rows[1]))
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 5, None, "duplicate of row 2")


def test_out_of_range_value(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[0]["age"] = "250"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 1, "age", "range")


def test_non_numeric_value(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[1]["temperature"] = "hot"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 2, "temperature", "not a number")


def test_undeclared_category(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[2]["sex"] = "X"
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 3, "sex", "category")


def test_bad_split_value(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    for r in rows:
        r["split"] = "train"
    rows[0]["split"] = "holdout"
    path = write_manifest(tmp_path, rows, header=HEADER + ["split"])
    only_error(read_manifest(path, small_cfg), 1, "split")


def test_row_without_any_modality(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 4)
    rows[0].update(image="", note="", age="", sex="", temperature="", spo2="", wbc="")
    only_error(read_manifest(write_manifest(tmp_path, rows), small_cfg), 1, None, "no input of any modality")


def test_missing_note_file(tmp_path, small_cfg):
    rows = [dict(r, note_path=f"notes/{r['patient_id']}.txt") for r in good_rows(tmp_path, 3)]
    (tmp_path / "notes").mkdir()
    for r in rows[1:]:
        (tmp_path / r["note_path"]).write_text("fever")
    header = [h for h in HEADER if h != "note"] + ["note_path"]
    data = read_manifest(write_manifest(tmp_path, rows, header=header), small_cfg)
    only_error(data, 1, "note_path", "not found")
    assert {r.inputs["text"] for r in data.records} == {"fever"}


def test_phi_in_dicom_is_error_when_required(tmp_path, demo_cfg, small_cfg):
    rows = good_rows(tmp_path, 4)
    write_dicom(tmp_path / "phi.dcm", np.ones((16, 16)), PatientName="Doe^Jane")
    rows[0]["image"] = "phi.dcm"
    path = write_manifest(tmp_path, rows)
    lenient = read_manifest(path, small_cfg)
    assert any(p.row == 1 and p.severity == "warning" and "PatientName" in p.message for p in lenient.problems)
    strict = read_manifest(path, demo_cfg)  # demo.yaml sets require_deidentified: true
    only_error(strict, 1, "image", "PatientName")


def test_unreadable_manifest_and_wrong_suffix(tmp_path, small_cfg):
    bad = tmp_path / "m.csv"
    bad.write_bytes(b"\xff\xfe\x00\x01garbage\x00")
    with pytest.raises(InputError):
        read_manifest(bad, small_cfg)
    other = tmp_path / "m.xlsx"
    other.write_text("x")
    with pytest.raises(InputError, match="unsupported manifest type"):
        read_manifest(other, small_cfg)
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.csv", small_cfg)


def test_parquet_manifest(tmp_path, small_cfg):
    rows = good_rows(tmp_path, 6)
    frame = pd.DataFrame(rows)
    frame["age"] = pd.to_numeric(frame["age"])
    frame.to_parquet(tmp_path / "m.parquet")
    data = read_manifest(tmp_path / "m.parquet", small_cfg)
    assert len(data.records) == 6 and data.records[0].inputs["tabular"]["age"] == 30.0


# ---- the CLI: exit 2, one line, no traceback -----------------------------------------------

@pytest.mark.parametrize("case", ["missing-manifest", "bad-config-key", "strict-problems", "no-usable-rows"])
def test_cli_exit_2_without_traceback(tmp_path, site, capsys, case):
    args = ["validate", str(site)]
    if case == "missing-manifest":
        args = ["validate", str(tmp_path / "absent.csv")]
    elif case == "bad-config-key":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("data:\n  labels: [negative, positive]\n  imagez: {}\n")
        args += ["--config", str(cfg)]
    elif case == "strict-problems":
        args += ["--strict"]  # the fixture has empty notes: warnings count under --strict
    elif case == "no-usable-rows":
        rows = good_rows(tmp_path, 2)
        for r in rows:
            r["label"] = "unknown"
        args = ["validate", str(write_manifest(tmp_path / "bad", rows))]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err + captured.out
    if case != "strict-problems":
        assert captured.err.startswith("clinfuse validate: error:")
    if case == "bad-config-key":
        assert "data.imagez" in captured.err
