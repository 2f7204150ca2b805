"""Temperature scaling: the maths, and where `clinfuse evaluate` fits it (validation rows only)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from clinfuse.cli import main
from clinfuse.data.dataset import MultimodalDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.errors import InputError
from clinfuse.evaluation.calibration import apply_temperature, calibration_effect, fit_temperature
from clinfuse.evaluation.metrics import expected_calibration_error
from clinfuse.training.checkpoint import (
    checkpoint_calibration,
    load_checkpoint,
    read_checkpoint,
    write_calibrated_checkpoint,
)
from clinfuse.training.trainer import predict_proba


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n=4000, factor=3.0, seed=0):
    """Labels drawn from softmax(z); the model reports softmax(factor * z): true temperature = factor."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, 2))
    labels = (rng.random(n) < softmax(z)[:, 1]).astype(int)
    return softmax(factor * z), labels


def test_apply_temperature_is_softmax_of_scaled_logits_and_keeps_the_ranking():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (50, 3))
    probs = softmax(logits)
    assert np.allclose(apply_temperature(probs, 1.0), probs)
    assert np.allclose(apply_temperature(probs, 2.5), softmax(logits / 2.5))
    # The top class never changes; with two classes the ranking (so the AUROC) does not either.
    assert (apply_temperature(probs, 4.0).argmax(axis=1) == probs.argmax(axis=1)).all()
    binary = softmax(logits[:, :2])
    assert (np.argsort(apply_temperature(binary, 4.0)[:, 1]) == np.argsort(binary[:, 1])).all()
    with pytest.raises(InputError, match="positive"):
        apply_temperature(probs, 0.0)


def test_fit_recovers_the_temperature_and_lowers_ece():
    probs, labels = overconfident(factor=3.0)
    temperature, info = fit_temperature(probs, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert info["nll_after"] < info["nll_before"] and not info["at_bound"]
    after = apply_temperature(probs, temperature)
    assert expected_calibration_error(labels, after[:, 1]) < 0.5 * expected_calibration_error(labels, probs[:, 1])
    # Already calibrated scores keep a temperature near 1.
    honest, labels2 = overconfident(factor=1.0, seed=2)
    assert fit_temperature(honest, labels2)[0] == pytest.approx(1.0, abs=0.1)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(InputError, match="two classes"):
        fit_temperature(np.full((5, 2), 0.5), np.zeros(5, dtype=int))
    with pytest.raises(InputError, match="no"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))


def test_calibration_effect_reports_paired_before_after():
    probs, labels = overconfident(n=600)
    t, _ = fit_temperature(probs, labels)
    effect = calibration_effect(probs, apply_temperature(probs, t), labels, np.arange(600), np.array([0.5]),
                                label_names=["neg", "pos"], n_resamples=200)
    before, after, change = effect["before"]["ece"], effect["after"]["ece"], effect["change"]["ece"]
    assert after["value"] < before["value"]
    assert change["value"] == pytest.approx(after["value"] - before["value"])
    assert change["ci"][1] < 0  # the improvement is resolved by these 600 patients
    assert set(effect["before"]) == {"ece", "brier"}


# --------------------------------------------------------------------------------------------
# In `clinfuse evaluate`: fitted on 'val' rows only, written to a new checkpoint


@pytest.fixture
def study(tmp_path, small_cfg):
    from test_evaluation_commands import write_site

    from clinfuse.config import config_from_dict
    from clinfuse.training.checkpoint import build_model_for, save_checkpoint

    manifests = [write_site(tmp_path / f"site-{k}", k, n_patients=21) for k in range(2)]
    data = small_cfg.model_dump(mode="json")
    data["data"]["cache_dir"] = str(tmp_path / "cache")
    data["evaluation"]["bootstrap"] = 100
    data["train"]["num_threads"] = 1
    cfg = config_from_dict(data, source="test")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "global.pt", build_model_for(cfg), cfg)
    threads = torch.get_num_threads()
    yield manifests, ckpt
    torch.set_num_threads(threads)


def _evaluate(manifests, ckpt, out, *extra):
    code = main(["evaluate", "--checkpoint", str(ckpt), "--manifest", *map(str, manifests), "--out", str(out),
                 "--no-robustness", "--device", "cpu", *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def _relabel(manifests, split: str, tmp_path, name: str):
    """Copies of the manifests with the labels of one split flipped (images are shared)."""
    out = []
    for m in manifests:
        frame = pd.read_csv(m, dtype=str, keep_default_na=False)
        flip = frame["split"] == split
        frame.loc[flip, "label"] = frame.loc[flip, "label"].map({"positive": "negative", "negative": "positive"})
        path = m.parent / f"{name}.csv"
        frame.to_csv(path, index=False)
        out.append(path)
    return out


def test_evaluate_fits_calibration_on_val_rows_only_and_leaves_the_source_checkpoint(tmp_path, study, capsys):
    manifests, ckpt = study
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    metrics = _evaluate(manifests, ckpt, tmp_path / "a")
    out = capsys.readouterr().out
    cal = metrics["runs"]["global"]["calibration"]
    assert cal["source"] == "fitted" and cal["fitted_on"]["split"] == "val"
    val_rows = sum((pd.read_csv(m)["split"] == "val").sum() for m in manifests)
    assert cal["fitted_on"]["rows"] == val_rows
    # The temperature is the maximum-likelihood one on exactly the val rows' raw predictions.
    model, cfg, _ = load_checkpoint(ckpt)
    probs, labels = [], []
    for m in manifests:
        recs = [r for r in read_manifest(m, cfg).records if r.split == "val"]
        probs.append(predict_proba(model, MultimodalDataset(recs, cfg)))
        labels += [r.label for r in recs]
    assert cal["temperature"] == pytest.approx(fit_temperature(np.concatenate(probs), np.array(labels))[0], rel=1e-4)
    assert set(cal["before"]) == set(cal["after"]) == {"ece", "brier"}
    assert "ECE" in out and "after calibration" in out and "calibrated checkpoint" in out
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest  # global.pt untouched

    # The calibrated copy: same weights, a block saying what was fitted where and what it is not.
    calibrated = tmp_path / "a" / "calibrated" / "global.pt"
    payload = read_checkpoint(calibrated)
    assert payload["model_hash"] == read_checkpoint(ckpt)["model_hash"]
    block = checkpoint_calibration(payload)
    assert block["temperature"] == pytest.approx(cal["temperature"])
    assert block["thresholds"] == pytest.approx(metrics["runs"]["global"]["thresholds"])
    assert block["fitted_on"]["rows"] == val_rows
    assert block["privacy"]["differentially_private"] is False
    assert block["privacy"]["released_statistics"] == ["temperature", "threshold"]

    # Flipping the test labels changes nothing the fit saw; flipping the val labels does.
    same = _evaluate(_relabel(manifests, "test", tmp_path, "flip-test"), ckpt, tmp_path / "b")
    assert same["runs"]["global"]["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    assert same["runs"]["global"]["thresholds"] == metrics["runs"]["global"]["thresholds"]
    other = _evaluate(_relabel(manifests, "val", tmp_path, "flip-val"), ckpt, tmp_path / "c")
    assert other["runs"]["global"]["calibration"]["temperature"] != pytest.approx(cal["temperature"])


def test_evaluating_a_calibrated_checkpoint_uses_its_own_temperature_and_threshold(tmp_path, study):
    manifests, ckpt = study
    block = {"method": "temperature", "temperature": 3.5, "thresholds": {"positive": 0.42},
             "fitted_on": {"split": "val", "rows": 9, "patients": 9}}
    calibrated = write_calibrated_checkpoint(ckpt, tmp_path / "cal.pt", block)
    metrics = _evaluate(manifests, calibrated, tmp_path / "d")
    run = metrics["runs"]["cal"]
    assert run["threshold_source"] == "checkpoint" and run["thresholds"] == {"positive": 0.42}
    assert run["calibration"]["source"] == "checkpoint" and run["calibration"]["temperature"] == 3.5
    refit = _evaluate(manifests, calibrated, tmp_path / "e", "--calibration", "fit")
    assert refit["runs"]["cal"]["calibration"]["source"] == "fitted"
    raw = _evaluate(manifests, calibrated, tmp_path / "f", "--calibration", "none")
    assert raw["runs"]["cal"]["calibration"]["temperature"] is None
    assert raw["runs"]["cal"]["threshold_source"] == "val"


def test_old_checkpoints_load_and_bad_blocks_are_refused(tmp_path, study):
    _, ckpt = study
    _, _, meta = load_checkpoint(ckpt)
    assert checkpoint_calibration(meta) is None  # every checkpoint written before calibration existed
    with pytest.raises(InputError, match="temperature"):
        write_calibrated_checkpoint(ckpt, tmp_path / "bad.pt", {"temperature": -1, "thresholds": {}})
    with pytest.raises(InputError, match="thresholds"):
        write_calibrated_checkpoint(ckpt, tmp_path / "bad.pt", {"temperature": 1.5, "thresholds": {"positive": 7}})
    assert not (tmp_path / "bad.pt").exists()


def test_a_fit_that_runs_to_its_bound_is_not_applied(tmp_path):
    from clinfuse.evaluation.commands import _calibration_for

    # Perfectly separated validation rows: the likelihood keeps improving as T -> 0.
    probs = np.array([[0.6, 0.4], [0.55, 0.45], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1])
    temperature, info = fit_temperature(probs, labels)
    assert info["at_bound"] and temperature == pytest.approx(0.05, rel=1e-2)
    items = [{"site": "a", "patient_id": str(i), "label": int(y)} for i, y in enumerate(labels)]
    chosen = _calibration_for("auto", {}, probs, labels, items, ["neg", "pos"], tmp_path / "c.pt")
    assert chosen["source"] == "none" and chosen["temperature"] is None
    assert "bound" in chosen["summary"]
