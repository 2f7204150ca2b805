"""Diagnostic metrics, operating thresholds and calibration.

Two implementations of the same definitions live here, on purpose:

* :func:`classification_metrics` computes point estimates with scikit-learn (the reference).
* :func:`weighted_metrics` computes the same metrics for many weight vectors at once with numpy
  (rows weighted by how often a bootstrap resample drew their patient). It is what makes 1000
  patient-level resamples take seconds; the tests pin it to scikit-learn called with
  ``sample_weight``.

Conventions
-----------
* ``probs`` is ``[N, C]`` class probabilities, ``labels`` is ``[N]`` class indices.
* Binary (C == 2): every metric is about the positive class ``labels[1]``.
  Multi-class (C > 2): every metric is computed one-vs-rest per class and the headline value is
  the macro average over the classes where it is defined. This includes the Brier score and the
  ECE, so for multi-class they are per-class (one-vs-rest) quantities averaged, not the
  multi-class Brier sum or the top-label ECE. Accuracy and balanced accuracy are the exception:
  for multi-class they are those of the top-label (argmax) prediction, as published benchmarks
  report them; a class's own entry holds the top-label accuracy (the same for every class) and
  the class's recall under the argmax prediction, so their macro averages are the accuracy and
  the balanced accuracy (mean recall over the classes present).
* Binary accuracy and balanced accuracy ((sensitivity + specificity) / 2) are at the threshold.
* A row is predicted positive for a class when its probability is ``>= threshold``.
* A metric that is undefined on a subset (AUROC with a single class, PPV with no predicted
  positives, ...) is ``None`` with a note, never an exception.
"""

from __future__ import annotations

import warnings

import numpy as np

from clinfuse.config import MODALITIES
from clinfuse.errors import InputError

METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
           "brier", "ece")
_COLUMN = {m: j for j, m in enumerate(METRICS)}


# --------------------------------------------------------------------------------------------
# Input checks


def check_predictions(probs, labels, *, n_classes: int | None = None, what: str = "predictions"):
    """Validate and convert ``probs [N, C]`` and ``labels [N]``.

    Returns ``(probs float64 [N, C], labels int64 [N])``. Raises :class:`InputError` naming
    ``what`` and the first offending row (1-based) when shapes disagree, probabilities are not
    finite or outside [0, 1], or a label is not a class index.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise InputError(f"{what}: probabilities must be a 2-D array [rows, classes], "
                         f"got shape {probs.shape}")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise InputError(f"{what}: expected {n_classes} class probabilities per row, "
                         f"got {probs.shape[1]}")
    if probs.shape[1] < 2:
        raise InputError(f"{what}: need at least 2 classes, got {probs.shape[1]}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise InputError(f"{what}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                         f"for {probs.shape[0]} rows of probabilities")
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs > 1).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{what}: probabilities must be finite and within [0, 1] "
                         f"(got {probs[row].tolist()})", row=row + 1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what}: labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    out = (labels < 0) | (labels >= probs.shape[1])
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise InputError(f"{what}: label {labels[row]} is not a class index in "
                         f"[0, {probs.shape[1]})", row=row + 1)
    return probs, labels


def evaluated_classes(n_classes: int) -> list[int]:
    """Class indices that get their own metrics: the positive class (1) when binary, else all."""
    return [1] if n_classes == 2 else list(range(n_classes))


# --------------------------------------------------------------------------------------------
# Thresholds


def choose_threshold(y, score, *, method: str = "youden",
                     target_sensitivity: float = 0.9) -> tuple[float, str | None]:
    """Pick an operating threshold for one binary problem (validation data).

    ``y`` is ``[N]`` in {0, 1}, ``score`` ``[N]`` the positive-class probability.
    ``method="youden"`` maximises sensitivity + specificity - 1 (ties: the highest threshold);
    ``method="sensitivity"`` takes the highest threshold whose sensitivity reaches
    ``target_sensitivity`` (so specificity is as high as that allows).
    Returns ``(threshold, note)``; with a single class present no threshold can be chosen and
    it returns ``(0.5, note)``.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    if method not in ("youden", "sensitivity"):
        raise InputError(f"unknown threshold method {method!r} (youden or sensitivity)",
                         key="evaluation.threshold")
    if y.size == 0 or y.min() == y.max():
        return 0.5, "threshold fixed at 0.5: the threshold data hold a single class"
    fpr, tpr, thr = roc_curve(y, score, drop_intermediate=False)
    # thr[0] is +inf (nothing predicted positive): never an operating point.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        idx = int(np.argmax(tpr - fpr))
    else:
        idx = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(thr[idx]), None


def choose_thresholds(probs, labels, *, method: str = "youden", target_sensitivity: float = 0.9,
                      label_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """One threshold per evaluated class (see :func:`evaluated_classes`), one-vs-rest.

    Returns ``(thresholds [K], notes)``.
    """
    probs, labels = check_predictions(probs, labels, what="threshold data")
    names = label_names or [str(c) for c in range(probs.shape[1])]
    thresholds, notes = [], []
    for c in evaluated_classes(probs.shape[1]):
        t, note = choose_threshold(labels == c, probs[:, c], method=method,
                                   target_sensitivity=target_sensitivity)
        thresholds.append(t)
        if note:
            notes.append(f"class {names[c]}: {note}")
    return np.asarray(thresholds, dtype=np.float64), notes


def predicted_classes(probs, thresholds: dict[str, float], label_names: list[str]) -> np.ndarray:
    """The decision rule: binary, the positive class when its probability is ``>= thresholds[positive]``;
    multi-class, the class of highest probability. Returns ``[N]`` class indices."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(label_names) == 2:
        return (probs[:, 1] >= thresholds[label_names[1]]).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Calibration


def _bin_index(score: np.ndarray, n_bins: int) -> np.ndarray:
    # Bin k holds [k/K, (k+1)/K); 1.0 goes into the last bin.
    return np.clip(np.floor(score * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_curve(y, score, n_bins: int = 10) -> dict:
    """Reliability diagram data for one binary problem.

    Returns a dict of ``[n_bins]`` arrays: ``lower``/``upper`` bin edges, ``count`` rows per bin,
    ``mean_predicted`` (mean score) and ``observed`` (fraction positive); NaN for empty bins.
    """
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    idx = _bin_index(score, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=score, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        obs = np.where(count > 0, sum_y / count, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "count": count.astype(np.int64),
            "mean_predicted": mean_p, "observed": obs}


def expected_calibration_error(y, score, n_bins: int = 10) -> float | None:
    """ECE with ``n_bins`` equal-width bins: sum over bins of (rows in bin / N) * |observed - mean
    predicted|. ``None`` for no rows."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    if y.size == 0:
        return None
    idx = _bin_index(score, n_bins)
    gap = np.bincount(idx, weights=y - score, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


# --------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)


def binary_metrics(y, score, threshold: float, *, ece_bins: int = 10) -> tuple[dict, list[str]]:
    """All of :data:`METRICS` for one binary problem, computed with scikit-learn.

    ``y`` ``[N]`` in {0, 1}; ``score`` ``[N]`` positive-class probability; rows with
    ``score >= threshold`` are predicted positive. Returns ``(values, notes)`` where undefined
    values are ``None`` and each gets a note saying why.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    notes: list[str] = []
    if y.size == 0:
        return out, ["no rows"]
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n_pos and n_neg:
            out["auroc"] = float(roc_auc_score(y, score))
        else:
            notes.append(f"auroc undefined: only {'positives' if n_pos else 'negatives'} present")
        if n_pos:
            out["auprc"] = float(average_precision_score(y, score))
        else:
            notes.append("auprc undefined: no positives")
        pred = (score >= threshold).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        for name, num, den, why in (
            ("sensitivity", tp, tp + fn, "no positives"),
            ("specificity", tn, tn + fp, "no negatives"),
            ("ppv", tp, tp + fp, "no predicted positives"),
            ("npv", tn, tn + fn, "no predicted negatives"),
        ):
            if den:
                out[name] = float(num / den)
            else:
                notes.append(f"{name} undefined: {why}")
        out["accuracy"] = float((tp + tn) / y.size)
        if out["sensitivity"] is not None and out["specificity"] is not None:
            out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2.0
        else:
            notes.append("balanced_accuracy undefined: needs both classes")
        out["brier"] = float(brier_score_loss(y, score, labels=[0, 1]))
    out["ece"] = expected_calibration_error(y, score, ece_bins)
    return out, notes


def classification_metrics(probs, labels, thresholds, *, ece_bins: int = 10,
                           label_names: list[str] | None = None) -> dict:
    """Point estimates for ``probs [N, C]`` against ``labels [N]``.

    ``thresholds`` has one entry per evaluated class (see :func:`evaluated_classes`); a scalar is
    accepted for binary. Returns ``{"metrics": {name: value|None}, "per_class": {label: {...}},
    "notes": [...]}``. ``metrics`` is the positive class (binary) or the macro average over
    classes where the metric is defined (multi-class); ``per_class`` is filled for multi-class
    only.
    """
    probs, labels = check_predictions(probs, labels)
    n_classes = probs.shape[1]
    names = label_names or [str(c) for c in range(n_classes)]
    classes = evaluated_classes(n_classes)
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if thresholds.shape != (len(classes),):
        raise InputError(f"need {len(classes)} threshold(s), one per evaluated class, "
                         f"got {thresholds.shape[0]}")
    per_class, notes = {}, []
    for c, t in zip(classes, thresholds):
        values, class_notes = binary_metrics(labels == c, probs[:, c], t, ece_bins=ece_bins)
        per_class[names[c]] = values
        prefix = "" if n_classes == 2 else f"class {names[c]}: "
        if n_classes > 2:  # balanced accuracy is the argmax recall here, defined when the class is present
            class_notes = [n for n in class_notes if not n.startswith("balanced_accuracy")]
            if not (labels == c).any():
                class_notes.append("balanced_accuracy (recall) undefined: class absent")
        notes.extend(prefix + n for n in class_notes)
    if n_classes > 2 and labels.size:
        # Top-label accuracy and per-class recall of the argmax prediction (see the module notes).
        top = probs.argmax(axis=1)
        accuracy = float(np.mean(top == labels))
        for c in classes:
            values = per_class[names[c]]
            values["accuracy"] = accuracy
            present = labels == c
            values["balanced_accuracy"] = float(np.mean(top[present] == c)) if present.any() else None
    if n_classes == 2:
        return {"metrics": per_class[names[1]], "per_class": {}, "notes": notes}
    macro = {}
    for m in METRICS:
        vals = [v[m] for v in per_class.values() if v[m] is not None]
        macro[m] = float(np.mean(vals)) if vals else None
        if vals and len(vals) < n_classes:
            notes.append(f"macro {m} averages {len(vals)} of {n_classes} classes (others undefined)")
    return {"metrics": macro, "per_class": per_class, "notes": notes}


def roc_points(y, score, max_points: int = 400) -> dict | None:
    """ROC curve (``fpr``, ``tpr`` lists) for plotting, thinned to about ``max_points``.
    ``None`` when a single class is present."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    if y.size == 0 or y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(score, dtype=np.float64))
    if fpr.size > max_points:
        keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, max_points).astype(int), fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


# --------------------------------------------------------------------------------------------
# Vectorised weighted metrics (bootstrap kernel)


def weighted_metrics(weights, probs, labels, thresholds, *, ece_bins: int = 10) -> np.ndarray:
    """:data:`METRICS` for many row-weightings at once.

    ``weights`` is ``[B, N]`` non-negative (a bootstrap resample gives each row the number of
    times its patient was drawn), ``probs [N, C]``, ``labels [N]``, ``thresholds [K]`` one per
    evaluated class. Returns ``[B, K, len(METRICS)]`` float64, NaN where a metric is undefined for
    that weighting. With integer weights each value equals scikit-learn's with ``sample_weight``.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    classes = evaluated_classes(probs.shape[1])
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    out = np.full((w.shape[0], len(classes), len(METRICS)), np.nan)
    n = probs.shape[0]
    if n == 0:
        return out
    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, (c, t) in enumerate(zip(classes, thresholds)):
            y = (labels == c).astype(np.float64)
            s = probs[:, c]

            # Ranking metrics: one sort shared by all resamples; ties form one ROC step.
            order = np.argsort(-s, kind="mergesort")
            ws = w[:, order]
            ys = y[order]
            tps = np.cumsum(ws * ys, axis=1)
            fps = np.cumsum(ws * (1.0 - ys), axis=1)
            last = np.r_[np.flatnonzero(np.diff(s[order])), n - 1]
            tps, fps = tps[:, last], fps[:, last]
            pos, neg = tps[:, -1], fps[:, -1]
            tpr = np.concatenate([np.zeros((w.shape[0], 1)), tps / pos[:, None]], axis=1)
            fpr = np.concatenate([np.zeros((w.shape[0], 1)), fps / neg[:, None]], axis=1)
            auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) * 0.5, axis=1)
            out[:, k, _COLUMN["auroc"]] = np.where((pos > 0) & (neg > 0), auroc, np.nan)
            called = tps + fps
            precision = np.where(called > 0, tps / np.where(called > 0, called, 1.0), 0.0)
            ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
            out[:, k, _COLUMN["auprc"]] = np.where(pos > 0, np.maximum(ap, 0.0), np.nan)

            # Threshold metrics from weighted confusion counts.
            pred = (s >= t).astype(np.float64)
            tp = w @ (y * pred)
            fp = w @ ((1.0 - y) * pred)
            fn = w @ (y * (1.0 - pred))
            tn = w @ ((1.0 - y) * (1.0 - pred))
            for m, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                                ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
                out[:, k, _COLUMN[m]] = np.where(den > 0, num / den, np.nan)
            has_rows = total > 0
            if len(classes) == 1:
                out[:, k, _COLUMN["accuracy"]] = np.where(has_rows, (tp + tn) / total, np.nan)
                out[:, k, _COLUMN["balanced_accuracy"]] = (out[:, k, _COLUMN["sensitivity"]]
                                                           + out[:, k, _COLUMN["specificity"]]) / 2.0
            else:  # top-label accuracy and this class's recall under the argmax prediction
                top = probs.argmax(axis=1)
                out[:, k, _COLUMN["accuracy"]] = np.where(has_rows, (w @ (top == labels)) / total, np.nan)
                pos_w = w @ y
                out[:, k, _COLUMN["balanced_accuracy"]] = np.where(
                    pos_w > 0, (w @ (y * (top == c))) / pos_w, np.nan)

            out[:, k, _COLUMN["brier"]] = np.where(has_rows, (w @ (s - y) ** 2) / total, np.nan)
            onehot = np.zeros((n, ece_bins))
            onehot[np.arange(n), _bin_index(s, ece_bins)] = 1.0
            gap = w @ (onehot * (y - s)[:, None])
            out[:, k, _COLUMN["ece"]] = np.where(has_rows, np.abs(gap).sum(axis=1) / total, np.nan)
    return out


# --------------------------------------------------------------------------------------------
# Modality-pattern breakdowns


def pattern_sort_key(name: str) -> tuple:
    """Order modality-pattern names ("image+text+tabular", "image only", "none", as named by
    :func:`clinfuse.data.manifest.pattern_name`) from most to fewest modalities, then in
    MODALITIES order; unknown names go last, alphabetically."""
    present = [] if name == "none" else name.removesuffix(" only").split("+")
    if not all(m in MODALITIES for m in present):
        return (1, 0, [], name)
    return (0, -len(present), [MODALITIES.index(m) for m in present], name)
