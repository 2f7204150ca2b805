"""Missing-modality robustness sweep.

For each modality and each rate r in :data:`RATES`, a fraction r of the test rows that *have*
that modality lose it (its mask entry is zeroed and its input replaced by the "absent" input),
and the model is scored again. Choices, so the curves can be read:

* The rows that lose a modality are the first ``round(r * n_with)`` of one seeded random
  permutation per modality, so the sets are nested (what is removed at 0.3 is also removed at
  0.5) and the curve reflects the rate, not a fresh draw at each point.
* At rate 1.0 the modality is gone from every row. A row the removal leaves with no modality
  at all is not scored (the model would have nothing to see): it is dropped from that cell and
  counted in ``n_dropped``, and the cell's metrics are over the remaining rows. A row that had no
  modality to begin with is scored as in the baseline, so every rate-0 cell is the baseline.
* The operating thresholds are the ones chosen on the clean validation data: a deployed model
  does not re-tune its threshold when a scanner goes down, so sensitivity/specificity shifts
  are part of the degradation being measured.
* Intervals are the same patient-level bootstrap as the main metrics (same seed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clinfuse.config import MODALITIES
from clinfuse.errors import InputError
from clinfuse.evaluation.bootstrap import bootstrap_draws, subset_summary

RATES = (0.0, 0.3, 0.5, 0.7, 1.0)


def removal_masks(mask, modality: str, rates=RATES, *, seed: int = 0) -> list[np.ndarray]:
    """Masks after removing ``modality`` from a fraction of the rows that have it.

    ``mask`` ``[N, 3]`` (MODALITIES order). Returns one ``[N, 3]`` float32 mask per rate; the
    removed sets are nested across rates and depend only on ``seed`` and the modality.
    """
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or mask.shape[1] != len(MODALITIES):
        raise InputError(f"modality mask must have shape [rows, {len(MODALITIES)}], got {mask.shape}")
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    j = MODALITIES.index(modality)
    have = np.flatnonzero(mask[:, j] > 0.5)
    order = np.random.default_rng([seed, j]).permutation(have)
    out = []
    for rate in rates:
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"removal rate {rate} is outside [0, 1]")
        k = int(np.floor(rate * have.size + 0.5))
        new = mask.copy()
        new[order[:k], j] = 0.0
        out.append(new)
    return out


def robustness_sweep(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], mask, labels, groups,
                     thresholds, *, label_names: list[str], rates=RATES, modalities=MODALITIES,
                     seed: int = 0, n_resamples: int = 1000, ece_bins: int = 10,
                     baseline_probs=None, progress: bool = True) -> list[dict]:
    """Score a model with each modality removed at each rate.

    ``predict(rows, mask_rows)`` returns ``[len(rows), C]`` probabilities for the given row indices
    with the given ``[len(rows), 3]`` masks applied (absent modalities zeroed).
    ``mask [N, 3]``, ``labels [N]``, ``groups [N]`` patient keys; ``thresholds`` per evaluated
    class (from validation). ``baseline_probs`` ``[N, C]``, when given, is used for every rate-0
    cell instead of predicting again.

    Returns one dict per (modality, rate) cell: ``{"modality", "rate", "n_rows" (scored),
    "n_removed" (rows that lost the modality), "n_dropped" (rows the removal left with no
    modality, not scored), "n_patients", "metrics": {m: {"value", "ci"}}, "notes"}``.
    """
    mask = np.asarray(mask, dtype=np.float32)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape[0] != mask.shape[0] or groups.shape[0] != mask.shape[0]:
        raise InputError(f"robustness: {mask.shape[0]} masks, {labels.shape[0]} labels and "
                         f"{groups.shape[0]} patient ids must match")
    from clinfuse.progress import Progress

    cells = []
    cache: dict[bytes, np.ndarray] = {}
    with Progress(len(modalities) * len(rates), "robustness", "cell", enabled=progress) as bar:
        for modality in modalities:
            for rate, new in zip(rates, removal_masks(mask, modality, rates, seed=seed)):
                # Only rows the removal emptied are dropped; a row that had no modality to begin
                # with is scored as in the baseline, so rate 0 is exactly the baseline.
                emptied = (new.max(axis=1) < 0.5) & (mask.max(axis=1) > 0.5)
                rows = np.flatnonzero(~emptied)
                dropped = int(emptied.sum())
                removed = int(((mask > 0.5) & (new < 0.5)).any(axis=1).sum())
                key = new.tobytes()
                if key in cache:
                    probs = cache[key]
                elif removed == 0 and baseline_probs is not None:
                    probs = np.asarray(baseline_probs, dtype=np.float64)[rows]
                elif rows.size == 0:
                    probs = np.zeros((0, len(label_names)))
                else:
                    probs = np.asarray(predict(rows, new[rows]), dtype=np.float64)
                    if probs.shape[0] != rows.size:
                        raise InputError(f"robustness: predict returned {probs.shape[0]} rows "
                                         f"for {rows.size}")
                cache[key] = probs
                draws = bootstrap_draws([probs], labels[rows], groups[rows], [thresholds],
                                        n_resamples=n_resamples, seed=seed, ece_bins=ece_bins,
                                        progress=False)[0]["overall"]
                summary = subset_summary(probs, labels[rows], groups[rows], thresholds, draws,
                                         label_names=label_names, ece_bins=ece_bins)
                notes = summary["notes"]
                if dropped:
                    notes = [f"{dropped} row(s) left with no modality were not scored", *notes]
                cells.append({"modality": modality, "rate": float(rate), "n_rows": int(rows.size),
                              "n_removed": removed, "n_dropped": int(dropped),
                              "n_patients": summary["n_patients"], "reliable": summary["reliable"],
                              "unreliable_because": summary["unreliable_because"], "metrics": summary["metrics"],
                              "notes": notes})
                bar.update(1)
    return cells
