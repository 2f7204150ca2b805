"""Missing-modality sweep: which rows lose what, dropped rows, degradation measured."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clinfuse.errors import InputError
from clinfuse.evaluation.robustness import RATES, removal_masks, robustness_sweep

M3 = ("image", "text", "tabular")


def masks_fixture(n=100, seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, 3)) < 0.8).astype(np.float32)
    mask[:10] = [1, 0, 0]  # image-only rows: removing the image leaves them with nothing
    return mask


def test_removal_masks_rates_nested_and_seeded():
    mask = masks_fixture()
    have = int(mask[:, 0].sum())
    out = removal_masks(mask, "image", RATES, modalities=M3, seed=3)
    assert len(out) == len(RATES)
    np.testing.assert_array_equal(out[0], mask)
    for rate, new in zip(RATES, out):
        removed = (mask[:, 0] == 1) & (new[:, 0] == 0)
        assert removed.sum() == int(np.floor(rate * have + 0.5))
        np.testing.assert_array_equal(new[:, 1:], mask[:, 1:])  # other modalities untouched
        assert (new <= mask).all()  # never adds a modality
    assert out[-1][:, 0].sum() == 0
    for a, b in itertools.pairwise(out):  # what is gone at a lower rate stays gone at a higher one
        assert (b <= a).all()
    again = removal_masks(mask, "image", RATES, modalities=M3, seed=3)
    other = removal_masks(mask, "image", RATES, modalities=M3, seed=4)
    np.testing.assert_array_equal(again[2], out[2])
    assert not np.array_equal(other[2], out[2])


def test_removal_masks_reject_bad_input():
    with pytest.raises(InputError, match="unknown modality"):
        removal_masks(np.ones((3, 3)), "audio", modalities=M3)
    with pytest.raises(InputError, match="outside"):
        removal_masks(np.ones((3, 3)), "text", [1.5], modalities=M3)
    with pytest.raises(InputError, match="shape"):
        removal_masks(np.ones((3, 2)), "text", modalities=M3)


def test_sweep_measures_degradation_and_counts_dropped_rows():
    rng = np.random.default_rng(1)
    n = 200
    mask = masks_fixture(n)
    labels = rng.integers(0, 2, n)
    signal = np.clip(0.5 + (labels - 0.5) * 0.6 + rng.normal(0, 0.1, n), 0, 1)
    calls = []

    def predict(rows, m):
        # The image carries all the signal: without it the model can only say 0.5.
        calls.append((rows.copy(), m.copy()))
        p = np.where(m[:, 0] > 0.5, signal[rows], 0.5)
        return np.c_[1 - p, p]

    baseline = np.c_[1 - np.where(mask[:, 0] > 0.5, signal, 0.5), np.where(mask[:, 0] > 0.5, signal, 0.5)]
    cells = robustness_sweep(predict, mask, labels, np.arange(n), [0.5], label_names=["neg", "pos"], modalities=M3,
                             n_resamples=200, seed=0, baseline_probs=baseline, progress=False)
    assert len(cells) == 3 * len(RATES)
    by = {(c["modality"], c["rate"]): c for c in cells}
    for c in cells:
        for e in c["metrics"].values():
            assert set(e) >= {"value", "ci"}
    # Rate 0 cells reuse the baseline: no predict call for them; each other cell is one call.
    assert len(calls) == 3 * (len(RATES) - 1)
    for rows, m in calls:
        assert ((m.max(axis=1) > 0.5) | (mask[rows].max(axis=1) < 0.5)).all(), "emptied rows are not scored"
        assert (m <= mask[rows]).all()
    auroc = [by[("image", r)]["metrics"]["auroc"]["value"] for r in RATES]
    assert auroc[0] > 0.8 and all(a >= b - 1e-9 for a, b in itertools.pairwise(auroc))
    assert auroc[-1] == pytest.approx(0.5)  # constant predictions
    full = by[("image", 1.0)]
    image_only = int(((mask[:, 0] == 1) & (mask[:, 1:].sum(axis=1) == 0)).sum())
    assert full["n_dropped"] == image_only >= 10
    assert full["n_rows"] == n - image_only
    assert full["n_removed"] == int(mask[:, 0].sum())
    assert any("not scored" in t for t in full["notes"])
    # Text carries no signal here: removing it changes nothing but the dropped rows.
    assert by[("text", 1.0)]["metrics"]["auroc"]["value"] == pytest.approx(auroc[0], abs=0.05)


def test_sweep_with_every_row_dropped_reports_empty_cell():
    mask = np.tile(np.array([[1, 0, 0]], dtype=np.float32), (20, 1))
    labels = np.arange(20) % 2

    def predict(rows, m):
        return np.tile([0.4, 0.6], (len(rows), 1))

    cells = robustness_sweep(predict, mask, labels, np.arange(20), [0.5], label_names=["a", "b"], modalities=M3,
                             swept=("image",), n_resamples=100, progress=False)
    last = cells[-1]
    assert last["n_rows"] == 0 and last["n_dropped"] == 20
    assert last["metrics"]["auroc"]["value"] is None
