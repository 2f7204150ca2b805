"""Using the demo's model end to end: `clinfuse demo` (Flower simulation, DP) -> `clinfuse evaluate`
(calibration on 'val', ECE before/after) -> `clinfuse predict` on the cohort without its labels.
Slow: it runs a federated study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def run(*argv):
    out = subprocess.run([sys.executable, "-m", "clinfuse.cli", *argv], capture_output=True, text=True,
                         timeout=900, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_demo_model_is_evaluated_calibrated_and_predicts_one_row_per_patient(tmp_path):
    from test_federation_rounds import tiny_config

    from clinfuse.training.checkpoint import checkpoint_calibration, read_checkpoint

    work = tmp_path / "demo"
    run("demo", "--workdir", str(work), "--patients", "60", "--rounds", "2", "--config", str(tiny_config(tmp_path)),
        "--cpus", "2")
    manifests = sorted((work / "cohort").glob("site-*/manifest.csv"))
    assert len(manifests) == 3

    out = run("evaluate", "--checkpoint", str(work / "run" / "global.pt"), "--manifest", *map(str, manifests),
              "--out", str(tmp_path / "ev"))
    assert "AUROC" in out.stdout and "balanced accuracy" in out.stdout
    assert "clinfuse evaluate: bootstrap" in out.stderr  # progress lines without a terminal
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    run_ = metrics["runs"]["global"]
    for m in ("accuracy", "balanced_accuracy"):
        lo, hi = run_["overall"]["metrics"][m]["ci"]
        assert lo <= run_["overall"]["metrics"][m]["value"] <= hi
    calibration = run_["calibration"]
    calibrated = tmp_path / "ev" / "calibrated" / "global.pt"
    if calibration["source"] == "fitted":
        assert "after calibration" in out.stdout and calibrated.exists()
        assert {"ece", "brier"} <= set(calibration["before"]) and {"ece", "brier"} <= set(calibration["after"])
        checkpoint = calibrated
        block = checkpoint_calibration(read_checkpoint(calibrated))
    else:  # a 2-round tiny study may leave too few val rows to fit; predict then says it is uncalibrated
        checkpoint, block = work / "run" / "global.pt", None

    unlabelled = []
    patients = 0
    for m in manifests:
        frame = pd.read_csv(m, dtype=str, keep_default_na=False)
        patients += frame["patient_id"].nunique()
        path = m.parent / "unlabelled.csv"
        frame.drop(columns=["label"]).to_csv(path, index=False)
        unlabelled.append(path)
    out = run("predict", "--checkpoint", str(checkpoint), "--manifest", *map(str, unlabelled), "--out",
              str(tmp_path / "predictions.csv"))
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert len(pred) == patients and not pred.duplicated(["site", "patient_id"]).any()
    if block is not None:
        assert pred["temperature"].to_numpy() == pytest.approx(block["temperature"], rel=1e-5)
        assert pred["threshold"].to_numpy() == pytest.approx(block["thresholds"]["positive"], rel=1e-5)
