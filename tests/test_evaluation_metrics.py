"""Metric definitions: hand-checked values, scikit-learn agreement, thresholds, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from clinfuse.errors import InputError
from clinfuse.evaluation.metrics import (
    METRICS,
    binary_metrics,
    check_predictions,
    choose_threshold,
    choose_thresholds,
    classification_metrics,
    expected_calibration_error,
    pattern_sort_key,
    reliability_curve,
    weighted_metrics,
)

# The textbook example: AUROC 0.75.
Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])


def two_col(p):
    return np.c_[1 - p, p]


def test_binary_hand_checked_values():
    values, notes = binary_metrics(Y, P, 0.5, ece_bins=10)
    assert notes == []
    assert values["auroc"] == pytest.approx(0.75)
    assert values["auprc"] == pytest.approx(average_precision_score(Y, P))
    # Threshold 0.5 -> predicted [0, 0, 0, 1]: TP 1, FN 1, TN 2, FP 0.
    assert values["sensitivity"] == pytest.approx(0.5)
    assert values["specificity"] == pytest.approx(1.0)
    assert values["ppv"] == pytest.approx(1.0)
    assert values["npv"] == pytest.approx(2 / 3)
    assert values["accuracy"] == pytest.approx(3 / 4)
    assert values["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert values["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # Bins (10): 0.1 -> |0-0.1|, 0.4 -> |0-0.4|, 0.35 -> |1-0.35|, 0.8 -> |1-0.8|, each 1/4 weight.
    assert values["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)


def test_threshold_is_inclusive():
    values, _ = binary_metrics(Y, P, 0.35)
    assert values["sensitivity"] == pytest.approx(1.0)  # 0.35 >= 0.35 counts as positive


def test_classification_metrics_binary_uses_positive_class_and_matches_sklearn():
    rng = np.random.default_rng(3)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    out = classification_metrics(two_col(p), y, [0.5], label_names=["neg", "pos"])
    assert out["per_class"] == {}
    assert out["metrics"]["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert out["metrics"]["brier"] == pytest.approx(brier_score_loss(y, p))
    # Swapping the columns flips what "positive" means: AUROC must become 1 - AUROC.
    swapped = classification_metrics(two_col(p)[:, ::-1], y, [0.5])
    assert swapped["metrics"]["auroc"] == pytest.approx(1 - roc_auc_score(y, p))


def test_multiclass_macro_matches_sklearn_ovr():
    rng = np.random.default_rng(0)
    n, c = 300, 4
    labels = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n)
    probs[np.arange(n), labels] += 0.3 * rng.random(n)
    probs /= probs.sum(axis=1, keepdims=True)
    out = classification_metrics(probs, labels, [0.3] * c, label_names=list("abcd"))
    assert set(out["per_class"]) == set("abcd")
    assert out["metrics"]["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    onehot = label_binarize(labels, classes=range(c))
    assert out["metrics"]["auprc"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    per_class_sens = [out["per_class"][k]["sensitivity"] for k in "abcd"]
    assert out["metrics"]["sensitivity"] == pytest.approx(np.mean(per_class_sens))
    assert out["per_class"]["b"]["auroc"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))


def test_multiclass_macro_skips_undefined_class_with_note():
    labels = np.array([0, 0, 1, 1, 0, 1])  # class 2 never occurs
    probs = np.tile([0.5, 0.3, 0.2], (6, 1))
    probs[labels == 1] = [0.2, 0.6, 0.2]
    out = classification_metrics(probs, labels, [0.5, 0.5, 0.5], label_names=["x", "y", "z"])
    assert out["per_class"]["z"]["auroc"] is None
    assert out["metrics"]["auroc"] == pytest.approx(1.0)
    assert any("macro auroc averages 2 of 3" in n for n in out["notes"])


def test_single_class_subset_gives_none_with_notes_not_a_crash():
    y = np.zeros(5, dtype=int)
    p = np.linspace(0.1, 0.9, 5)
    values, notes = binary_metrics(y, p, 0.5)
    assert values["auroc"] is None and values["auprc"] is None and values["sensitivity"] is None
    assert values["specificity"] == pytest.approx(2 / 5)  # 0.1, 0.3 below 0.5
    assert values["brier"] is not None
    assert any("auroc undefined" in n for n in notes)
    empty, notes = binary_metrics(np.zeros(0, int), np.zeros(0), 0.5)
    assert all(v is None for v in empty.values()) and notes == ["no rows"]


def test_youden_threshold_on_validation():
    # J at 0.7 = 2/3, at 0.5 = 2/3 - 1/4, at 0.45 = 1 - 1/4 (the maximum).
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.5, 0.45, 0.7, 0.9])
    t, note = choose_threshold(y, p, method="youden")
    assert note is None and t == pytest.approx(0.45)
    t, _ = choose_threshold(y, p, method="sensitivity", target_sensitivity=0.6)
    assert t == pytest.approx(0.7)  # highest threshold reaching 2/3 >= 0.6
    t, _ = choose_threshold(y, p, method="sensitivity", target_sensitivity=0.9)
    assert t == pytest.approx(0.45)


def test_threshold_single_class_falls_back_to_half():
    t, note = choose_threshold(np.ones(4, int), np.array([0.2, 0.4, 0.6, 0.8]))
    assert t == 0.5 and "single class" in note
    with pytest.raises(InputError, match="unknown threshold method"):
        choose_threshold(Y, P, method="f1")


def test_choose_thresholds_per_class():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.6 + 0.4 / 3
    thr, notes = choose_thresholds(probs, labels)
    assert thr.shape == (3,) and notes == []
    thr2, _ = choose_thresholds(two_col(P), Y)
    assert thr2.shape == (1,)


def test_ece_known_cases():
    # All predictions 0.8: perfectly calibrated when 80% are positive, off by 0.3 at 50%.
    p = np.full(10, 0.8)
    assert expected_calibration_error(np.array([1] * 8 + [0] * 2), p, 10) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1] * 5 + [0] * 5), p, 10) == pytest.approx(0.3)
    # Two bins: [0, .5) holds 0.1, 0.4, 0.35 (1 positive), [.5, 1] holds 0.8 (positive).
    assert expected_calibration_error(Y, P, 2) == pytest.approx((abs(1 - 0.85) + abs(1 - 0.8)) / 4)
    assert expected_calibration_error(np.zeros(0), np.zeros(0)) is None


def test_reliability_curve_bins():
    rel = reliability_curve(Y, P, n_bins=2)
    assert rel["count"].tolist() == [3, 1]
    assert rel["mean_predicted"][0] == pytest.approx(0.85 / 3)
    assert rel["observed"].tolist() == pytest.approx([1 / 3, 1.0])
    rel = reliability_curve(np.array([1]), np.array([1.0]), n_bins=4)  # 1.0 lands in the last bin
    assert rel["count"].tolist() == [0, 0, 0, 1] and np.isnan(rel["observed"][0])


def test_weighted_kernel_matches_sklearn_sample_weight():
    rng = np.random.default_rng(7)
    n = 120
    p = np.round(rng.random(n), 1)  # many ties
    y = (rng.random(n) < p).astype(int)
    w = rng.integers(0, 4, (6, n)).astype(float)
    out = weighted_metrics(w, two_col(p), y, [0.5], ece_bins=5)
    for b in range(6):
        sw = w[b]
        assert out[b, 0, 0] == pytest.approx(roc_auc_score(y, p, sample_weight=sw))
        assert out[b, 0, 1] == pytest.approx(average_precision_score(y, p, sample_weight=sw))
        assert out[b, 0, METRICS.index("brier")] == pytest.approx(brier_score_loss(y, p, sample_weight=sw))
        pred = (p >= 0.5).astype(int)
        assert out[b, 0, METRICS.index("accuracy")] == pytest.approx(accuracy_score(y, pred, sample_weight=sw))
        assert out[b, 0, METRICS.index("balanced_accuracy")] == pytest.approx(
            balanced_accuracy_score(y, pred, sample_weight=sw))
        # Expanding rows by their weights must give the unweighted point estimates.
        rows = np.repeat(np.arange(n), sw.astype(int))
        ref, _ = binary_metrics(y[rows], p[rows], 0.5, ece_bins=5)
        for j, m in enumerate(METRICS):
            assert out[b, 0, j] == pytest.approx(ref[m]), m


def test_weighted_kernel_unit_weights_equal_point_estimates_multiclass():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    thr = [0.3, 0.35, 0.4]
    out = weighted_metrics(np.ones((1, 90)), probs, labels, thr)
    point = classification_metrics(probs, labels, thr, label_names=["a", "b", "c"])
    for k, name in enumerate("abc"):
        for j, m in enumerate(METRICS):
            assert out[0, k, j] == pytest.approx(point["per_class"][name][m])
    # Multi-class accuracy is the top-label one; the macro balanced accuracy is scikit-learn's.
    top = probs.argmax(axis=1)
    assert point["metrics"]["accuracy"] == pytest.approx(accuracy_score(labels, top))
    assert point["metrics"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, top))
    w = np.random.default_rng(2).integers(0, 3, (1, 90)).astype(float)
    weighted = weighted_metrics(w, probs, labels, thr)[0].mean(axis=0)
    assert weighted[METRICS.index("balanced_accuracy")] == pytest.approx(
        balanced_accuracy_score(labels, top, sample_weight=w[0]))
    assert weighted[METRICS.index("accuracy")] == pytest.approx(accuracy_score(labels, top, sample_weight=w[0]))


def test_weighted_kernel_undefined_is_nan():
    y = np.array([0, 0, 1, 1])
    w = np.array([[1.0, 1.0, 0.0, 0.0]])  # only negatives drawn
    out = weighted_metrics(w, two_col(P), y, [0.5])
    col = METRICS.index
    assert np.isnan(out[0, 0, col("auroc")]) and np.isnan(out[0, 0, col("auprc")])
    assert np.isnan(out[0, 0, col("sensitivity")]) and np.isnan(out[0, 0, col("balanced_accuracy")])
    assert out[0, 0, col("specificity")] == pytest.approx(1.0)
    assert out[0, 0, col("accuracy")] == pytest.approx(1.0)


def test_check_predictions_rejects_bad_input_naming_the_row():
    with pytest.raises(InputError, match="row 2"):
        check_predictions(np.array([[0.5, 0.5], [1.2, -0.2]]), np.array([0, 1]))
    with pytest.raises(InputError, match="not a class index"):
        check_predictions(two_col(P), np.array([0, 1, 2, 1]))
    with pytest.raises(InputError, match="labels for"):
        check_predictions(two_col(P), np.array([0, 1]))
    with pytest.raises(InputError, match="integer class"):
        check_predictions(two_col(P), np.array([0.0, 1.0, 0.0, 1.0]))


def test_pattern_order():
    names = ["image only", "none", "text+tabular", "image+text+tabular", "image+text", "weird"]
    assert sorted(names, key=pattern_sort_key) == [
        "image+text+tabular", "image+text", "text+tabular", "image only", "none", "weird"]
