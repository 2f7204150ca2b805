"""Patient-level bootstrap intervals, paired differences, and breakdowns by site and pattern.

A patient contributes correlated rows (several images, visits, sites' copies), so resampling
rows would treat them as independent evidence and give intervals that are too narrow. Here a
resample draws *patients* with replacement and keeps all of each drawn patient's rows: a row's
weight in a resample is the number of times its patient was drawn.

One weight matrix serves every run and every subset in a call, so:

* intervals of several checkpoints are *paired* (the same patients in each resample), and the
  interval of a difference is the percentile interval of per-resample differences;
* a site or pattern subset uses the resamples of the whole evaluated population, restricted to
  its rows (its size varies between resamples, as it would between studies).

Intervals are 95% percentile intervals over the resamples where the metric is defined; the count
of undefined resamples is reported beside them.
"""

from __future__ import annotations

import warnings

import numpy as np

from clinfuse.errors import InputError
from clinfuse.evaluation.metrics import (
    METRICS,
    check_predictions,
    choose_thresholds,
    classification_metrics,
    evaluated_classes,
    pattern_sort_key,
    reliability_curve,
    roc_points,
    weighted_metrics,
)


def resample_counts(groups, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw patients with replacement.

    ``groups`` ``[N]`` names each row's patient (any hashable values; make them unique across
    sites). Returns ``(counts [n_resamples, P], inverse [N])``: how often each of the P patients
    was drawn in each resample, and each row's patient index, so ``counts[:, inverse]`` is the
    ``[n_resamples, N]`` row-weight matrix.
    """
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.size else 0
    if n_groups == 0:
        return np.zeros((n_resamples, 0)), inverse
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)
    return counts.astype(np.float64), inverse.reshape(-1)


def bootstrap_draws(probs_list, labels, groups, thresholds_list, *, subsets: dict | None = None,
                    n_resamples: int = 1000, seed: int = 0, ece_bins: int = 10,
                    progress: bool = True, desc: str = "bootstrap",
                    chunk_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Metric values in each patient-level resample, for several runs on the same rows.

    ``probs_list``: list of ``[N, C]`` probability arrays (one per run, same rows);
    ``labels [N]``; ``groups [N]`` patient keys; ``thresholds_list``: per run, thresholds per
    evaluated class; ``subsets``: ``{name: bool mask [N]}`` (default: ``{"overall": all rows}``).
    Returns, per run, ``{subset name: draws [n_resamples, K, len(METRICS)]}`` (NaN where
    undefined). Seeded by ``seed``: the same call gives the same draws.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n = labels.shape[0]
    if groups.shape != (n,):
        raise InputError(f"bootstrap: {groups.shape[0]} patient ids for {n} rows")
    if n_resamples < 1:
        raise InputError("bootstrap: need at least one resample", key="evaluation.bootstrap")
    probs_list = [check_predictions(p, labels, what=f"run {i + 1}")[0] for i, p in enumerate(probs_list)]
    if subsets is None:
        subsets = {"overall": np.ones(n, dtype=bool)}
    index = {name: np.flatnonzero(np.asarray(m, dtype=bool)) for name, m in subsets.items()}
    n_classes = probs_list[0].shape[1] if probs_list else 2
    shape = (n_resamples, len(evaluated_classes(n_classes)), len(METRICS))
    out = [{name: np.full(shape, np.nan) for name in index} for _ in probs_list]

    rng = np.random.default_rng(seed)
    if chunk_size is None:
        # Bound the [chunk, N] work arrays to a few tens of MB whatever the cohort size.
        chunk_size = int(np.clip(2_000_000 // max(n, 1), 10, 250))
    from clinfuse.progress import Progress

    with Progress(n_resamples, desc, "resample", enabled=progress) as bar:
        start = 0
        while start < n_resamples:
            stop = min(start + chunk_size, n_resamples)
            counts, inverse = resample_counts(groups, stop - start, rng)
            weights = counts[:, inverse]
            for r, (probs, thr) in enumerate(zip(probs_list, thresholds_list)):
                for name, idx in index.items():
                    out[r][name][start:stop] = weighted_metrics(
                        weights[:, idx], probs[idx], labels[idx], thr, ece_bins=ece_bins)
            bar.update(stop - start)
            start = stop
    return out


def macro_draws(draws: np.ndarray) -> np.ndarray:
    """``[B, K, M] -> [B, M]``: mean over classes where defined (the class axis is 1 when binary)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples stay NaN
        return np.nanmean(draws, axis=1)


def percentile_interval(draws, level: float = 0.95) -> tuple[float | None, float | None, int]:
    """Percentile interval of the defined (non-NaN) values in ``draws [B]``.

    Returns ``(lo, hi, n_undefined)``; ``(None, None, B)`` when no resample is defined.
    """
    draws = np.asarray(draws, dtype=np.float64).ravel()
    ok = draws[~np.isnan(draws)]
    n_undefined = int(draws.size - ok.size)
    if ok.size == 0:
        return None, None, n_undefined
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
    return float(lo), float(hi), n_undefined


def interval_entry(value, draws, level: float = 0.95) -> dict:
    """``{"value": v, "ci": [lo, hi]}`` (+ ``"undefined_resamples"`` when some were)."""
    lo, hi, n_undef = percentile_interval(draws, level)
    if value is None:
        lo = hi = None
    entry = {"value": value, "ci": [lo, hi]}
    if n_undef:
        entry["undefined_resamples"] = n_undef
    return entry


# A subgroup smaller than this (or missing a class) gives intervals too wide or metrics too
# partial to read: it is flagged, not hidden.
MIN_RELIABLE_PATIENTS = 20


def unreliable_because(n_patients: int, class_counts: dict[str, int]) -> list[str]:
    """Why a subset's metrics should not be read on their own (empty list: no reason)."""
    reasons = []
    if n_patients < MIN_RELIABLE_PATIENTS:
        reasons.append(f"{n_patients} patient{'s' if n_patients != 1 else ''} (fewer than {MIN_RELIABLE_PATIENTS})")
    absent = [name for name, count in class_counts.items() if count == 0]
    if absent:
        reasons.append(f"class{'es' if len(absent) > 1 else ''} {', '.join(absent)} absent")
    return reasons


def subset_summary(probs, labels, groups, thresholds, draws, *, label_names: list[str],
                   ece_bins: int = 10, level: float = 0.95) -> dict:
    """Point estimates with intervals for one subset.

    ``draws`` is this subset's ``[B, K, M]`` from :func:`bootstrap_draws`. Returns
    ``{"n_rows", "n_patients", "class_counts", "reliable", "unreliable_because": [...],
    "metrics": {m: {"value", "ci"}}, "per_class": {label: {m: {...}}} (multi-class only),
    "notes": [...]}``; ``reliable`` is false with fewer than :data:`MIN_RELIABLE_PATIENTS`
    patients or a class absent.
    """
    labels = np.asarray(labels)
    point = classification_metrics(probs, labels, thresholds, ece_bins=ece_bins, label_names=label_names)
    macro = macro_draws(draws)
    n_patients = int(np.unique(np.asarray(groups)).size)
    class_counts = {name: int((labels == c).sum()) for c, name in enumerate(label_names)}
    reasons = unreliable_because(n_patients, class_counts)
    entry = {
        "n_rows": int(labels.shape[0]),
        "n_patients": n_patients,
        "class_counts": class_counts,
        "reliable": not reasons,
        "unreliable_because": reasons,
        "metrics": {m: interval_entry(point["metrics"][m], macro[:, j], level)
                    for j, m in enumerate(METRICS)},
        "per_class": {},
        "notes": list(point["notes"]),
    }
    if len(label_names) > 2:
        for k, c in enumerate(evaluated_classes(len(label_names))):
            values = point["per_class"][label_names[c]]
            entry["per_class"][label_names[c]] = {
                m: interval_entry(values[m], draws[:, k, j], level) for j, m in enumerate(METRICS)}
    return entry


def difference_entry(point_a: dict, point_b: dict, draws_a, draws_b, level: float) -> dict:
    """``b - a`` for every metric: ``point_*`` are subset summaries' ``metrics`` and ``draws_*``
    their ``[B, K, M]`` draws from one :func:`bootstrap_draws` call (paired: the same resample
    index drew the same patients). Returns ``{metric: {"value", "ci"}}``."""
    diff = macro_draws(draws_b) - macro_draws(draws_a)
    out = {}
    for j, m in enumerate(METRICS):
        va, vb = point_a[m]["value"], point_b[m]["value"]
        out[m] = interval_entry(None if va is None or vb is None else vb - va, diff[:, j], level)
    return out


def paired_bootstrap(probs_a, probs_b, labels, groups, thresholds_a, thresholds_b, *,
                     n_resamples: int = 1000, seed: int = 0, ece_bins: int = 10,
                     label_names: list[str] | None = None, level: float = 0.95,
                     progress: bool = False) -> dict:
    """Difference ``b - a`` of each metric between two runs on the same rows, with a paired
    patient-level bootstrap interval (both runs scored on the same resampled patients).

    Returns ``{metric: {"value": difference | None, "ci": [lo, hi]}}`` (macro for multi-class).
    """
    probs_a, labels = check_predictions(probs_a, labels, what="run a")
    names = label_names or [str(c) for c in range(probs_a.shape[1])]
    draws_a, draws_b = bootstrap_draws([probs_a, probs_b], labels, groups, [thresholds_a, thresholds_b],
                                       n_resamples=n_resamples, seed=seed, ece_bins=ece_bins,
                                       progress=progress, desc="paired bootstrap")
    pa = subset_summary(probs_a, labels, groups, thresholds_a, draws_a["overall"], label_names=names,
                        ece_bins=ece_bins, level=level)["metrics"]
    pb = subset_summary(probs_b, labels, groups, thresholds_b, draws_b["overall"], label_names=names,
                        ece_bins=ece_bins, level=level)["metrics"]
    return difference_entry(pa, pb, draws_a["overall"], draws_b["overall"], level)


def evaluate_runs(runs: dict[str, np.ndarray], labels, groups, *, label_names: list[str],
                  sites=None, patterns=None, val_runs: dict[str, np.ndarray] | None = None,
                  val_labels=None, method: str = "youden", target_sensitivity: float = 0.9,
                  n_resamples: int = 1000, seed: int = 0, ece_bins: int = 10, level: float = 0.95,
                  fixed_thresholds: dict[str, np.ndarray] | None = None, progress: bool = True) -> dict:
    """Evaluate one or several runs (checkpoints) on the same rows.

    ``runs``: ``{name: probs [N, C]}`` in display order (the first is the reference for
    comparisons); ``labels [N]``; ``groups [N]`` patient keys; ``sites`` / ``patterns`` ``[N]``
    strings for the breakdowns (optional). Thresholds are chosen per run on
    ``val_runs[name]`` against ``val_labels`` with ``method``, except for runs named in
    ``fixed_thresholds`` (``{name: thresholds [K]}``, e.g. a calibrated checkpoint's own), which
    keep theirs; without validation rows they are fixed at 0.5 and a note says so.

    Returns a JSON-ready dict (NaN-free except where noted)::

        {"runs": {name: {"thresholds": {label: t}, "threshold_source": "val"|"fixed"|"checkpoint",
                         "overall": subset, "per_site": {site: subset},
                         "per_pattern": {pattern: subset},
                         "curves": {"roc": {label: {...}|None}, "reliability": {label: {...}}}}},
         "comparisons": [{"reference", "other", "overall": {m: {"value", "ci"}},
                          "per_site": {...}, "per_pattern": {...}}],
         "notes": [...]}

    where ``subset`` is :func:`subset_summary`'s dict.
    """
    if not runs:
        raise InputError("no runs to evaluate")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_classes = len(label_names)
    names = list(runs)
    probs = {k: check_predictions(v, labels, n_classes=n_classes, what=f"run '{k}'")[0]
             for k, v in runs.items()}
    notes: list[str] = []

    thresholds, sources = {}, {}
    have_val = val_runs is not None and val_labels is not None and len(val_labels) > 0
    fixed_thresholds = fixed_thresholds or {}
    if not have_val and any(k not in fixed_thresholds for k in names):
        notes.append("no validation rows: thresholds fixed at 0.5 (sensitivity, specificity, PPV "
                      "and NPV are at that threshold, not at one chosen on validation data)")
    for k in names:
        if k in fixed_thresholds:
            thresholds[k] = np.asarray(fixed_thresholds[k], dtype=np.float64).reshape(-1)
            if thresholds[k].shape != (len(evaluated_classes(n_classes)),):
                raise InputError(f"run '{k}': {thresholds[k].size} fixed threshold(s) for "
                                 f"{len(evaluated_classes(n_classes))} evaluated class(es)")
            sources[k] = "checkpoint"
        elif have_val:
            if k not in val_runs:
                raise InputError(f"no validation predictions for run '{k}'")
            thresholds[k], th_notes = choose_thresholds(
                val_runs[k], val_labels, method=method, target_sensitivity=target_sensitivity,
                label_names=label_names)
            sources[k] = "val"
            notes.extend(f"{k}: {t}" for t in th_notes)
        else:
            thresholds[k] = np.full(len(evaluated_classes(n_classes)), 0.5)
            sources[k] = "fixed"

    subsets = {("overall", None): np.ones(labels.shape[0], dtype=bool)}
    for kind, values, order in (("per_site", sites, sorted),
                                ("per_pattern", patterns, lambda v: sorted(v, key=pattern_sort_key))):
        if values is None:
            continue
        values = np.asarray(values, dtype=object)
        if values.shape != labels.shape:
            raise InputError(f"{kind}: {values.shape[0]} values for {labels.shape[0]} rows")
        for v in order(set(values.tolist())):
            subsets[(kind, v)] = values == v
    keyed = {f"{kind}\x1f{v}": m for (kind, v), m in subsets.items()}
    draws = bootstrap_draws([probs[k] for k in names], labels, groups, [thresholds[k] for k in names],
                            subsets=keyed, n_resamples=n_resamples, seed=seed, ece_bins=ece_bins,
                            progress=progress)

    result_runs = {}
    for r, k in enumerate(names):
        entry = {"thresholds": {label_names[c]: float(t) for c, t in
                                zip(evaluated_classes(n_classes), thresholds[k])},
                 "threshold_source": sources[k], "per_site": {}, "per_pattern": {}}
        for (kind, v), m in subsets.items():
            summary = subset_summary(probs[k][m], labels[m], groups[m], thresholds[k],
                                     draws[r][f"{kind}\x1f{v}"], label_names=label_names,
                                     ece_bins=ece_bins, level=level)
            if kind == "overall":
                entry["overall"] = summary
            else:
                entry[kind][v] = summary
        entry["curves"] = {
            "roc": {label_names[c]: roc_points(labels == c, probs[k][:, c])
                    for c in evaluated_classes(n_classes)},
            "reliability": {label_names[c]: {key: np.asarray(val).tolist() for key, val in
                                             reliability_curve(labels == c, probs[k][:, c], ece_bins).items()}
                            for c in evaluated_classes(n_classes)},
        }
        result_runs[k] = entry

    comparisons = []
    ref = names[0]
    for r, k in enumerate(names[1:], start=1):
        comp = {"reference": ref, "other": k, "difference": f"{k} - {ref}", "per_site": {},
                "per_pattern": {}}
        for (kind, v) in subsets:
            key = f"{kind}\x1f{v}"
            point_a = (result_runs[ref]["overall"] if kind == "overall" else result_runs[ref][kind][v])["metrics"]
            point_b = (result_runs[k]["overall"] if kind == "overall" else result_runs[k][kind][v])["metrics"]
            diff = difference_entry(point_a, point_b, draws[0][key], draws[r][key], level)
            if kind == "overall":
                comp["overall"] = diff
            else:
                comp[kind][v] = diff
        comparisons.append(comp)

    return {"runs": result_runs, "comparisons": comparisons, "notes": notes}
