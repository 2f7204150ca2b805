"""Post-hoc temperature scaling: one scalar that turns a model's scores into frequencies.

A DP-trained model is typically over- or under-confident (clipping and noise distort the logit
scale) while its ranking is fine. Temperature scaling (Guo et al., 2017) divides the logits by a
single ``T > 0`` fitted by maximum likelihood on held-out validation rows: the ranking, and for
a binary task the AUROC, is unchanged; only how far the probabilities sit from 0 and 1 moves.

The models here hand out softmax probabilities, not logits. ``log p`` differs from the logits by
a per-row constant, which the softmax ignores, so ``softmax(log p / T)`` is exactly
``softmax(logits / T)``: the fit works on probabilities alone.

Where the fit runs, and what that means for privacy, is the caller's concern
(:mod:`clinfuse.evaluation.commands` fits it on the evaluator's own validation rows, never on the
evaluated split; SECURITY.md says why).
"""

from __future__ import annotations

import math

import numpy as np

from clinfuse.errors import InputError
from clinfuse.evaluation.metrics import check_predictions

# A temperature outside this range means the validation data are degenerate (e.g. perfectly
# separated), not that the model needs it: the fit is bounded and says so.
TEMPERATURE_BOUNDS = (0.05, 20.0)
_FLOOR = 1e-12  # log(0) guard: a probability rounded to 0 still ranks below every other


def apply_temperature(probs, temperature: float | None) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` row by row; ``None`` or 1 returns ``probs`` unchanged.

    ``probs`` ``[N, C]``; returns float64 ``[N, C]``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if temperature is None or temperature == 1.0:
        return probs
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive number, got {temperature}")
    z = np.log(np.clip(probs, _FLOOR, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs, labels) -> float:
    """Mean ``-log p[label]`` over rows (the quantity temperature scaling minimises)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    picked = np.clip(probs[np.arange(labels.size), labels], _FLOOR, 1.0)
    return float(-np.log(picked).mean())


def fit_temperature(probs, labels) -> tuple[float, dict]:
    """Maximum-likelihood temperature on validation rows.

    ``probs`` ``[N, C]`` (the model's uncalibrated probabilities), ``labels`` ``[N]`` class
    indices. Returns ``(temperature, info)`` with ``info = {"nll_before", "nll_after", "rows",
    "at_bound"}``. Raises :class:`InputError` without rows or with a single class (nothing to fit:
    any temperature that pushes every probability to that class looks best).
    """
    from scipy.optimize import minimize_scalar

    probs, labels = check_predictions(probs, labels, what="calibration data")
    if labels.size == 0:
        raise InputError("calibration needs validation rows, got none")
    if np.unique(labels).size < 2:
        raise InputError("calibration needs validation rows of at least two classes")
    logp = np.log(np.clip(probs, _FLOOR, 1.0))
    rows = np.arange(labels.size)

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    fit = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    temperature = float(math.exp(fit.x))
    info = {"nll_before": nll(0.0), "nll_after": float(fit.fun), "rows": int(labels.size),
            "at_bound": bool(min(abs(fit.x - lo), abs(fit.x - hi)) < 1e-3)}
    if info["nll_after"] > info["nll_before"]:  # the bounded search can only end worse by rounding
        temperature, info["nll_after"] = 1.0, info["nll_before"]
    return temperature, info


def calibration_effect(before, after, labels, groups, thresholds, *, label_names: list[str],
                       n_resamples: int = 1000, seed: int = 0, ece_bins: int = 10,
                       level: float = 0.95, metrics=("ece", "brier")) -> dict:
    """ECE and Brier score before and after calibration on the same (evaluated) rows.

    ``before`` / ``after`` ``[N, C]`` probabilities, ``labels [N]``, ``groups [N]`` patient keys,
    ``thresholds`` per evaluated class. Intervals are the patient bootstrap of
    :mod:`clinfuse.evaluation.bootstrap`, paired, so ``change`` (after - before) has its own.
    Returns ``{"before": {m: {"value", "ci"}}, "after": {...}, "change": {...}}``.
    """
    from clinfuse.evaluation.bootstrap import bootstrap_draws, difference_entry, subset_summary

    draws_b, draws_a = bootstrap_draws([before, after], labels, groups, [thresholds, thresholds],
                                       n_resamples=n_resamples, seed=seed, ece_bins=ece_bins,
                                       progress=False)
    sb = subset_summary(before, labels, groups, thresholds, draws_b["overall"], label_names=label_names,
                        ece_bins=ece_bins, level=level)["metrics"]
    sa = subset_summary(after, labels, groups, thresholds, draws_a["overall"], label_names=label_names,
                        ece_bins=ece_bins, level=level)["metrics"]
    change = difference_entry(sb, sa, draws_b["overall"], draws_a["overall"], level)
    return {"before": {m: sb[m] for m in metrics}, "after": {m: sa[m] for m in metrics},
            "change": {m: change[m] for m in metrics}}
