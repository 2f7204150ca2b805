"""Patient-level bootstrap: intervals, pairing, breakdowns, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from clinfuse.errors import InputError
from clinfuse.evaluation.bootstrap import (
    bootstrap_draws,
    evaluate_runs,
    paired_bootstrap,
    percentile_interval,
    resample_counts,
)
from clinfuse.evaluation.metrics import METRICS

AUROC, BRIER = METRICS.index("auroc"), METRICS.index("brier")


def cohort(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_patients)
    p = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.25, n_patients), 0.01, 0.99)
    return np.c_[1 - p, p], y


def width(draws, metric):
    lo, hi, _ = percentile_interval(draws["overall"][:, 0, metric])
    return hi - lo


def test_resample_counts_draw_whole_patients():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    counts, inverse = resample_counts(groups, 50, np.random.default_rng(0))
    assert counts.shape == (50, 3) and (counts.sum(axis=1) == 3).all()
    weights = counts[:, inverse]
    # Rows of one patient always carry the same weight.
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()


def test_duplicating_rows_does_not_narrow_patient_interval_but_narrows_row_interval():
    probs, y = cohort(60)
    ids = np.arange(60)
    base = bootstrap_draws([probs], y, ids, [[0.5]], n_resamples=1000, seed=1, progress=False)[0]

    # Every patient now has five identical rows (e.g. five images of one visit).
    rep = np.repeat(np.arange(60), 5)
    patient = bootstrap_draws([probs[rep]], y[rep], ids[rep], [[0.5]], n_resamples=1000, seed=1,
                              progress=False)[0]
    row = bootstrap_draws([probs[rep]], y[rep], np.arange(rep.size), [[0.5]], n_resamples=1000,
                          seed=1, progress=False)[0]
    for metric in (AUROC, BRIER):
        w0, wp, wr = width(base, metric), width(patient, metric), width(row, metric)
        # Row-level resampling treats copies as new evidence: about 1/sqrt(5) of the width.
        assert wr < 0.6 * w0, (METRICS[metric], w0, wr)
        # Patient-level resampling sees the same 60 patients: the width stays put.
        assert 0.85 * w0 < wp < 1.15 * w0, (METRICS[metric], w0, wp)


def test_heavily_duplicated_single_patient_counts_once_per_draw():
    probs, y = cohort(40)
    ids = np.arange(40)
    rep = np.r_[np.arange(40), np.zeros(200, dtype=int)]  # patient 0 has 201 rows
    draws = bootstrap_draws([probs[rep]], y[rep], ids[rep], [[0.5]], n_resamples=400, seed=0,
                            progress=False)[0]["overall"]
    row_draws = bootstrap_draws([probs[rep]], y[rep], np.arange(rep.size), [[0.5]], n_resamples=400,
                                seed=0, progress=False)[0]["overall"]
    # A draw that misses patient 0 (about 36% of them) drops all 201 rows: the Brier score swings
    # far more between patient-level draws than between row-level ones, which never miss it.
    assert np.std(draws[:, 0, BRIER]) > 1.5 * np.std(row_draws[:, 0, BRIER])


def test_same_seed_same_draws_and_different_seed_differs():
    probs, y = cohort(50)
    a = bootstrap_draws([probs], y, np.arange(50), [[0.5]], n_resamples=200, seed=4, progress=False)
    b = bootstrap_draws([probs], y, np.arange(50), [[0.5]], n_resamples=200, seed=4, progress=False,
                        chunk_size=37)
    c = bootstrap_draws([probs], y, np.arange(50), [[0.5]], n_resamples=200, seed=5, progress=False)
    # Chunking changes only BLAS summation order, not which patients are drawn.
    np.testing.assert_allclose(a[0]["overall"], b[0]["overall"], rtol=1e-12, atol=1e-15)
    assert not np.array_equal(a[0]["overall"], c[0]["overall"])


def test_paired_bootstrap_identical_predictions_gives_zero_interval():
    probs, y = cohort(80)
    ids = np.repeat(np.arange(40), 2)
    diff = paired_bootstrap(probs, probs.copy(), y, ids, [0.5], [0.5], n_resamples=1000, seed=0)
    for m in METRICS:
        assert diff[m]["value"] == 0.0
        assert diff[m]["ci"] == [0.0, 0.0], m


def test_paired_bootstrap_is_paired():
    probs, y = cohort(120, seed=2)
    rng = np.random.default_rng(9)
    p2 = np.clip(probs[:, 1] + rng.normal(0, 0.02, 120), 0, 1)
    other = np.c_[1 - p2, p2]
    diff = paired_bootstrap(probs, other, y, np.arange(120), [0.5], [0.5], n_resamples=1000, seed=0)
    lo, hi = diff["auroc"]["ci"]
    assert lo <= diff["auroc"]["value"] <= hi
    # A tiny perturbation gives a tiny difference interval; unpaired intervals are ~0.15 wide.
    draws = bootstrap_draws([probs], y, np.arange(120), [[0.5]], n_resamples=1000, seed=0, progress=False)
    assert hi - lo < 0.2 * width(draws[0], AUROC)


def test_evaluate_runs_structure_thresholds_and_breakdowns():
    rng = np.random.default_rng(0)
    probs, y = cohort(200, seed=3)
    groups = np.repeat(np.arange(100), 2)
    sites = np.where(groups < 50, "A", "B")
    patterns = rng.choice(["image only", "image+text+tabular", "text+tabular"], 200)
    # Validation data whose Youden threshold is 0.45 (see the metrics tests).
    val_p = np.array([0.1, 0.2, 0.3, 0.5, 0.45, 0.7, 0.9])
    val_y = np.array([0, 0, 0, 0, 1, 1, 1])
    res = evaluate_runs({"m1": probs, "m2": probs}, y, groups, label_names=["neg", "pos"], sites=sites,
                        patterns=patterns, val_runs={"m1": np.c_[1 - val_p, val_p], "m2": np.c_[1 - val_p, val_p]},
                        val_labels=val_y, n_resamples=200, seed=0, progress=False)
    run = res["runs"]["m1"]
    assert run["thresholds"] == {"pos": pytest.approx(0.45)} and run["threshold_source"] == "val"
    pred = probs[:, 1] >= 0.45
    assert run["overall"]["metrics"]["sensitivity"]["value"] == pytest.approx(pred[y == 1].mean())
    assert run["overall"]["n_patients"] == 100 and run["overall"]["n_rows"] == 200
    assert list(run["per_site"]) == ["A", "B"]
    assert list(run["per_pattern"]) == ["image+text+tabular", "text+tabular", "image only"]
    for subset in [run["overall"], *run["per_site"].values(), *run["per_pattern"].values()]:
        for m in METRICS:
            e = subset["metrics"][m]
            lo, hi = e["ci"]
            assert lo <= e["value"] <= hi, (m, e)
    comp = res["comparisons"][0]
    assert comp["reference"] == "m1" and comp["other"] == "m2"
    assert comp["overall"]["auroc"]["ci"] == [0.0, 0.0]
    assert set(comp["per_site"]) == {"A", "B"}
    assert run["curves"]["roc"]["pos"]["fpr"][0] == 0.0
    assert len(run["curves"]["reliability"]["pos"]["count"]) == 10


def test_evaluate_runs_without_validation_fixes_threshold_and_says_so():
    probs, y = cohort(60)
    res = evaluate_runs({"m": probs}, y, np.arange(60), label_names=["neg", "pos"], n_resamples=100,
                        progress=False)
    assert res["runs"]["m"]["thresholds"] == {"pos": 0.5}
    assert res["runs"]["m"]["threshold_source"] == "fixed"
    assert any("no validation rows" in n for n in res["notes"])


def test_single_class_site_is_reported_not_raised():
    probs, y = cohort(60)
    y = y.copy()
    sites = np.array(["A"] * 50 + ["B"] * 10)
    y[50:] = 0
    res = evaluate_runs({"m": probs}, y, np.arange(60), label_names=["neg", "pos"], sites=sites,
                        n_resamples=200, progress=False)
    b = res["runs"]["m"]["per_site"]["B"]
    assert b["metrics"]["auroc"] == {"value": None, "ci": [None, None], "undefined_resamples": 200}
    assert any("auroc undefined" in n for n in b["notes"])
    assert b["metrics"]["specificity"]["value"] is not None
    # 10 patients, no positives: flagged, with both reasons; the 50-patient site is not.
    assert b["reliable"] is False
    assert b["unreliable_because"] == ["10 patients (fewer than 20)", "class pos absent"]
    a = res["runs"]["m"]["per_site"]["A"]
    assert a["reliable"] is True and a["unreliable_because"] == []


def test_multiclass_runs_have_per_class_intervals():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 150)
    probs = rng.dirichlet(np.ones(3), 150)
    probs[np.arange(150), labels] += 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    res = evaluate_runs({"m": probs}, labels, np.arange(150), label_names=["a", "b", "c"],
                        val_runs={"m": probs}, val_labels=labels, n_resamples=200, progress=False)
    overall = res["runs"]["m"]["overall"]
    assert set(overall["per_class"]) == {"a", "b", "c"}
    macro = np.mean([overall["per_class"][c]["auroc"]["value"] for c in "abc"])
    assert overall["metrics"]["auroc"]["value"] == pytest.approx(macro)
    assert set(res["runs"]["m"]["thresholds"]) == {"a", "b", "c"}


def test_bad_inputs_raise_input_error():
    probs, y = cohort(10)
    with pytest.raises(InputError, match="patient ids"):
        bootstrap_draws([probs], y, np.arange(9), [[0.5]], n_resamples=10, progress=False)
    with pytest.raises(InputError, match="2 class probabilities"):
        evaluate_runs({"m": np.c_[probs, np.zeros(10)]}, y, np.arange(10), label_names=["a", "b"],
                      n_resamples=100, progress=False)
    with pytest.raises(InputError, match="per_site"):
        evaluate_runs({"m": probs}, y, np.arange(10), label_names=["a", "b"], sites=["A"] * 9,
                      n_resamples=100, progress=False)


def test_thousand_patient_resamples_take_seconds():
    rng = np.random.default_rng(0)
    probs, y = cohort(600)
    groups = np.repeat(np.arange(300), 2)
    sites = np.array(["A", "B", "C"])[groups % 3]
    patterns = rng.choice(["image only", "image+text+tabular", "text+tabular", "image+text"], 600)
    start = time.perf_counter()
    evaluate_runs({"a": probs, "b": probs[::-1].copy()}, y, groups, label_names=["neg", "pos"], sites=sites,
                  patterns=patterns, n_resamples=1000, progress=False)
    # 2 runs x 8 subsets x 8 metrics x 1000 resamples: ~2 s here; minutes would mean a per-resample loop.
    assert time.perf_counter() - start < 30
