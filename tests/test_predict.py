"""`clinfuse predict`: one row per patient, no labels, the checkpoint's temperature and threshold,
and refusal of a checkpoint that does not fit the manifests' study."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from clinfuse.cli import main
from clinfuse.config import config_from_dict
from clinfuse.data.dataset import MultimodalDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.evaluation.calibration import apply_temperature
from clinfuse.training.checkpoint import (
    atomic_torch_save,
    build_model_for,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    write_calibrated_checkpoint,
)
from clinfuse.training.trainer import predict_proba

TEMPERATURE, THRESHOLD = 2.5, 0.4975


@pytest.fixture
def unlabelled(tmp_path, small_cfg):
    """Two sites' manifests without label or split columns (some patients have two rows), and a
    calibrated checkpoint whose temperature and threshold are set by hand."""
    from test_evaluation_commands import write_site

    manifests = []
    for k in range(2):
        path = write_site(tmp_path / f"site-{k}", k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["label", "split"])
        frame.to_csv(path, index=False)
        manifests.append(path)
    data = small_cfg.model_dump(mode="json")
    data["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg = config_from_dict(data, source="test")
    torch.manual_seed(0)
    plain = save_checkpoint(tmp_path / "global.pt", build_model_for(cfg), cfg)
    calibrated = write_calibrated_checkpoint(plain, tmp_path / "calibrated.pt", {
        "method": "temperature", "temperature": TEMPERATURE, "thresholds": {"positive": THRESHOLD},
        "threshold_method": "youden", "fitted_by": "test", "fitted_on": {"split": "val", "rows": 10, "patients": 9}})
    return cfg, manifests, plain, calibrated


def test_predict_writes_one_row_per_patient_with_the_checkpoints_temperature_and_threshold(tmp_path, unlabelled,
                                                                                          capsys):
    _cfg, manifests, _, calibrated = unlabelled
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(calibrated), "--manifest", *map(str, manifests), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "predictions:" in capsys.readouterr().out
    pred = pd.read_csv(out, keep_default_na=False)

    model, ckpt_cfg, meta = load_checkpoint(calibrated)
    expected_patients = 0
    for manifest in manifests:
        site = read_manifest(manifest, ckpt_cfg, require_label=False)
        assert site.records and all(r.label is None for r in site.records)
        probs = apply_temperature(predict_proba(model, MultimodalDataset(site.records, ckpt_cfg)), TEMPERATURE)
        by_patient: dict[str, list] = {}
        for record, p in zip(site.records, probs):
            by_patient.setdefault(record.patient_id, []).append(p[1])
        expected_patients += len(by_patient)
        mine = pred[pred.site == site.site].set_index("patient_id")
        for patient, ps in by_patient.items():
            row = mine.loc[patient]
            assert row["rows"] == len(ps)
            assert row["prob_positive"] == pytest.approx(np.mean(ps), abs=1e-5)
            assert row["predicted"] == ("positive" if np.mean(ps) >= THRESHOLD else "negative")
    assert len(pred) == expected_patients and not pred.duplicated(["site", "patient_id"]).any()
    assert (pred["rows"] > 1).any()  # some patients have two rows, merged into one prediction
    assert set(pred["threshold"]) == {THRESHOLD} and set(pred["temperature"]) == {TEMPERATURE}
    assert set(pred["model_hash"]) == {meta["model_hash"]} and set(pred["config_hash"]) == {meta["config_hash"]}
    assert {"image+text+tabular", "text+tabular"} <= set(pred["modalities_used"])
    assert (pred["modalities_present"] == pred["modalities_used"]).all()
    assert np.allclose(pred["prob_negative"] + pred["prob_positive"], 1, atol=1e-6)
    # The probabilities really are the tempered ones: the raw model is more extreme.
    raw = predict_proba(model, MultimodalDataset(read_manifest(manifests[0], ckpt_cfg, require_label=False).records,
                                                 ckpt_cfg))
    assert np.abs(raw[:, 1] - 0.5).max() > np.abs(apply_temperature(raw, TEMPERATURE)[:, 1] - 0.5).max()


def test_predict_json_and_an_uncalibrated_checkpoint(tmp_path, unlabelled, capsys):
    _cfg, manifests, plain, _ = unlabelled
    assert main(["predict", "--checkpoint", str(plain), "--manifest", str(manifests[0]), "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "no calibration" in captured.err
    assert doc["decision"]["calibrated"] is False and doc["decision"]["thresholds"] == {"positive": 0.5}
    assert doc["decision"]["temperature"] == 1.0
    assert doc["patients"] and {"prob_positive", "predicted", "modalities_used"} <= set(doc["patients"][0])
    assert doc["model_hash"] == read_checkpoint(plain)["model_hash"]
    # Neither --out nor --json: refused, one line.
    assert main(["predict", "--checkpoint", str(plain), "--manifest", str(manifests[0])]) == 2


def _one_line_refusal(capsys, *argv) -> str:
    assert main(["predict", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_checkpoint_that_does_not_match_the_study_is_refused(tmp_path, unlabelled, small_cfg, capsys):
    cfg, manifests, plain, calibrated = unlabelled
    out = tmp_path / "p.csv"
    # The study config the manifests follow declares another image size than the checkpoint's.
    study = small_cfg.model_dump(mode="json")
    study["data"]["image"]["size"] = [48, 48]
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(study))
    err = _one_line_refusal(capsys, "--checkpoint", str(calibrated), "--manifest", str(manifests[0]),
                            "--config", str(study_path), "--out", str(out))
    assert "image.size" in err and "does not match the study" in err and str(calibrated) in err
    # With the checkpoint's own study config it is accepted.
    same_path = tmp_path / "same.yaml"
    same_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["predict", "--checkpoint", str(calibrated), "--manifest", str(manifests[0]),
                 "--config", str(same_path), "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()

    # A manifest without a tabular field the checkpoint's study declares.
    frame = pd.read_csv(manifests[0], dtype=str, keep_default_na=False).drop(columns=["wbc"])
    other = manifests[0].parent / "no-wbc.csv"
    frame.to_csv(other, index=False)
    err = _one_line_refusal(capsys, "--checkpoint", str(calibrated), "--manifest", str(other), "--out", str(out))
    assert "wbc" in err and "does not match" in err

    # A checkpoint whose recorded preprocessing is not what this clinfuse makes of its config.
    payload = read_checkpoint(plain)
    payload["preprocessing"]["decoder_version"] = "0"
    stale = tmp_path / "stale.pt"
    atomic_torch_save(payload, stale)
    err = _one_line_refusal(capsys, "--checkpoint", str(stale), "--manifest", str(manifests[0]), "--out", str(out))
    assert "decoder_version" in err


def test_labels_are_optional_only_for_prediction(tmp_path, unlabelled):
    cfg, manifests, _, _ = unlabelled
    from clinfuse.errors import InputError

    with pytest.raises(InputError, match="label"):
        read_manifest(manifests[0], cfg)
    # A label outside the study's classes is a warning when predicting (the row is kept).
    frame = pd.read_csv(manifests[0], dtype=str, keep_default_na=False)
    frame["label"] = "maybe"
    path = manifests[0].parent / "odd-labels.csv"
    frame.to_csv(path, index=False)
    site = read_manifest(path, cfg, require_label=False)
    assert len(site.records) == len(frame)
    assert all(p.severity == "warning" for p in site.problems if p.column == "label")
