"""One-run canary audit (Steinke, Nasr & Jagielski 2023): the statistics (the runs: test_auditing_empirical)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clinfuse.privacy.canary import (
    epsilon_lower_bound,
    lower_bound_from_scores,
    p_value,
    plan_audit,
    run_canary_audit,
)


def test_p_value_without_delta_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(stats.binom.sf(39, 50, q))
    # delta only makes the null easier to satisfy: larger p-value
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)
    assert p_value(100, 50, 0, 1.0, 0.0) == 1.0


def test_lower_bound_is_the_largest_rejected_epsilon():
    eps = epsilon_lower_bound(1000, 200, 180, 1e-5, significance=0.05)
    assert eps > 0
    assert p_value(1000, 200, 180, eps - 1e-3, 1e-5) <= 0.05 < p_value(1000, 200, 180, eps + 1e-3, 1e-5)
    # chance-level guessing proves nothing; more correct guesses prove more
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 200, 1e-5) > eps


def test_scores_that_separate_perfectly_give_a_large_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = lower_bound_from_scores(included.astype(float), included, 1e-5)
    random = lower_bound_from_scores(rng.normal(size=1000), included, 1e-5)
    assert perfect["correct"] == perfect["guesses"] and perfect["eps_lower_bound"] > 4
    assert random["eps_lower_bound"] < 1.0
    assert perfect["eps_lower_bound"] <= perfect["max_detectable"] + 1e-9


def test_audit_plan_picks_a_refutable_run():
    # A large budget over a long horizon: one run cannot refute it, a prefix can.
    q, steps, note = plan_audit(1.2, 0.01, 20000, 1e-5, 1000, mechanism="rdp")
    assert q == 0.01 and 1 <= steps < 20000 and "same mechanism" in note
    # Even one step at this sample rate claims too much: a lower rate, same noise and clipping.
    q, steps, note = plan_audit(0.84, 0.2, 15, 1e-5, 2000, mechanism="rdp")
    assert q < 0.2 and f"sample rate {q:.4g}" in note
    assert (plan_audit(3.0, 0.01, 50, 1e-5, 1000, mechanism="rdp")) == (0.01, 50, None)


def test_the_audit_scores_whatever_shadow_run_it_is_given():
    # A "mechanism" that releases the canary sum exactly: every included canary is seen.
    def leaky(features, applied):
        return features.sum(axis=0)

    result = run_canary_audit(2000, shadow_run=leaky, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05,
                              steps=60, n_canaries=500, seed=3)
    assert not result.passed and result.eps_lower_bound > result.accounted_epsilon
