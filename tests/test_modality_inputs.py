"""The input rules hold for every path-bearing kind, not only 2-D images: volumes and signals stay
inside the site (every file they stand for included), are decoded as training decodes them when
the manifest is read, inside the one decoding guard, have their identifying DICOM data reported
and their findings remembered; evaluation, calibration and prediction work over declared
modalities."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from clinfuse.config import SignalModality, VolumeModality, config_from_dict, load_config
from clinfuse.data.manifest import read_manifest
from tests.conftest import rich_config, write_dicom, write_manifest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOLUME = VolumeModality(name="ct", kind="volume", size=(4, 8, 8))
SIGNAL = SignalModality(name="ecg", kind="signal", channels=2, sampling_rate=100, length=300)
HEADER = ["patient_id", "label", "split", "ct", "ecg"]


def study(tmp_path, **data):
    return config_from_dict({
        "data": {"labels": ["negative", "positive"], "cache_dir": str(tmp_path / "cache"), **data},
        "modalities": [VOLUME.model_dump(mode="json"), SIGNAL.model_dump(mode="json")]}, source="test")


def write_series(folder: Path, n: int = 4, seed: int = 0, **tags) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        write_dicom(folder / f"s{k:02d}.dcm", rng.integers(0, 2000, (12, 12)),
                    ImagePositionPatient=[0.0, 0.0, 2.0 * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    InstanceNumber=k + 1, SeriesInstanceUID="1.2.3.4", Modality="CT", **tags)
    return folder


def write_wfdb(folder: Path, name: str, seed: int = 0) -> Path:
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    signal = np.random.default_rng(seed).normal(size=(300, 2))
    wfdb.wrsamp(name, fs=100, units=["mV", "mV"], sig_name=["I", "II"], p_signal=signal, fmt=["16", "16"],
                write_dir=str(folder))
    return folder / f"{name}.hea"


def good_site(site: Path, n: int = 4) -> list[dict]:
    rows = []
    for k in range(n):
        write_series(site / "ct" / f"p{k}", seed=k)
        np.save(site / f"e{k}.npy", np.random.default_rng(k).normal(size=(300, 2)))
        rows.append({"patient_id": f"p{k}", "label": ("negative", "positive")[k % 2], "split": "train",
                     "ct": f"ct/p{k}", "ecg": f"e{k}.npy"})
    return rows


def refused(data, row: int, column: str, *texts: str) -> None:
    errors = [p for p in data.problems if p.row == row and p.severity == "error"]
    assert errors and any(p.column == column for p in errors), data.problems
    for text in texts:
        assert any(text in p.message for p in errors), (text, errors)
    assert row not in {r.row for r in data.records}


def test_volume_and_signal_paths_and_the_files_behind_them_stay_inside_the_site(tmp_path):
    cfg = study(tmp_path)
    site, outside = tmp_path / "site", tmp_path / "elsewhere"
    rows = good_site(site, 6)
    write_series(outside / "ct")
    np.save(outside / "e.npy", np.zeros((300, 2)))
    rows[0]["ct"] = "../elsewhere/ct"  # the series folder itself outside
    rows[1]["ecg"] = str(outside / "e.npy")  # absolute, outside
    (site / "ct" / "p2" / "s01.dcm").unlink()  # a slice of a series inside, symlinked from outside
    (site / "ct" / "p2" / "s01.dcm").symlink_to(outside / "ct" / "s01.dcm")
    write_wfdb(outside / "w", "rec")  # a WFDB record whose signal file is a symlink out of the site
    header = write_wfdb(site / "w", "rec")
    (site / "w" / "rec.dat").unlink()
    (site / "w" / "rec.dat").symlink_to(outside / "w" / "rec.dat")
    rows[3]["ecg"] = "w/rec.hea"
    (site / "v").mkdir()  # a WFDB header that names its signal file in another folder
    (site / "v" / "rec.hea").write_text(header.read_text().replace("rec.dat", "../w/rec.dat"))
    rows[4]["ecg"] = "v/rec"
    data = read_manifest(write_manifest(site, rows, header=HEADER), cfg)
    refused(data, 1, "ct", "outside")
    refused(data, 2, "ecg", "outside")
    refused(data, 3, "ct", "s01.dcm", "outside")
    refused(data, 4, "ecg", "rec.dat", "outside")
    refused(data, 5, "ecg", "WFDB header")  # wfdb's header syntax has no folders in file names
    assert [r.row for r in data.records] == [6]


def test_validation_decodes_volumes_and_signals_as_training_does(tmp_path):
    cfg = study(tmp_path)
    site = tmp_path / "site"
    rows = good_site(site, 4)
    slice_ = site / "ct" / "p0" / "s02.dcm"  # headers fine, pixel data cut short
    slice_.write_bytes(slice_.read_bytes()[:-40])
    np.save(site / "e1.npy", np.full((300, 2), np.nan))  # the right shape, but no sample
    data = read_manifest(write_manifest(site, rows, header=HEADER), cfg)
    refused(data, 1, "ct", "p0/s02.dcm", "truncated")
    refused(data, 2, "ecg", "e1.npy", "no valid sample")
    assert [r.row for r in data.records] == [3, 4]
    # without file checks (a caller that opens nothing) the rows pass to the dataset
    assert len(read_manifest(site / "manifest.csv", cfg, check_files=False).records) == 4


def test_a_decoder_that_crashes_or_warns_is_one_row_error_and_quiet(tmp_path, monkeypatch):
    from clinfuse.data import signals

    cfg = study(tmp_path)
    site = tmp_path / "site"
    rows = good_site(site, 3)
    (site / "e0.csv").write_text("1,2\n3,4\n")
    rows[0]["ecg"] = "e0.csv"

    def broken(path):
        warnings.warn("a third-party reader's chatter", UserWarning, stacklevel=1)
        raise IndexError("list index out of range")  # what a reader raises from deep inside

    monkeypatch.setattr(signals, "_csv", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_manifest(write_manifest(site, rows, header=HEADER), cfg)
    refused(data, 1, "ecg", "e0.csv", "IndexError")
    assert len(data.records) == 2 and not caught


def test_identifying_data_in_any_slice_is_reported_and_refused_when_required(tmp_path):
    site = tmp_path / "site"
    rows = good_site(site, 3)
    write_dicom(site / "ct" / "p1" / "s03.dcm", np.ones((12, 12)), ImagePositionPatient=[0.0, 0.0, 6.0],
                ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=4, SeriesInstanceUID="1.2.3.4",
                Modality="CT", PatientName="Doe^Jane")
    manifest = write_manifest(site, rows, header=HEADER)
    lenient = read_manifest(manifest, study(tmp_path))
    (warning,) = [p for p in lenient.problems if p.severity == "warning"]
    assert warning.row == 2 and warning.column == "ct" and "PatientName" in warning.message
    assert len(lenient.records) == 3
    strict = read_manifest(manifest, study(tmp_path, require_deidentified=True))
    refused(strict, 2, "ct", "PatientName", "Annex E")


def test_file_check_memo_covers_every_file_of_a_series_and_a_record(tmp_path, monkeypatch):
    from clinfuse.data import signals, volumes

    cfg = study(tmp_path)
    site = tmp_path / "site"
    rows = good_site(site, 3)
    write_wfdb(site / "w", "rec")
    rows[2]["ecg"] = "w/rec.hea"
    manifest = write_manifest(site, rows, header=HEADER)
    memo: dict = {}
    first = read_manifest(manifest, cfg, file_checks=memo)
    assert len(first.records) == 3 and len(memo) == 6
    decoded = []
    real_volume, real_signal = volumes.read_volume, signals.read_signal
    monkeypatch.setattr(volumes, "read_volume", lambda p: decoded.append(Path(p).name) or real_volume(p))
    monkeypatch.setattr(signals, "read_signal", lambda p, s: decoded.append(Path(p).name) or real_signal(p, s))
    assert len(read_manifest(manifest, cfg, file_checks=memo).records) == 3 and decoded == []
    slice_ = site / "ct" / "p1" / "s02.dcm"  # one slice of one series rewritten: that series only
    slice_.write_bytes(slice_.read_bytes())
    dat = site / "w" / "rec.dat"  # the record's signal file, not its header
    dat.write_bytes(dat.read_bytes())
    read_manifest(manifest, cfg, file_checks=memo)
    assert sorted(decoded) == ["p1", "rec.hea"]


def test_predict_reads_unlabelled_rows_of_a_volume_and_signal_study(tmp_path):
    from clinfuse.evaluation.prediction import predict_patients
    from clinfuse.training.checkpoint import build_model_for, save_checkpoint

    cfg = study(tmp_path)
    site = tmp_path / "site"
    rows = good_site(site, 4)
    rows[3]["ct"] = ""
    rows.append(dict(rows[0], ecg="e1.npy"))  # p0's second row: pooled into one patient
    for r in rows:
        r.pop("label")
    manifest = write_manifest(site, rows, header=[h for h in HEADER if h != "label"])
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model_for(cfg), cfg)
    result = predict_patients(ckpt, [manifest], progress=False)
    by_patient = {p["patient_id"]: p for p in result["patients"]}
    assert sorted(by_patient) == ["p0", "p1", "p2", "p3"] and result["modalities"] == ["ct", "ecg"]
    assert by_patient["p0"]["rows"] == 2 and by_patient["p3"]["modalities_present"] == "ecg"
    assert by_patient["p1"]["modalities_present"] == by_patient["p1"]["modalities_used"] == "ct+ecg"


def test_evaluate_calibrate_and_predict_over_the_five_modality_study(tmp_path, rich_cohort, capsys):
    from clinfuse.cli import main
    from clinfuse.training.checkpoint import build_model_for, save_checkpoint

    path = rich_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["evaluation"] = {"bootstrap": 100, "seed": 1}
    data["train"]["num_threads"] = 1
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    ckpt = save_checkpoint(tmp_path / "global.pt", build_model_for(cfg), cfg)
    manifest = rich_cohort / "site-1" / "manifest.csv"  # the site without volumes
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(out),
                 "--config", str(path), "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modalities"] == ["chest", "note", "ehr", "ecg"]  # the study's, less what site 1 lacks
    assert {c["modality"] for c in metrics["robustness"]["global"]} == {"chest", "note", "ehr", "ecg"}
    inputs = metrics["checkpoints"]["global"]["provenance"]["inputs"]
    assert [i["name"] for i in inputs] == ["chest", "ct", "note", "ehr", "ecg"] and inputs[1]["shape"] == "8x16x16"
    assert "ct (volume 8x16x16, small_cnn3d)" in (out / "report.html").read_text()
    assert metrics["data"]["rows"] >= metrics["data"]["patients"]
    capsys.readouterr()
    checkpoint = ckpt
    if (out / "calibrated" / "global.pt").is_file():  # the fit may be refused on so few val rows
        checkpoint = out / "calibrated" / "global.pt"
    assert main(["predict", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--config", str(path),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--quiet"]) == 0
    import pandas as pd

    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(pred) == 24 and not pred["modalities_used"].str.contains("ct").any()
